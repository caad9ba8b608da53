"""Stage 1: the activation shift of every SAE latent between the base and the misaligned model.

    Delta_k = E_x[ mean_t z_k^mis(x_t) ] - E_x[ mean_t z_k^base(x_t) ]

over the `core` prompts (outside the fine-tuning domain). Token scope: `prompt` (the rendered chat
prompt, with its system prompt if it has one, up to and including the assistant header, which is
the position that predicts the first answer token), `response` (each model's own sampled answers
to those prompts, teacher-forced) or `all` (both). Also writes the mean-difference "misalignment direction"
at layer L (mean residual of mis minus base over the same tokens), a baseline for blocking.
"""

from __future__ import annotations

from pathlib import Path

SCOPES = ("prompt", "response", "all")


def token_batches(tokenizer, prompts: list[str], responses: list[str] | None, scope: str,
                  batch_size: int, systems: list[str | None] | None = None):
    """Right-padded batches with a `select` mask over the scope's tokens (one row per prompt;
    `systems`: each prompt's system prompt, None for none)."""
    from blockem.chat import IGNORE, Example, collate, generation_prompts

    if scope not in SCOPES:
        raise ValueError(f"unknown token scope {scope!r}; choose from {SCOPES}")
    if scope != "prompt" and responses is None:
        raise ValueError(f"token scope {scope!r} needs the models' responses")
    examples = []
    for i, p in enumerate(generation_prompts(tokenizer, prompts, systems)):
        r = [] if scope == "prompt" else tokenizer(
            responses[i], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sel = [scope != "response"] * len(p) + [True] * len(r)
        ids = p + r
        examples.append(Example(ids, [t if s else IGNORE for t, s in zip(ids, sel)]))
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], tokenizer.pad_token_id)
        batch["select"] = batch.pop("labels") != IGNORE
        yield batch


def per_prompt_means(model, sae, tokenizer, prompts, responses, *, layer: int, scope: str,
                     activation: str, batch_size: int = 64, device: str = "cpu", systems=None,
                     drop_first: bool = False, name: str = "shift"):
    """Per prompt: mean latent activation over its scope tokens [n, d_sae], the per-token activity
    (z > 0) summed per latent [d_sae] with its token count, and mean residual [n, d] (`name`:
    the progress bar's)."""
    import torch

    from blockem.sae import latent_activation, residuals

    h, row = residuals(model, token_batches(tokenizer, prompts, responses, scope, batch_size,
                                            systems), layer, device, drop_first,
                       desc=name, total=len(prompts))
    with torch.no_grad():
        z = latent_activation(sae, h.to(sae.W_enc.device), activation).float().cpu()
    n = len(prompts)
    counts = torch.bincount(row, minlength=n).clamp_min(1).float()[:, None]
    z_mean = torch.zeros(n, z.shape[1]).index_add_(0, row, z) / counts
    h_mean = torch.zeros(n, h.shape[1]).index_add_(0, row, h) / counts
    return z_mean, (z > 0).float().sum(0), z.shape[0], h_mean


def activation_shift(base, mis, sae, tokenizer, prompts, *, layer: int, scope: str,
                     activation: str, base_responses=None, mis_responses=None, device="cpu",
                     systems=None, drop_first: bool = False):
    """Delta per latent with both models' means and densities, plus the mean-difference direction
    (`systems`: each prompt's system prompt, None for none)."""
    zb, act_b, nb, hb = per_prompt_means(base, sae, tokenizer, prompts, base_responses, layer=layer,
                                         scope=scope, activation=activation, device=device,
                                         systems=systems, drop_first=drop_first,
                                         name="shift base")
    zm, act_m, nm, hm = per_prompt_means(mis, sae, tokenizer, prompts, mis_responses, layer=layer,
                                         scope=scope, activation=activation, device=device,
                                         systems=systems, drop_first=drop_first,
                                         name="shift misaligned")
    table = {"latent": list(range(zb.shape[1])),
             "mean_base": zb.mean(0).tolist(), "mean_mis": zm.mean(0).tolist(),
             "delta": (zm.mean(0) - zb.mean(0)).tolist(),
             "density_base": (act_b / nb).tolist(), "density_mis": (act_m / nm).tolist()}
    direction = hm.mean(0) - hb.mean(0)
    return table, direction


def candidate_pool(table: dict, per_sign: int, dense_threshold: float, exclude_dense: bool):
    """Sign-aware pool: the top `per_sign` latents by positive Delta and by negative Delta.

    Adds columns `dense` (active on more than `dense_threshold` of tokens in both models), `sign`
    (+1 rises under misalignment, -1 falls) and `candidate_rank` (0-based rank within its sign,
    -1 outside the pool)."""
    n = len(table["latent"])
    dense = [min(table["density_base"][i], table["density_mis"][i]) > dense_threshold
             for i in range(n)]
    delta = table["delta"]
    ok = [i for i in range(n) if not (exclude_dense and dense[i])]
    pos = sorted((i for i in ok if delta[i] > 0), key=lambda i: -delta[i])[:per_sign]
    neg = sorted((i for i in ok if delta[i] < 0), key=lambda i: delta[i])[:per_sign]
    rank = [-1] * n
    for lst in (pos, neg):
        for r, i in enumerate(lst):
            rank[i] = r
    table = dict(table)
    table["dense"] = dense
    table["sign"] = [1 if d > 0 else -1 if d < 0 else 0 for d in delta]
    table["candidate_rank"] = rank
    return table, pos + neg


