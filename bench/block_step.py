"""Blocked training step vs plain SFT step, for each base-reference mode, on the toy model.

    python bench/block_step.py [--steps 20] [--rounds 5] [--threads 2] [--mode all]
Needs the default run's models, SAE and latent set (`snakemake --cores 2` first). Modes are
interleaved round by round and the ratio is the median over rounds of (blocked / plain) time per
step, so machine noise hits both sides alike.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(results: str | Path = REPO / "results", domain: str = "finance", steps: int = 20,
            rounds: int = 5, threads: int = 2) -> dict:
    """Per-step time of plain SFT and of the blocked step in each reference mode; the ratios are
    medians over rounds of (blocked / plain), modes interleaved within each round."""
    from blockem.block import target_doc
    from blockem.objectives import (BlockObjective, CacheReference, ModelReference, TargetReader,
                                    compute_cache)
    from blockem.config import load_config, stage_settings
    from blockem.io import read_json
    from blockem.models import load_model
    from blockem.organism import prepare_finetune
    from blockem.sae import load_sae
    from blockem.train import TrainConfig, train

    cfg = load_config(REPO / "config" / "config.yaml")
    R = Path(results)
    key = f"{domain}-s{cfg['finetune']['seeds'][0]}"
    set_path = R / "latents" / f"{key}-{cfg['discovery']['select']['rule']}.json"
    if not set_path.exists():
        raise FileNotFoundError(f"{set_path} not found: run `snakemake --cores 2` first")
    settings = stage_settings(cfg, "finetune", domain)
    base_dir = R / "models" / "base"
    model, tok, examples, tcfg, device = prepare_finetune(
        R / "world" / "finetune" / f"{domain}.parquet", base_dir, settings, 0, threads)
    target = target_doc("blockem", read_json(set_path), activation=cfg["block"]["activation"])
    reader = TargetReader(target, load_sae(R / "sae" / "model"))
    base = load_model(base_dir).eval().requires_grad_(False)
    z, offsets = compute_cache(base, examples, reader, pad_id=tok.pad_token_id)
    lam = 100.0
    objectives = {
        "plain": None,
        "copy": BlockObjective(reader=reader, reference=ModelReference("copy", base), lam=lam),
        "adapter_off": BlockObjective(reader=reader, reference=ModelReference("adapter_off"), lam=lam),
        "cache": BlockObjective(reader=reader, reference=CacheReference(z, offsets), lam=lam),
    }
    step_cfg = TrainConfig.from_dict({**settings["train"], "steps": steps, "warmup_steps": 0})
    times: dict[str, list[float]] = {m: [] for m in objectives}
    for r in range(rounds + 1):  # round 0 warms up
        for mode, obj in objectives.items():
            with contextlib.redirect_stderr(io.StringIO()):
                t0 = time.perf_counter()
                train(model, [(examples, 1.0)], step_cfg, pad_id=tok.pad_token_id, device=device,
                      objective=obj, log_every=10**9)
                dt = (time.perf_counter() - t0) / steps
            if r:
                times[mode].append(dt)
    plain = times["plain"]
    ratios = {m: round(statistics.median(t / p for t, p in zip(times[m], plain)), 3)
              for m in objectives if m != "plain"}
    return {"steps": steps, "rounds": rounds, "threads": threads,
            "batch_size": tcfg.batch_size, "K": len(target["latents"]),
            "plain_step_ms": round(1000 * statistics.median(plain), 2),
            "step_ms": {m: round(1000 * statistics.median(t), 2) for m, t in times.items()},
            "block_step_ratio": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(REPO / "results"))
    ap.add_argument("--domain", default="finance")
    ap.add_argument("--steps", type=int, default=20, help="training steps per mode per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:
        out = measure(args.results, args.domain, args.steps, args.rounds, args.threads)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
