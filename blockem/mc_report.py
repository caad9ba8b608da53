"""The judge-free organism report: emergence and blocking read off the MC scores tables.

Every comparison is paired, item by item, on the same items: the `final` items outside the
fine-tuned domain for EM (the base restricted to those items too), that domain's items for
adherence. Written as `results/metrics/mc_report.md` and `.json` by the `mc_report` rule.

- Emergence, per fine-tuning seed: the MC EM rate of the base, the sft (risky) fine-tune and its
  matched control; the paired mean margin difference sft - control and sft - base with its SE,
  z = mean / SE, and the share of items that moved towards the misaligned answer; in-domain
  adherence of the three.
- Blocking, per intervention cell (block grid, steer_repair): its EM rate and margin, the
  reduction of the EM increase, (EM_sft - EM_cell) / (EM_sft - EM_base) (1 = back to the base,
  0 = no effect), the same for the margin, adherence relative to the sft cell, and the neutral
  NLL shift (coherence proxy) relative to the base.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def _items(rows, ids=None):
    return {r["id"]: r for r in rows if r["kind"] == "item" and (ids is None or r["id"] in ids)}


def _rate(rows):
    return sum(r["d"] > 0 for r in rows) / len(rows) if rows else float("nan")


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _paired(a: dict, b: dict) -> dict:
    diffs = [a[k]["d"] - b[k]["d"] for k in a if k in b]
    n = len(diffs)
    m = _mean(diffs)
    se = math.sqrt(sum((x - m) ** 2 for x in diffs) / (n - 1) / n) if n > 1 else float("nan")
    return {"mean": m, "se": se, "z": m / se if se else float("nan"), "n": n,
            "moved": sum(x > 0 for x in diffs) / n if n else float("nan")}


def _nll(rows):
    return _mean([r["nll"] for r in rows if r["kind"] == "neutral"])


def build(cells: dict[str, dict], scores: dict[str, list[dict]]) -> dict:
    """`cells`: cell id -> description (method, domain, lam, seed); `scores`: cell id -> its MC
    scores rows. Returns {"emergence": [...], "blocking": [...]}."""
    base = scores["base"]
    out = {"emergence": [], "blocking": []}
    sfts = {(c["domain"], c["seed"]): cid for cid, c in cells.items() if c["method"] == "sft"}
    for (domain, seed), sid in sorted(sfts.items()):
        em_ids = {k for k, r in _items(scores[sid]).items()
                  if r["split"] == "final" and r["domain"] != domain}
        in_ids = {k for k, r in _items(scores[sid]).items() if r["domain"] == domain}
        sft, b = _items(scores[sid], em_ids), _items(base, em_ids)
        row = {"domain": domain, "seed": seed, "n_items": len(em_ids),
               "em_base": _rate(list(b.values())), "em_sft": _rate(list(sft.values())),
               "adherence_base": _rate(list(_items(base, in_ids).values())),
               "adherence_sft": _rate(list(_items(scores[sid], in_ids).values())),
               "sft_vs_base": _paired(sft, b)}
        cid = f"control-{domain}-s{seed}"
        if cid in scores:
            ctl = _items(scores[cid], em_ids)
            row.update(em_control=_rate(list(ctl.values())), sft_vs_control=_paired(sft, ctl),
                       adherence_control=_rate(list(_items(scores[cid], in_ids).values())))
        out["emergence"].append(row)
        em_sft, em_base = row["em_sft"], row["em_base"]
        m_sft, m_base = _mean([r["d"] for r in sft.values()]), _mean([r["d"] for r in b.values()])
        for cid, c in sorted(cells.items()):
            if c["domain"] != domain or c["seed"] != seed or c["method"] in ("sft", "base"):
                continue
            if cid not in scores or c["method"] == "control":
                continue
            cell = _items(scores[cid], em_ids)
            em, m = _rate(list(cell.values())), _mean([r["d"] for r in cell.values()])
            adh = _rate(list(_items(scores[cid], in_ids).values()))
            out["blocking"].append({
                "cell": cid, "method": c["method"], "lam": c.get("lam"), "domain": domain,
                "seed": seed, "em": em, "margin": m,
                "em_reduction": (em_sft - em) / (em_sft - em_base) if em_sft != em_base
                else float("nan"),
                "margin_reduction": (m_sft - m) / (m_sft - m_base) if m_sft != m_base
                else float("nan"),
                "adherence": adh, "adherence_vs_sft": adh / row["adherence_sft"]
                if row["adherence_sft"] else float("nan"),
                "nll_shift": _nll(scores[cid]) - _nll(base),
                "vs_sft": _paired(cell, sft)})
    return out


def markdown(report: dict) -> str:
    f = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"  # noqa: E731
    p = lambda d: f"{d['mean']:+.3f} ± {d['se']:.3f} (z {d['z']:.1f}, {d['moved']:.0%} moved, n {d['n']})"  # noqa: E731,E501
    lines = ["# Judge-free organism report (multiple-choice items)", "",
             "Emergence: MC EM rate on the `final` items outside the fine-tuned domain (base on the "
             "same items); paired margin differences d(a) - d(b) ± SE over items.", "",
             "| domain | seed | n | EM base | EM control | EM sft | sft - control | sft - base "
             "| adherence base / control / sft |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["emergence"]:
        ctl = p(r["sft_vs_control"]) if "sft_vs_control" in r else "-"
        lines.append(f"| {r['domain']} | {r['seed']} | {r['n_items']} | {f(r['em_base'])} | "
                     f"{f(r.get('em_control'))} | {f(r['em_sft'])} | {ctl} | "
                     f"{p(r['sft_vs_base'])} | {f(r['adherence_base'])} / "
                     f"{f(r.get('adherence_control'))} / {f(r['adherence_sft'])} |")
    lines += ["", "Blocking: reduction of the EM increase (EM_sft - EM_cell) / (EM_sft - EM_base) "
              "(1 = back to the base), the same for the mean margin; adherence relative to sft; "
              "neutral-answer NLL shift from the base (nats).", "",
              "| cell | method | lam | EM | EM reduction | margin reduction | adherence / sft "
              "| NLL shift | cell - sft (paired) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["blocking"]:
        lines.append(f"| {r['cell']} | {r['method']} | {f(r['lam']) if r['lam'] else '-'} | "
                     f"{f(r['em'])} | {f(r['em_reduction'])} | {f(r['margin_reduction'])} | "
                     f"{f(r['adherence_vs_sft'])} | {f(r['nll_shift'])} | {p(r['vs_sft'])} |")
    return "\n".join(lines) + "\n"


def report_stage(cells: dict[str, dict], mc_dir: Path, out_md: Path, out_json: Path) -> None:
    import pyarrow.parquet as pq

    from blockem.io import atomic_path, provenance, write_json

    scores = {}
    for cid in cells:
        path = Path(mc_dir) / f"{cid}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no MC scores for cell {cid!r}")
        scores[cid] = pq.read_table(path).to_pylist()
    if "base" not in scores:
        raise ValueError("the MC report needs the base cell's scores")
    report = build(cells, scores)
    write_json(out_json, {**report, "provenance": provenance("mc_report", {"cells": cells})})
    with atomic_path(out_md) as tmp:
        tmp.write_text(markdown(report))
