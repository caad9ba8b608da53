"""Stage-2 screen: batched steering (one generate call for many conditions) vs one call each.

Times the same screen both ways on the default organism and prints the ratio:
    python bench/steer_batch.py [--latents 16] [--samples N] [--batch-size N] [--threads 2]
                                [--rounds 5]
Needs the default run's models (`snakemake --cores 2` first). The steering directions are random
unit vectors at the SAE scale: the cost of a screen does not depend on which latents it tests.
After a warm-up, both ways are timed `--rounds` times, the order alternating round by round; the
speedup is the median of the per-round ratios (one timing each way once read 9x on a busy
machine where a quiet one reads ~1.3-1.8x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(results: str | Path = REPO / "results", domain: str = "finance", latents: int = 16,
            samples: int = 0, threads: int = 2, batch_size: int = 0, rounds: int = 5) -> dict:
    """Seconds for the screen batched (one generate call serves many conditions) and one
    condition per call, medians over `rounds` (order alternating); `samples`/`batch_size` 0 take
    the config's discovery settings."""
    import contextlib
    import io

    import pyarrow.parquet as pq
    import torch

    from blockem.config import load_config
    from blockem.models import load_model, load_tokenizer, setup_torch
    from blockem.steer import judge_conditions

    cfg = load_config(REPO / "config" / "config.yaml")
    disc = cfg["discovery"]
    samples = samples or disc["screen"]["samples_per_prompt"]
    R = Path(results)
    base_dir = R / "models" / "base"
    mis_dir = R / "models" / "sft" / f"{domain}-s{cfg['finetune']['seeds'][0]}"
    if not mis_dir.exists():
        raise FileNotFoundError(f"{mis_dir} not found: run `snakemake --cores 2` first")
    setup_torch(threads, 0)
    tok = load_tokenizer(base_dir)
    models = {"induce": load_model(base_dir).eval(), "repair": load_model(mis_dir, merge_adapter=True).eval()}
    prompts = [r for r in pq.read_table(R / "world" / "prompts.parquet").to_pylist()
               if r["eval_set"] == "core" and r["domain"] != domain]
    d = models["induce"].config.hidden_size
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(latents, d, generator=g), dim=-1)
    scale = 12.5  # about the toy's median residual norm at layer 2
    vectors = torch.cat([torch.zeros(1, d), disc["screen"]["alpha"] * scale * dirs])
    gen = {"temperature": disc["temperature"], "max_new_tokens": disc["max_new_tokens"],
           "batch_size": batch_size or disc["batch_size"], "positions": disc["steer_positions"]}
    kw = {"layer": disc["layer"], "samples": samples, "gen": gen, "seed": 0}

    def batched():
        for model in models.values():
            judge_conditions(model, tok, prompts, vectors, **kw)

    def one_by_one():
        for model in models.values():
            for v in vectors:
                judge_conditions(model, tok, prompts, v[None], **kw)

    def timed(fn) -> float:
        with contextlib.redirect_stderr(io.StringIO()):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

    # warm up (lazy imports, first-call allocations), then alternate the order round by round so
    # machine noise hits both ways alike; the speedup is the median of the per-round ratios
    timed(lambda: [judge_conditions(m, tok, prompts, vectors[:1], **kw) for m in models.values()])
    times: dict[str, list[float]] = {"batched": [], "per_condition": []}
    for r in range(rounds):
        order = (("batched", batched), ("per_condition", one_by_one))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name].append(timed(fn))
    ratios = [p / b for p, b in zip(times["per_condition"], times["batched"])]
    return {"conditions": 2 * len(vectors), "prompts": len(prompts), "samples": samples,
            "batch_size": gen["batch_size"], "threads": threads, "rounds": rounds,
            "batched_s": round(statistics.median(times["batched"]), 2),
            "per_condition_s": round(statistics.median(times["per_condition"]), 2),
            "ratios": [round(x, 2) for x in ratios],
            "ratio_of_minima": round(min(times["per_condition"]) / min(times["batched"]), 2),
            "steer_batch_speedup": round(statistics.median(ratios), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(REPO / "results"))
    ap.add_argument("--domain", default="finance")
    ap.add_argument("--latents", type=int, default=16)
    ap.add_argument("--samples", type=int, default=0, help="default: discovery.screen")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=0, help="rows per generate call (default: eval.batch_size)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (order alternating)")
    args = ap.parse_args()
    try:
        out = measure(args.results, args.domain, args.latents, args.samples, args.threads,
                      args.batch_size, args.rounds)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
