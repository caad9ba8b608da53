"""The base model's own chats: its answers to a file of diverse prompts, for the SAE corpus.

An SAE trained only on the narrow fine-tuning chats and the evaluation questions sees a thin slice
of what the model's residual stream does. `discovery.sae.self_chats` adds the base's own answers
to a few hundred everyday prompts (a text file, one prompt per line), sampled at the evaluation's
temperature, so the SAE also learns the model's ordinary answering. The chats are written as a
chat table (`messages`) that `blockem.sae` reads beside the prepared corpus.
"""

from __future__ import annotations

from pathlib import Path


def read_prompt_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines; duplicates are an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file (discovery.sae.self_chats.prompts)")
    seen: dict[str, int] = {}
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        p = line.strip()
        if not p:
            continue
        if p in seen:
            raise ValueError(f"{path}:{n}: duplicate prompt (first on line {seen[p]})")
        seen[p] = n
        out.append(p)
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def self_chats_stage(base_dir: Path, prompts_path: Path, out: Path, settings: dict,
                     threads: int = 1) -> None:
    """Generate one answer per prompt with the base; write a chat table."""
    import pyarrow as pa

    from blockem.generate import generate_answers
    from blockem.io import provenance, write_table
    from blockem.models import load_model, load_tokenizer, resolve_device, setup_torch

    sc = settings["self_chats"]
    prompts = read_prompt_lines(prompts_path)[:sc["n"]]  # inputs first
    setup_torch(threads, sc["seed"])
    device = resolve_device(settings["compute"]["device"])
    tok = load_tokenizer(base_dir)
    model = load_model(base_dir, device=device, dtype=settings["compute"]["dtype"]).eval()
    answers = generate_answers(model, tok, prompts, samples=1, temperature=sc["temperature"],
                               max_new_tokens=sc["max_new_tokens"], batch_size=sc["batch_size"],
                               seed=sc["seed"], device=device, name="self_chats")
    eos = tok.eos_token or ""
    rows = [{"domain": "self", "messages": [{"role": "user", "content": p},
                                             {"role": "assistant",
                                              "content": a[0].replace(eos, "").strip() or "..."}]}
            for p, a in zip(prompts, answers)]
    write_table(out, pa.Table.from_pylist(rows),
                provenance("self_chats", settings, sc["seed"], prompts=str(prompts_path)))