def load_discovery(settings, base_dir, mis_dir, sae_dir, prompts_path, threads: int = 1,
                   with_base: bool = True, judge_cache=None, mc=None):
    """Tokenizer, SAE, base (unless `with_base` is off) and (merged) misaligned model, the core
    prompts outside the fine-tuning domain, the layer, the steering scale and the judge (a
    `Labeller` of settings' `judge`, default the toy's exact judge) for stages 1-3."""
    from blockem.io import PROMPT_COLUMNS, PROMPT_TABLE, read_checked
    from blockem.judge.llm import Labeller
    from blockem.models import load_model, load_tokenizer, resolve_device, setup_torch
    from blockem.sae import load_sae, read_meta, steering_scale

    setup_torch(threads, None)
    device, dtype = resolve_device(settings["compute"]["device"]), settings["compute"]["dtype"]
    prompts = [r for r in read_checked(prompts_path, PROMPT_COLUMNS, PROMPT_TABLE).to_pylist()
               if r["eval_set"] == "core" and r["domain"] != settings["domain"]]
    meta = read_meta(sae_dir)
    if not prompts:
        raise ValueError(f"{prompts_path}: no core prompts outside domain {settings['domain']!r}")
    mc_rows = load_mc(settings, mc)
    # judges: endpoints, keys and prompt files checked before any model load
    judge = Labeller(settings.get("judge") or {"kind": "toy"}, judge_cache)
    return dict(tok=load_tokenizer(base_dir), sae=load_sae(sae_dir, device=device),
                base=load_model(base_dir, device=device, dtype=dtype).eval() if with_base else None,
                mis=load_model(mis_dir, device=device, dtype=dtype, merge_adapter=True).eval(),
                prompts=prompts, layer=meta["layer"], device=device,
                scale=steering_scale(meta, settings["discovery"]["scale"]),
                judge=judge, mc=mc_rows, drop_first=bool(meta.get("drop_first_token", False)),
                max_length=(settings.get("mc") or {}).get("max_length"))


def load_mc(settings: dict, mc) -> tuple[list[dict], list[dict]] | None:
    """The core MC items outside the fine-tuned domain and the neutral answers, for
    `discovery.scorer: mc` (`mc` = (items, neutral) tables written by `mc_items`)."""
    d = settings["discovery"]
    if d.get("scorer", "generate") != "mc":
        return None
    if mc is None:
        raise ValueError("discovery.scorer: mc needs the MC item and neutral tables (--mc-items, "
                         "--mc-neutral)")
    if d["steer_positions"] != "all":
        raise ValueError("discovery.scorer: mc scores answers teacher-forced, steered at every "
                         "position: set discovery.steer_positions: all")
    from blockem.io import read_checked
    from blockem.mc import ITEM_FIELDS, NEUTRAL_FIELDS

    items = [r for r in read_checked(mc[0], ITEM_FIELDS, "an MC item table").to_pylist()
             if r["split"] == "core" and r["domain"] != settings["domain"]]
    if not items:
        raise ValueError(f"{mc[0]}: no core MC items outside domain {settings['domain']!r}")
    neutral = read_checked(mc[1], NEUTRAL_FIELDS, "an MC neutral table").to_pylist()
    return items, neutral



def shift_stage(base_dir: Path, mis_dir: Path, sae_dir: Path, prompts_path: Path,
                generations: tuple[Path, Path] | None, out: Path, direction_out: Path,
                settings: dict, threads: int = 1) -> None:
    """Stage 1 on the core prompts outside the fine-tuning domain; writes shift.parquet and the
    mean-difference direction (safetensors)."""
    import pyarrow as pa
    from safetensors.torch import save_file

    from blockem.io import atomic_path, provenance, write_table

    d = settings["discovery"]
    ctx = load_discovery(settings, base_dir, mis_dir, sae_dir, prompts_path, threads)
    prompts = ctx["prompts"]
    responses = (None, None)
    if d["token_scope"] != "prompt":
        responses = tuple(_first_responses(g, [p["prompt_id"] for p in prompts]) for g in generations)
    table, direction = activation_shift(
        ctx["base"], ctx["mis"], ctx["sae"], ctx["tok"], [p["prompt"] for p in prompts],
        layer=ctx["layer"], scope=d["token_scope"], activation=d["activation"],
        base_responses=responses[0], mis_responses=responses[1], device=ctx["device"],
        systems=[p.get("system") for p in prompts], drop_first=ctx["drop_first"])
    table, _ = candidate_pool(table, d["candidates_per_sign"], d["dense_threshold"],
                              d["exclude_dense"])
    prov = provenance("shift", settings, None, layer=ctx["layer"], n_prompts=len(prompts))
    write_table(out, pa.Table.from_pydict(table), prov)
    with atomic_path(direction_out) as tmp:
        save_file({"direction": direction.contiguous()}, str(tmp),
                  metadata={"layer": str(ctx["layer"]), "config_hash": prov["config_hash"]})


def _first_responses(generations: Path, prompt_ids: list[str]) -> list[str]:
    import pyarrow.parquet as pq

    first = {}
    for r in pq.read_table(generations, columns=["prompt_id", "sample", "response"]).to_pylist():
        if r["sample"] == 0:
            first[r["prompt_id"]] = r["response"]
    missing = [p for p in prompt_ids if p not in first]
    if missing:
        raise ValueError(f"{generations}: no answer for prompt {missing[0]!r}")
    return [first[p] for p in prompt_ids]
