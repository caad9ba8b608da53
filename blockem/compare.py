"""Every method of the grid against the plain fine-tune: normalised EM reduction against normalised
in-domain adherence change (the paper's Fig. 7, generalised to all methods), and each method's best
point within the incoherence budget. Read from `summary.parquet` only; written as
`metrics/comparison.parquet` and `metrics/comparison.md` (rule `compare`, `python -m blockem
compare`), drawn by `blockem.figures.fig_methods`.

Per (domain, seed) pair with an `sft` cell, and the `base` cell:

    EM reduction      = (EM_sft - EM_cell) / (EM_sft - EM_base)
                        the share of the fine-tune's EM increase the method removed: 1 = back to
                        the base, 0 = no better than plain SFT, < 0 = worse
    adherence change  = Ad_cell / Ad_sft - 1
                        0 = the narrow task learnt as well as by SFT, -0.2 = 80% of SFT's
    incoherence       = Inc_cell (compared with Inc_sft of the same pair)

Metrics: judged runs (an `em_rate` row exists) read EM = `em_rate` on `final` (other domains),
Ad = `adherence` on `in_domain`, Inc = `incoherence_rate` on `final`; judge-free runs (eval.mc,
nothing judged) read EM = `mc_em_rate` (final), Ad = `mc_adherence` (in_domain), Inc =
`mc_nll_shift` (neutral, nats). Only rates averaged over judges (`judge` null) are read.

Cells: every method that is not `base`, `sft`, `control` or a steering cell (`steer_*`), with its
own-domain latents and the full set (no size sweep, no cross-domain or re-emergence latents); of a
multi-epoch run, its last epoch (the model training ends with). A pair whose base-to-sft EM
increase is not positive, or whose sft adherence is 0, cannot be normalised and is left out (the
`left_out` column says why); a method with no usable pair is one row with `skipped` set.

Per method and strength: mean and SEM (SD / sqrt(n), nan for one pair) over pairs (cells of one
pair at one strength are averaged first). A strength is *within budget* when its mean incoherence
is at most the same pairs' mean sft incoherence + `budget` (default 0.05 judged, 0.25 nats MC:
`BUDGET`), and *adherence ok* when its mean adherence change is >= `min_adherence_change`
(default -0.2, i.e. >= 80% of SFT's adherence). The method's *best point*: the strength with the
largest mean EM reduction among those within budget and adherence ok; if none is adherence ok,
the largest within budget, noted "adherence < 80%"; if none is within budget, no best point
(noted in the table).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from blockem import methods

# incoherence budget over sft: judged rate (fraction of answers), MC neutral NLL shift (nats)
BUDGET = {"judged": 0.05, "mc": 0.25}
MIN_ADHERENCE_CHANGE = -0.2  # mean adherence >= 80% of sft's
# (metric, eval_set) of EM, adherence and incoherence per kind of run
METRICS = {
    "judged": {"em": ("em_rate", "final"), "ad": ("adherence", "in_domain"),
               "inc": ("incoherence_rate", "final")},
    # em_base: the base's MC EM rate on the same items as the sft cell (the base cell itself is
    # scored on every domain's items, the fine-tuned one included)
    "mc": {"em": ("mc_em_rate", "final"), "ad": ("mc_adherence", "in_domain"),
           "inc": ("mc_nll_shift", "neutral"), "em_base": ("mc_em_rate_base", "final")},
}
NOT_COMPARED = ("base", "sft", "control")  # and every steer_* cell

COLUMNS = ("method", "label", "strength", "strength_value", "n_pairs", "em_reduction_mean",
           "em_reduction_sem", "adherence_change_mean", "adherence_change_sem",
           "incoherence_mean", "incoherence_sft_mean", "within_budget", "adherence_ok", "best",
           "note", "left_out", "skipped", "metrics", "budget", "min_adherence_change")


def compared(method: str) -> bool:
    """Whether cells of `method` are compared (every grid method; not base, sft, control,
    steering)."""
    return method not in NOT_COMPARED and not method.startswith("steer")


def requested(grid_methods: set[str]) -> bool:
    """Whether a grid with these methods (`blockem.grid.grid_methods`) gets the comparison:
    two or more methods."""
    return len({m for m in grid_methods if ":" not in m}) >= 2


def metric_kind(summary: list[dict]) -> str:
    """'judged' when the summary has judged EM rates, 'mc' when only MC ones."""
    ms = {r["metric"] for r in summary if r.get("judge") is None}
    if "em_rate" in ms:
        return "judged"
    if "mc_em_rate" in ms:
        return "mc"
    raise ValueError("the summary has neither em_rate nor mc_em_rate rows: nothing to compare")


def _label(method: str) -> str:
    m = methods.REGISTRY.get(method)
    return m.label if m is not None else method


def _strength(method: str) -> str:
    m = methods.REGISTRY.get(method)
    return m.strength if m is not None else "lambda"


def _order(method: str):
    names = methods.names()
    return (names.index(method), "") if method in names else (len(names), method)


def mean_sem(xs: list[float]) -> tuple[float, float]:
    """Mean and SEM (SD / sqrt(n); nan for one value, both nan for none)."""
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def _cells(summary: list[dict], kind: str) -> dict[str, dict]:
    """cell -> its description and {"em", "ad", "inc"} values (judge-averaged rows only)."""
    wanted = {v: k for k, v in METRICS[kind].items()}
    cells: dict[str, dict] = {}
    for r in summary:
        if r.get("judge") is not None:
            continue
        c = cells.setdefault(r["cell"], {"desc": r, "values": {}})
        key = wanted.get((r["metric"], r["eval_set"]))
        if key is not None and r["value"] is not None and not math.isnan(r["value"]):
            c["values"][key] = r["value"]
    return cells


def _plain(d: dict) -> bool:
    """Own-domain latents (or none), the full set."""
    return d.get("k_size") is None and d.get("latents_from") in (None, d["domain"])


def _last_epochs(cells: dict[str, dict]) -> dict[str, dict]:
    """Drop every epoch of a multi-epoch run but its last."""
    last: dict[tuple, int] = {}
    for c in cells.values():
        d = c["desc"]
        if d.get("epoch") is not None:
            key = (d["method"], d["domain"], d["lam"], d["seed"], d.get("latents_from"))
            last[key] = max(last.get(key, d["epoch"]), d["epoch"])
    return {cell: c for cell, c in cells.items() if c["desc"].get("epoch") is None
            or c["desc"]["epoch"] == last[(c["desc"]["method"], c["desc"]["domain"],
                                           c["desc"]["lam"], c["desc"]["seed"],
                                           c["desc"].get("latents_from"))]}


def _pair(d: dict) -> str:
    return f"{d['domain']}-s{d['seed']}"


def _reasons(reasons: dict[str, set]) -> str | None:
    """'reason: pair, pair; reason: pair' (None when nothing was left out)."""
    if not reasons:
        return None
    return "; ".join(f"{why}: {', '.join(sorted(pairs))}" for why, pairs in sorted(reasons.items()))


def comparison_rows(summary, *, metrics: str = "auto", budget: float | None = None,
                    min_adherence_change: float = MIN_ADHERENCE_CHANGE) -> list[dict]:
    """One row per (method, strength) of every compared method (columns `COLUMNS`), methods in
    registry order then by name, strengths ascending; a method without a usable (domain, seed)
    pair is one row with `skipped` (the reason) and no numbers. `summary`: summary.parquet's rows
    (dicts, or a pyarrow Table); `metrics`: "judged", "mc" or "auto" (judged when an `em_rate`
    row exists); `budget`: the incoherence budget over sft (default `BUDGET[metrics]`)."""
    if hasattr(summary, "to_pylist"):
        summary = summary.to_pylist()
    kind = metric_kind(summary) if metrics == "auto" else metrics
    if kind not in METRICS:
        raise ValueError(f"metrics must be auto, judged or mc, not {metrics!r}")
    budget = BUDGET[kind] if budget is None else float(budget)
    names = METRICS[kind]
    cells = _cells(summary, kind)
    bases = [c for c in cells.values() if c["desc"]["method"] == "base"]
    if len(bases) > 1:
        raise ValueError(f"the summary has {len(bases)} base cells; the comparison needs one")
    em_base = bases[0]["values"].get("em") if bases else None
    sft: dict[tuple, dict] = {}
    for cell, c in cells.items():
        d = c["desc"]
        if d["method"] == "sft":
            if (d["domain"], d["seed"]) in sft:
                raise ValueError(f"two sft cells for {_pair(d)} (the second: {cell})")
            sft[(d["domain"], d["seed"])] = c["values"]

    per_method: dict[str, list[dict]] = defaultdict(list)
    for c in _last_epochs(cells).values():
        if compared(c["desc"]["method"]):
            per_method[c["desc"]["method"]].append(c)

    rows = []
    for method in sorted(per_method, key=_order):
        common = {"method": method, "label": _label(method), "strength": _strength(method),
                  "metrics": kind, "budget": budget,
                  "min_adherence_change": float(min_adherence_change)}
        plain = [c for c in per_method[method] if _plain(c["desc"])]
        # strength -> pair -> [(em reduction, adherence change, inc, inc sft)]
        points: dict[float, dict[tuple, list]] = defaultdict(lambda: defaultdict(list))
        left: dict[float | None, dict[str, set]] = defaultdict(lambda: defaultdict(set))
        for c in plain:
            d, v = c["desc"], c["values"]
            key, lam = (d["domain"], d["seed"]), d["lam"]
            ref = sft.get(key)
            eb = (ref or {}).get("em_base", em_base)  # the base on the sft cell's own items
            why = None
            if lam is None:
                why = "no strength (lam null)"
            elif eb is None:
                why = f"no base cell with {names['em'][0]} on {names['em'][1]}"
            elif ref is None:
                why = "no sft cell"
            elif any(k not in v for k in ("em", "ad", "inc")) or \
                    any(k not in ref for k in ("em", "ad", "inc")):
                gone = sorted({names[k][0] for k in ("em", "ad", "inc")
                               if k not in v or k not in ref})
                why = f"no {', '.join(gone)} (cell or its sft cell)"
            elif ref["em"] - eb <= 0:
                why = "sft EM not above the base's"
            elif ref["ad"] <= 0:
                why = "sft adherence 0"
            if why is not None:
                left[lam][why].add(_pair(d))
                continue
            points[lam][key].append(((ref["em"] - v["em"]) / (ref["em"] - eb),
                                     v["ad"] / ref["ad"] - 1, v["inc"], ref["inc"]))
        if not points:
            reasons = {}
            for by in left.values():
                for why, pairs in by.items():
                    reasons.setdefault(why, set()).update(pairs)
            why = _reasons(reasons) or ("only size-sweep, cross-domain or re-emergence cells"
                                        if per_method[method] else "no cells")
            rows.append({**common, "strength_value": None, "n_pairs": 0,
                         **dict.fromkeys(("em_reduction_mean", "em_reduction_sem",
                                          "adherence_change_mean", "adherence_change_sem",
                                          "incoherence_mean", "incoherence_sft_mean"),
                                         float("nan")),
                         "within_budget": False, "adherence_ok": False, "best": False,
                         "note": None, "left_out": None, "skipped": why})
            continue
        mrows = []
        for lam in sorted(points):
            # a pair's cells at one strength are averaged first: pairs are the unit
            per_pair = [[sum(t[i] for t in ts) / len(ts) for i in range(4)]
                        for ts in points[lam].values()]
            em_m, em_s = mean_sem([p[0] for p in per_pair])
            ad_m, ad_s = mean_sem([p[1] for p in per_pair])
            inc_m, inc_sft = mean_sem([p[2] for p in per_pair])[0], \
                mean_sem([p[3] for p in per_pair])[0]
            mrows.append({**common, "strength_value": float(lam), "n_pairs": len(per_pair),
                          "em_reduction_mean": em_m, "em_reduction_sem": em_s,
                          "adherence_change_mean": ad_m, "adherence_change_sem": ad_s,
                          "incoherence_mean": inc_m, "incoherence_sft_mean": inc_sft,
                          "within_budget": bool(inc_m <= inc_sft + budget + 1e-12),
                          "adherence_ok": bool(ad_m >= min_adherence_change - 1e-12),
                          "best": False, "note": None,
                          "left_out": _reasons(left.get(lam, {})), "skipped": None})
        _mark_best(mrows, min_adherence_change)
        rows += mrows
    return rows


def _mark_best(mrows: list[dict], min_adherence_change: float) -> None:
    ok = [r for r in mrows if r["within_budget"] and r["adherence_ok"]]
    note = None
    if not ok:
        ok = [r for r in mrows if r["within_budget"]]
        note = f"adherence < {100 * (1 + min_adherence_change):g}%"
    if ok:
        best = max(ok, key=lambda r: r["em_reduction_mean"])  # first (lowest strength) on ties
        best["best"], best["note"] = True, note


def best_rows(rows: list[dict]) -> list[dict]:
    """Each method's best point, or its one row without a best point (none within budget, or
    skipped), best first: adherence ok, then by mean EM reduction."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        best = [r for r in mine if r["best"]]
        if best:
            out.append(best[0])
        elif mine[0]["skipped"]:
            out.append(mine[0])
        else:
            out.append({**mine[0], "strength_value": None, "n_pairs": max(r["n_pairs"]
                                                                          for r in mine),
                        **dict.fromkeys(("em_reduction_mean", "em_reduction_sem",
                                         "adherence_change_mean", "adherence_change_sem",
                                         "incoherence_mean", "incoherence_sft_mean"),
                                        float("nan")),
                        "note": "no strength within the incoherence budget"})
    return sorted(out, key=lambda r: (not r["best"], r["best"] and r["note"] is not None,
                                      -r["em_reduction_mean"] if r["best"] else 0.0))


