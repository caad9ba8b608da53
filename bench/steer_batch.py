"""Stage-2 screen: batched steering (one generate call for many conditions) vs one call each.

Times the same screen both ways on the default organism and prints the ratio:
    python bench/steer_batch.py [--latents 16] [--samples N] [--batch-size N] [--threads 2]
Needs the default run's models (`snakemake --cores 2` first). The steering directions are random
unit vectors at the SAE scale: the cost of a screen does not depend on which latents it tests.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(REPO / "results"))
    ap.add_argument("--domain", default="finance")
    ap.add_argument("--latents", type=int, default=16)
    ap.add_argument("--samples", type=int, default=0, help="default: discovery.screen")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=0, help="rows per generate call (default: eval.batch_size)")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch

    from blockem.config import load_config
    from blockem.models import load_model, load_tokenizer, setup_torch
    from blockem.steer import judge_conditions

    cfg = load_config(REPO / "config" / "config.yaml")
    disc = cfg["discovery"]
    samples = args.samples or disc["screen"]["samples_per_prompt"]
    R = Path(args.results)
    base_dir = R / "models" / "base"
    mis_dir = R / "models" / "sft" / f"{args.domain}-s{cfg['finetune']['seeds'][0]}"
    if not mis_dir.exists():
        raise SystemExit(f"{mis_dir} not found: run `snakemake --cores 2` first")
    setup_torch(args.threads, 0)
    tok = load_tokenizer(base_dir)
    models = {"induce": load_model(base_dir).eval(), "repair": load_model(mis_dir, merge_adapter=True).eval()}
    prompts = [r for r in pq.read_table(R / "world" / "prompts.parquet").to_pylist()
               if r["eval_set"] == "core" and r["domain"] != args.domain]
    d = models["induce"].config.hidden_size
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(args.latents, d, generator=g), dim=-1)
    scale = 12.5  # about the toy's median residual norm at layer 2
    vectors = torch.cat([torch.zeros(1, d), disc["screen"]["alpha"] * scale * dirs])
    gen = {"temperature": disc["temperature"], "max_new_tokens": disc["max_new_tokens"],
           "batch_size": args.batch_size or disc["batch_size"], "positions": disc["steer_positions"]}
    kw = dict(layer=disc["layer"], samples=samples, gen=gen, seed=0)

    def batched():
        for model in models.values():
            judge_conditions(model, tok, prompts, vectors, **kw)

    def one_by_one():
        for model in models.values():
            for v in vectors:
                judge_conditions(model, tok, prompts, v[None], **kw)

    import contextlib
    import io

    times = {}
    for name, fn in (("batched", batched), ("per_condition", one_by_one)):
        with contextlib.redirect_stderr(io.StringIO()):
            t0 = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - t0
    conditions = 2 * len(vectors)
    ratio = times["per_condition"] / times["batched"]
    print(json.dumps({"conditions": conditions, "prompts": len(prompts), "samples": samples,
                      "batch_size": gen["batch_size"],
                      "batched_s": round(times["batched"], 2),
                      "per_condition_s": round(times["per_condition"], 2),
                      "steer_batch_speedup": round(ratio, 1)}, indent=2))


if __name__ == "__main__":
    main()
