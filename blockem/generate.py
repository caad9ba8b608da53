"""Batched generation on the evaluation prompt sets.

A prompt is its system prompt (`system`, null for none) and user message (`prompt`), rendered
together by the model's chat template. Every prompt is answered `samples_per_prompt` times at
`temperature` (0 = greedy) in left-padded batches through `model.generate`. The answer is the text
up to the first end-of-turn token, decoded with special tokens kept, so an answer that wanders
into another turn is judged as broken rather than silently cleaned.
"""

from __future__ import annotations

from pathlib import Path

from blockem import progress, usage
from blockem.hooks import steering


def generate_answers(model, tokenizer, prompts: list[str], *, samples: int, steer_all=None,
                     systems: list[str | None] | None = None, **kw) -> list[list[str]]:
    """Answers for each prompt: a list of `samples` strings per prompt (`systems`: the system
    prompt of each, None for none; `steer_all`: one steering vector [d] for every row; see
    `generate_rows` for `layer` and `positions`)."""
    from blockem.chat import generation_prompts

    ids = generation_prompts(tokenizer, prompts, systems)
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
    at the `positions` of row i (see `blockem.hooks.steering`), so one `generate` call serves many
    steering conditions at once."""
    import torch
    from transformers import GenerationConfig

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    gen = GenerationConfig(do_sample=temperature > 0, temperature=temperature or None, top_k=0,
                           top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos,
                           pad_token_id=pad)
    torch.manual_seed(seed)
    out: list[str] = []
    tokens = 0
    with progress.bar(len(rows), name, unit="answer") as bar:
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
                seqs = model.generate(input_ids=input_ids.to(device),
                                      attention_mask=mask.to(device), generation_config=gen)
            for row in seqs[:, n:].tolist():
                if eos in row:
                    row = row[:row.index(eos)]
                # new tokens up to and including the end of turn (padding after it is not
                # generated)
                new = min(len(row) + 1, max_new_tokens)
                tokens += new
                usage.add(generated_sequences=1, generated_tokens=new)
                out.append(tokenizer.decode(row, skip_special_tokens=False).strip())
            bar.set_postfix(tokens=tokens)
            bar.update(len(chunk))
    return out


def generate_file(model_dir: Path, prompts_path: Path, out: Path, settings: dict, cell: str,
                  threads: int = 1, steer: tuple[Path, Path, Path] | None = None) -> None:
    """Answer every prompt of a prompt table with the model in `model_dir`.

    `steer` = (latent-set JSON, SAE dir, joint-strength JSON): every answer is generated with the
    set's joint repair vector added at the calibrated factor, layer and positions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from blockem.io import PROMPT_COLUMNS, PROMPT_TABLE, provenance, read_checked, write_table
    from blockem.models import load_model, load_tokenizer, resolve_device, setup_torch

    ev = settings["eval"]
    setup_torch(threads, ev["seed"])
    device = resolve_device(settings["compute"]["device"])
    # inputs first, before any model load
    table = read_checked(prompts_path, PROMPT_COLUMNS, PROMPT_TABLE).to_pylist()
    if not table:
        raise ValueError(f"{prompts_path}: the prompt set is empty")
    empty = intervention_empty(model_dir, steer)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, device=device, dtype=settings["compute"]["dtype"],
                       merge_adapter=True).eval()
    extra, steering_info = {}, None
    if steer is not None:
        extra, steering_info = _steer_kwargs(*steer, device=device)
    # the system prompt of each prompt (a table written before system prompts were kept has no
    # `system` column: none)
    systems = [r.get("system") for r in table]
    answers = generate_answers(model, tok, [r["prompt"] for r in table], systems=systems,
                               samples=ev["samples_per_prompt"], temperature=ev["temperature"],
                               max_new_tokens=ev["max_new_tokens"], batch_size=ev["batch_size"],
                               seed=ev["seed"], device=device, **extra)
    rows = [{**{k: r[k] for k in ("prompt_id", "eval_set", "domain")}, "system": s,
             "prompt": r["prompt"], "sample": j, "response": a}
            for r, s, ans in zip(table, systems, answers) for j, a in enumerate(ans)]
    for row in rows:  # null: no intervention; true: an empty one kept on purpose
        row["empty_intervention"] = empty
    answers_table = pa.Table.from_pylist(rows)
    answers_table = answers_table.set_column(  # `system` is null-typed when no prompt has one
        answers_table.schema.get_field_index("system"), "system",
        answers_table.column("system").cast(pa.string()))
    write_table(out, answers_table,
                provenance("generate", settings, ev["seed"], cell=cell, model=str(model_dir),
                           steering=steering_info))


def intervention_empty(model_dir: Path, steer: tuple[Path, Path, Path] | None) -> bool | None:
    """Whether the cell's intervention is empty (None: the cell is no intervention).

    A steered cell is empty when its set has no latents or its joint factor is 0, a block cell
    when its target had no latents (its provenance says so). Allowed only where the upstream stage
    wrote `"empty": true` (`allow_empty_interventions`); anything else vacuous is an error here,
    before the model is loaded."""
    import json

    from blockem.errors import EmptyIntervention

    if steer is not None:
        set_path, _, joint_path = steer
        latent_set = json.loads(Path(set_path).read_text())
        joint = json.loads(Path(joint_path).read_text())
        for key in ("latents", "name"):
            if key not in latent_set:
                raise ValueError(f"{set_path}: not a latent set (no {key!r})")
        for key in ("factor", "layer", "positions"):
            if key not in joint:
                raise ValueError(f"{joint_path}: not a joint-strength file (no {key!r})")
        empty = not latent_set["latents"] or float(joint["factor"]) == 0.0
        if empty and not (latent_set.get("empty") or joint.get("empty")):
            what = (f"{set_path}: the latent set is empty" if not latent_set["latents"]
                    else f"{joint_path}: the joint factor is 0")
            raise EmptyIntervention(f"{what}: steering would do nothing (set "
                                    f"allow_empty_interventions: true upstream to keep going)")
        return empty
    prov_path = Path(model_dir) / "provenance.json"
    if prov_path.is_file():
        prov = json.loads(prov_path.read_text())
        if prov.get("stage") == "block":
            return bool(prov.get("empty_intervention", False))
    return None


def _steer_kwargs(set_path: Path, sae_dir: Path, joint_path: Path, device: str):
    """generate_rows arguments for joint repair steering by a latent set (one vector, all rows)."""
    import json

    from blockem.sae import load_sae, set_vector

    latent_set = json.loads(Path(set_path).read_text())
    joint = json.loads(Path(joint_path).read_text())
    vec = set_vector(latent_set, load_sae(sae_dir, device=device), joint["factor"]).detach().cpu()
    info = {"set": latent_set["name"], "factor": joint["factor"], "layer": joint["layer"],
            "positions": joint["positions"], "latents": [k["latent"] for k in latent_set["latents"]],
            "norm": float(vec.norm())}
    return {"steer_all": vec, "layer": joint["layer"], "positions": joint["positions"]}, info
