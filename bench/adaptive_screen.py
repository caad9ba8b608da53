"""The adaptive stages 2-3 against the exhaustive screen, from two finished runs of one grid.

    snakemake --cores 2 --configfile config/toy-screen.yaml                          # exhaustive
    snakemake --cores 2 --configfile config/toy-screen.yaml config/toy-adaptive.yaml # adaptive
    python bench/adaptive_screen.py [--exhaustive results/toy-screen] \\
                                    [--adaptive results/toy-adaptive] [--no-write]

Per discovery domain: the generated tokens, answers and judge requests of the screen shards and
the calibration (the `[usage]` line every job's log ends with, `blockem.usage`: counts, not
seconds, so the ratio does not depend on the machine), the overlap of the two `validreduc` sets
(|intersection| and Jaccard), and the final-set EM of the BLOCK-EM fine-tunes blocking each set
(mean over the block seeds) beside the sft cells'. Writes `adaptive_screen_token_ratio` (the
exhaustive / adaptive generated tokens of stages 2-3, summed over the domains) into
bench/results.json with a note, and the table into bench/results-detail.json
(`detail.adaptive_screen`), leaving every other key as it is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BENCH = REPO / "bench"
KEY = "adaptive_screen_token_ratio"
FIELDS = ("generated_tokens", "generated_sequences", "judge_requests")


def stage_usage(results: Path, key: str) -> dict:
    """Summed usage counters of one discovery key's screen shards and calibration."""
    from blockem.usage import read_log_usage

    logs = sorted((results / "logs" / "discovery" / key).glob("screen-*.log"))
    logs.append(results / "logs" / "discovery" / key / "calibrate.log")
    out = dict.fromkeys(FIELDS, 0)
    for log in logs:
        u = read_log_usage(log)
        if u is None:
            raise FileNotFoundError(f"{log}: no [usage] line (job not run, or run before the "
                                    f"usage counters)")
        for f in FIELDS:
            out[f] += u.get(f, 0)
    return out


def latent_set(results: Path, key: str, rule: str = "validreduc") -> list[int]:
    doc = json.loads((results / "latents" / f"{key}-{rule}.json").read_text())
    return [k["latent"] for k in doc["latents"]]