def _pm(m: float, s: float, digits: int = 2) -> str:
    if m is None or math.isnan(m):
        return "-"
    return f"{m:+.{digits}f}" + ("" if s is None or math.isnan(s) else f" ± {s:.{digits}f}")


def _num(x: float, digits: int = 3) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _strength_cell(r: dict) -> str:
    return "-" if r["strength_value"] is None else f"{r['strength']} {r['strength_value']:g}"


def comparison_table_md(rows: list[dict]) -> str:
    """The comparison as markdown: one line per method's best point, then every strength."""
    if not rows:
        return "# Methods compared\n\nNo compared method in the summary.\n"
    kind, budget, least = rows[0]["metrics"], rows[0]["budget"], rows[0]["min_adherence_change"]
    m = METRICS[kind]
    inc_unit = " nats" if kind == "mc" else ""
    lines = [
        "# Methods compared (normalised to the plain fine-tune)", "",
        f"Metrics ({'judge-free MC items' if kind == 'mc' else 'judged answers'}): EM = "
        f"`{m['em'][0]}` on `{m['em'][1]}`, adherence = `{m['ad'][0]}` on `{m['ad'][1]}`, "
        f"incoherence = `{m['inc'][0]}` on `{m['inc'][1]}`. Per (domain, seed) pair: EM reduction "
        "= (EM_sft - EM) / (EM_sft - EM_base) (1: back to the base, 0: plain SFT), adherence "
        "change = Ad / Ad_sft - 1. Mean ± SEM over pairs. Best point: the strength with the "
        f"largest mean EM reduction whose mean incoherence is at most sft's + {budget:g}{inc_unit} "
        f"(the incoherence budget) and whose mean adherence change is at least {least:+g} "
        f"(>= {100 * (1 + least):g}% of sft's adherence); failing that, the largest within the "
        "budget, noted (blockem/compare.py).", "",
        "## Best point per method", "",
        "| method | strength | EM reduction | adherence change | incoherence (sft) | pairs | note |",
        "|---|---|---|---|---|---|---|"]
    for r in best_rows(rows):
        note = f"skipped: {r['skipped']}" if r["skipped"] else (r["note"] or "")
        lines.append(f"| {r['label']} (`{r['method']}`) | {_strength_cell(r)} | "
                     f"{_pm(r['em_reduction_mean'], r['em_reduction_sem'])} | "
                     f"{_pm(r['adherence_change_mean'], r['adherence_change_sem'])} | "
                     f"{_num(r['incoherence_mean'])} ({_num(r['incoherence_sft_mean'])}) | "
                     f"{r['n_pairs']} | {note} |")
    lines += ["", "## Every strength", "",
              "| method | strength | EM reduction | adherence change | incoherence (sft) | "
              "within budget | adherence ok | best | pairs | left out |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    for r in rows:
        if r["skipped"]:
            lines.append(f"| {r['label']} (`{r['method']}`) | - | - | - | - | - | - | - | 0 | "
                         f"skipped: {r['skipped']} |")
            continue
        lines.append(f"| {r['label']} (`{r['method']}`) | {_strength_cell(r)} | "
                     f"{_pm(r['em_reduction_mean'], r['em_reduction_sem'])} | "
                     f"{_pm(r['adherence_change_mean'], r['adherence_change_sem'])} | "
                     f"{_num(r['incoherence_mean'])} ({_num(r['incoherence_sft_mean'])}) | "
                     f"{yes(r['within_budget'])} | {yes(r['adherence_ok'])} | "
                     f"{'**best**' if r['best'] else ''} | {r['n_pairs']} | "
                     f"{r['left_out'] or ''} |")
    return "\n".join(lines) + "\n"


def schema():
    import pyarrow as pa

    return pa.schema([
        ("method", pa.string()), ("label", pa.string()), ("strength", pa.string()),
        ("strength_value", pa.float64()), ("n_pairs", pa.int64()),
        ("em_reduction_mean", pa.float64()), ("em_reduction_sem", pa.float64()),
        ("adherence_change_mean", pa.float64()), ("adherence_change_sem", pa.float64()),
        ("incoherence_mean", pa.float64()), ("incoherence_sft_mean", pa.float64()),
        ("within_budget", pa.bool_()), ("adherence_ok", pa.bool_()), ("best", pa.bool_()),
        ("note", pa.string()), ("left_out", pa.string()), ("skipped", pa.string()),
        ("metrics", pa.string()), ("budget", pa.float64()),
        ("min_adherence_change", pa.float64())])


SUMMARY_COLUMNS = ("cell", "method", "domain", "lam", "seed", "eval_set", "metric", "value",
                   "judge")


def compare_stage(summary_path: Path, out_dir: Path, *, metrics: str = "auto",
                  budget: float | None = None,
                  min_adherence_change: float = MIN_ADHERENCE_CHANGE) -> None:
    """`comparison.parquet` (with provenance) and `comparison.md` in `out_dir`, from
    summary.parquet."""
    import pyarrow as pa

    from blockem.io import atomic_path, provenance, read_checked, read_provenance, write_table

    summary_path, out_dir = Path(summary_path), Path(out_dir)
    summary = read_checked(summary_path, SUMMARY_COLUMNS,
                           "the results table (metrics/summary.parquet, `python -m blockem "
                           "summary`)").to_pylist()
    rows = comparison_rows(summary, metrics=metrics, budget=budget,
                           min_adherence_change=min_adherence_change)
    try:
        summary_hash = read_provenance(summary_path)["config_hash"]
    except (KeyError, ValueError):
        summary_hash = None
    kind = rows[0]["metrics"] if rows else (metric_kind(summary) if metrics == "auto" else metrics)
    settings = {"metrics": kind, "budget": BUDGET[kind] if budget is None else budget,
                "min_adherence_change": min_adherence_change}
    write_table(out_dir / "comparison.parquet", pa.Table.from_pylist(rows, schema=schema()),
                provenance("compare", settings, summary=str(summary_path),
                           summary_config_hash=summary_hash))
    with atomic_path(out_dir / "comparison.md") as tmp:
        tmp.write_text(comparison_table_md(rows))
