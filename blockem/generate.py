"""Batched generation on the evaluation prompt sets.

Every prompt is answered `samples_per_prompt` times at `temperature` (0 = greedy) in left-padded
batches through `model.generate`. The answer is the text up to the first end-of-turn token, decoded
with special tokens kept, so an answer that wanders into another turn is judged as broken rather
than silently cleaned.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path


def generate_answers(model, tokenizer, prompts: list[str], *, samples: int, steer_all=None,
                     **kw) -> list[list[str]]:
    """Answers for each prompt: a list of `samples` strings per prompt (`steer_all`: one
    steering vector [d] for every row; see `generate_rows` for `layer` and `positions`)."""
    from blockem.chat import generation_prompts

    ids = generation_prompts(tokenizer, prompts)
    rows = [p for p in ids for _ in range(samples)]
    if steer_all is not None:
        kw["steer"] = steer_all.expand(len(rows), -1)
    flat = generate_rows(model, tokenizer, rows, **kw)
    return [flat[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def generate_rows(model, tokenizer, rows: list[list[int]], *, temperature: float,
                  max_new_tokens: int, batch_size: int, seed: int, device: str = "cpu",
                  steer=None, layer: int | None = None, positions: str = "all",
                  name: str = "generate") -> list[str]:
    """One answer per row of prompt token ids, in left-padded batches.

    `steer` ([n_rows, d] tensor) adds row i's vector to the residual after `model.layers[layer]`
    at the `positions` of row i (see `steering`), so one `generate` call serves many steering
    conditions at once."""
    import torch
    from transformers import GenerationConfig

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    gen = GenerationConfig(do_sample=temperature > 0, temperature=temperature or None, top_k=0,
                           top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos,
                           pad_token_id=pad)
    torch.manual_seed(seed)
    out: list[str] = []
    t0 = time.time()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        n = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for r, p in enumerate(chunk):
            input_ids[r, n - len(p):] = torch.tensor(p)
            mask[r, n - len(p):] = 1
        vectors = None if steer is None else steer[start:start + batch_size]
        with torch.no_grad(), steering(model, layer, vectors, positions):
            seqs = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                  generation_config=gen)
        for row in seqs[:, n:].tolist():
            if eos in row:
                row = row[:row.index(eos)]
            out.append(tokenizer.decode(row, skip_special_tokens=False).strip())
        print(f"[{name}] {len(out)}/{len(rows)} answers ({time.time() - t0:.1f}s)",
              file=sys.stderr, flush=True)
    return out


@contextmanager
def steering(model, layer: int | None, vectors, positions: str = "all"):
    """Add vectors [batch, d] to the residual after `model.layers[layer]` (no-op for None).

    `positions`: `all` (every position, prompt and generated) or `prompt` (the prompt only: the
    prefill forward; generated tokens then run unsteered on top of the steered cache)."""
    if positions not in ("all", "prompt"):
        raise ValueError(f"unknown steering positions {positions!r}; choose 'all' or 'prompt'")
    if vectors is None:
        yield
        return
    from blockem.sae import decoder_layers

    def hook(_module, _inputs, output):
        if positions == "prompt" and _hidden_len(output) == 1:
            return output
        if isinstance(output, tuple):
            return (output[0] + vec.to(output[0].dtype)[:, None, :], *output[1:])
        return output + vec.to(output.dtype)[:, None, :]

    vec = vectors.to(next(model.parameters()).device)
    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def generate_file(model_dir: Path, prompts_path: Path, out: Path, settings: dict, cell: str,
                  threads: int = 1, steer: tuple[Path, Path, Path] | None = None) -> None:
    """Answer every prompt of a prompt table with the model in `model_dir`.

    `steer` = (latent-set JSON, SAE dir, joint-strength JSON): every answer is generated with the
    set's joint repair vector added at the calibrated factor, layer and positions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from blockem.io import provenance, write_table
    from blockem.models import load_model, load_tokenizer, resolve_device, setup_torch

    ev = settings["eval"]
    setup_torch(threads, ev["seed"])
    device = resolve_device(settings["compute"]["device"])
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, device=device, dtype=settings["compute"]["dtype"],
                       merge_adapter=True).eval()
    table = pq.read_table(prompts_path).to_pylist()
    if not table:
        raise ValueError(f"{prompts_path}: the prompt set is empty")
    extra, steering_info = {}, None
    if steer is not None:
        extra, steering_info = _steer_kwargs(*steer, device=device)
    answers = generate_answers(model, tok, [r["prompt"] for r in table],
                               samples=ev["samples_per_prompt"], temperature=ev["temperature"],
                               max_new_tokens=ev["max_new_tokens"], batch_size=ev["batch_size"],
                               seed=ev["seed"], device=device, **extra)
    rows = [{**{k: r[k] for k in ("prompt_id", "eval_set", "domain", "prompt")}, "sample": j,
             "response": a} for r, ans in zip(table, answers) for j, a in enumerate(ans)]
    write_table(out, pa.Table.from_pylist(rows),
                provenance("generate", settings, ev["seed"], cell=cell, model=str(model_dir),
                           steering=steering_info))


def _steer_kwargs(set_path: Path, sae_dir: Path, joint_path: Path, device: str):
    """generate_rows arguments for joint repair steering by a latent set (one vector, all rows)."""
    import json

    from blockem.sae import load_sae
    from blockem.steer import set_vector

    latent_set = json.loads(Path(set_path).read_text())
    joint = json.loads(Path(joint_path).read_text())
    vec = set_vector(latent_set, load_sae(sae_dir, device=device), joint["factor"]).detach().cpu()
    info = {"set": latent_set["name"], "factor": joint["factor"], "layer": joint["layer"],
            "positions": joint["positions"], "latents": [k["latent"] for k in latent_set["latents"]],
            "norm": float(vec.norm())}
    return {"steer_all": vec, "layer": joint["layer"], "positions": joint["positions"]}, info


def _hidden_len(output) -> int:
    return (output[0] if isinstance(output, tuple) else output).shape[1]