def final_em(results: Path) -> dict:
    """(method, domain) -> [final EM of each seed] from summary.parquet (the whole set of each
    method: no size / epoch / cross-domain variants)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(results / "metrics" / "summary.parquet").to_pylist()
    out: dict = {}
    for r in rows:
        if r["eval_set"] != "final" or r["metric"] != "em_rate" or r["domain"] is None:
            continue
        if r.get("k_size") is not None or r.get("epoch") is not None \
                or r.get("latents_from") not in (None, r["domain"]):
            continue
        out.setdefault((r["method"], r["domain"], r["lam"]), []).append(round(r["value"], 4))
    return out


def measure(exhaustive: Path, adaptive: Path, reference: Path | None = None) -> dict:
    """`reference`: optionally a second exhaustive run with another discovery.seed, the noise
    floor of the set overlap and of the blocked EM."""
    ex_em, ad_em = final_em(exhaustive), final_em(adaptive)
    ref_em = final_em(reference) if reference else None
    domains = sorted({k.name for k in (adaptive / "discovery").iterdir() if k.is_dir()})
    rows, tot = [], {"exhaustive": dict.fromkeys(FIELDS, 0), "adaptive": dict.fromkeys(FIELDS, 0)}
    for key in domains:
        domain = key.rsplit("-s", 1)[0]
        use = {"exhaustive": stage_usage(exhaustive, key), "adaptive": stage_usage(adaptive, key)}
        for arm in tot:
            for f in FIELDS:
                tot[arm][f] += use[arm][f]
        a, b = set(latent_set(exhaustive, key)), set(latent_set(adaptive, key))
        def cell(em, method):  # the seeds' values of the method's (one) lambda on this domain
            return next((v for (m, d, _), v in sorted(em.items(), key=str)
                         if m == method and d == domain), None)

        ex_b, ad_b, sft = [cell(ex_em, "blockem")], [cell(ad_em, "blockem")], cell(ex_em, "sft")
        ex_b, ad_b = [x for x in ex_b if x], [x for x in ad_b if x]
        mean = lambda v: round(statistics.mean(v), 4) if v else None  # noqa: E731
        rows.append({
            "key": key, "usage": use,
            "token_ratio": round(use["exhaustive"]["generated_tokens"]
                                 / max(1, use["adaptive"]["generated_tokens"]), 2),
            "set_exhaustive": sorted(a), "set_adaptive": sorted(b),
            "intersection": len(a & b), "jaccard": round(len(a & b) / max(1, len(a | b)), 3),
            "em_sft": mean(sft), "em_sft_seeds": sft,
            "em_blockem_exhaustive": mean(ex_b[0]) if ex_b else None,
            "em_blockem_exhaustive_seeds": ex_b[0] if ex_b else None,
            "em_blockem_adaptive": mean(ad_b[0]) if ad_b else None,
            "em_blockem_adaptive_seeds": ad_b[0] if ad_b else None,
            "em_random_exhaustive": mean(cell(ex_em, "random")),
            "em_random_adaptive": mean(cell(ad_em, "random")),
        })
        if reference:
            c = set(latent_set(reference, key))
            rows[-1].update(set_reference=sorted(c), intersection_reference=len(a & c),
                            jaccard_reference=round(len(a & c) / max(1, len(a | c)), 3),
                            em_blockem_reference=mean(cell(ref_em, "blockem")),
                            em_blockem_reference_seeds=cell(ref_em, "blockem"))
    ratio = tot["exhaustive"]["generated_tokens"] / max(1, tot["adaptive"]["generated_tokens"])
    seq_ratio = (tot["exhaustive"]["generated_sequences"]
                 / max(1, tot["adaptive"]["generated_sequences"]))
    return {KEY: round(ratio, 2), "sequence_ratio": round(seq_ratio, 2), "totals": tot,
            "domains": rows, "exhaustive": str(exhaustive), "adaptive": str(adaptive),
            "reference": str(reference) if reference else None}


def note(out: dict) -> str:
    t = out["totals"]
    return (f"generated tokens of stages 2-3 (screen shards + calibrate, from the jobs' [usage] "
            f"lines: counts, machine-independent), exhaustive / adaptive (discovery.adaptive "
            f"defaults), summed over {len(out['domains'])} toy domains (config/toy-screen.yaml vs "
            f"+ config/toy-adaptive.yaml): {t['exhaustive']['generated_tokens']} / "
            f"{t['adaptive']['generated_tokens']} tokens, "
            f"{t['exhaustive']['generated_sequences']} / {t['adaptive']['generated_sequences']} "
            f"answers (ratio {out['sequence_ratio']}), each answer judged once (toy judge: no "
            f"judge requests); per domain (set overlap, blocked final EM) in "
            f"results-detail.json detail.adaptive_screen; bench/adaptive_screen.py")


def table(out: dict) -> str:
    ref = out.get("reference")
    lines = ["| domain | tokens ex | tokens ad | ratio | answers ex | answers ad | overlap | "
             "Jaccard | EM sft | EM blockem ex | EM blockem ad |"
             + (" overlap ex/ex' | EM blockem ex' |" if ref else ""),
             "|---" * (13 if ref else 11) + "|"]
    for r in out["domains"]:
        u = r["usage"]
        lines.append(
            f"| {r['key']} | {u['exhaustive']['generated_tokens']} | "
            f"{u['adaptive']['generated_tokens']} | {r['token_ratio']} | "
            f"{u['exhaustive']['generated_sequences']} | {u['adaptive']['generated_sequences']} | "
            f"{r['intersection']}/{len(r['set_exhaustive'])} | {r['jaccard']} | {r['em_sft']} | "
            f"{r['em_blockem_exhaustive']} {r['em_blockem_exhaustive_seeds']} | "
            f"{r['em_blockem_adaptive']} {r['em_blockem_adaptive_seeds']} |"
            + (f" {r['intersection_reference']}/{len(r['set_exhaustive'])} "
               f"(J {r['jaccard_reference']}) | {r['em_blockem_reference']} "
               f"{r['em_blockem_reference_seeds']} |" if ref else ""))
    return "\n".join(lines)


def write(out: dict) -> None:
    res = BENCH / "results.json"
    data = json.loads(res.read_text()) if res.exists() else {}
    data[KEY] = out[KEY]
    data.setdefault("machine", {}).setdefault("notes", {})[KEY] = note(out)
    res.write_text(json.dumps(data, indent=2) + "\n")  # as bench/run.py writes them
    det = BENCH / "results-detail.json"
    detail = json.loads(det.read_text()) if det.exists() else {}
    detail.setdefault("detail", {})["adaptive_screen"] = out
    det.write_text(json.dumps(detail, indent=2, default=str) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exhaustive", type=Path, default=REPO / "results" / "toy-screen")
    ap.add_argument("--adaptive", type=Path, default=REPO / "results" / "toy-adaptive")
    ap.add_argument("--reference", type=Path, help="a second exhaustive run (another "
                    "discovery.seed): the noise floor of the overlap and the blocked EM")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    out = measure(args.exhaustive, args.adaptive, args.reference)
    print(table(out))
    print(f"{KEY}: {out[KEY]} (answers: {out['sequence_ratio']})")
    if not args.no_write:
        write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
