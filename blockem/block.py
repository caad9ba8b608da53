"""BLOCK-EM (stage 4) stages: the blocking target of a grid run, the cached base latents, and the
blocked fine-tune of one grid run.

A blocking target is a JSON file (`target_doc`): the layer, and either SAE latents with signs
(read with the latent activation of discovery) or one direction (the `direction` baseline: the
projection onto the unit mean-difference direction, sign +1). Which latents, and how they are
derived from a discovery set (`kpos_only` keeps K+, `shuffled_signs` shuffles the signs...), is the
method's (`blockem.methods`, one module per method).

`train_stage` fine-tunes the base with the method's objective (`blockem.objectives`: SFT + lam *
L_block, or + lam * KL, or plain SFT), training only layers <= L for a `freeze_above` method,
over several epochs for a `multi_epoch` one, on the method's training pools and inside its hook
when it has them (`Method.pools`, `Method.hook`, given a `TrainContext`).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from blockem import methods
from blockem.objectives import (BlockObjective, CacheReference, ModelReference, TargetReader,
                                _cache_key, compute_cache)


# --- blocking targets -------------------------------------------------------------------------

def target_doc(method: str, latent_set: dict | None, direction=None, *, seed: int = 0,
               name: str = "", activation: str | None = None, size: int | None = None,
               allow_empty: bool = False) -> dict:
    """The blocking target of a method, from a discovery latent set (or the direction).

    `activation` overrides the set's latent activation; `size` keeps the set's first `size`
    latents (sets are stored best first), then the method's `derive` (if any) makes the pairs to
    block. A target left with no latents is an error (`EmptyIntervention`) unless `allow_empty`:
    then it is written with `"empty": true` and its cells train without the penalty."""
    from blockem.errors import EmptyIntervention

    m = methods.get(method)
    if m.needs == "direction":
        if direction is None:
            raise ValueError(f"method {method!r} needs the mean-difference direction")
        return {"name": name, "method": method, "kind": "direction", "layer": latent_set["layer"],
                "direction": [float(x) for x in direction], "latents": [0], "signs": [1]}
    if m.needs != "latents":
        latent = sorted(n for n, x in methods.REGISTRY.items() if x.needs == "latents")
        raise ValueError(f"method {method!r} blocks no latents; choose from {latent}")
    pairs = [(int(k["latent"]), int(k["sign"])) for k in latent_set["latents"]][:size]
    if m.derive is not None:
        pairs = m.derive(pairs, seed)
    if not pairs and not allow_empty:
        raise EmptyIntervention(
            f"{latent_set.get('name', 'latent set')}: method {method!r} leaves no latents to "
            f"block (the set has {len(latent_set['latents'])}); its cells would be plain SFT "
            f"under the method's name (allow_empty_interventions: true keeps going)")
    return {"name": name, "method": method, "kind": "sae", "layer": latent_set["layer"],
            "activation": activation or latent_set["activation"], "sae": latent_set["sae"],
            "source_set": latent_set.get("name"), "latents": [k for k, _ in pairs],
            "signs": [s for _, s in pairs], "empty": not pairs}


# --- stages -----------------------------------------------------------------------------------

def target_stage(method: str, set_paths: list[Path], out: Path, settings: dict, *,
                 direction_path: Path | None = None, size: int | None = None) -> None:
    """Write the blocking target of `method`, derived from a discovery latent set (or the union
    of several, e.g. a domain's set and the set re-discovered on a re-emerged checkpoint)."""
    from blockem.io import provenance, read_json, write_json
    from blockem.select import union_sets

    sets = [read_json(p) for p in set_paths]
    latent_set = sets[0] if len(sets) == 1 else union_sets(sets, Path(out).stem)
    direction = None
    if methods.get(method).needs == "direction":
        from safetensors.torch import load_file

        direction = load_file(str(direction_path))["direction"].tolist()
    doc = target_doc(method, latent_set, direction, seed=settings["seed"], name=Path(out).stem,
                     activation=settings["activation"], size=size,
                     allow_empty=bool(settings.get("allow_empty_interventions")))
    doc["provenance"] = provenance("block_target", settings, settings["seed"])
    write_json(out, doc)


def check_target(target: dict, path) -> None:
    """A blocking target file as `target_stage` writes it; an empty one only if marked so."""
    from blockem.errors import EmptyIntervention

    missing = [k for k in ("name", "kind", "layer", "latents", "signs") if k not in target]
    if missing:
        raise ValueError(f"{path}: not a blocking target (missing {missing})")
    if len(target["latents"]) != len(target["signs"]):
        raise ValueError(f"{path}: {len(target['latents'])} latents but "
                         f"{len(target['signs'])} signs")
    if not target["latents"] and not target.get("empty"):
        raise EmptyIntervention(f"{path}: the target blocks no latents (a vacuous intervention; "
                                f"allow_empty_interventions: true keeps going)")


def _load_sae(target: dict, sae_dir: Path | None, device: str):
    """The SAE a target's latents are read with; None for a direction target."""
    if target["kind"] != "sae":
        return None
    from blockem.sae import load_sae

    if sae_dir is None:
        raise ValueError(f"target {target['name']!r} blocks SAE latents: pass --sae")
    return load_sae(sae_dir, device=device)


def _reader(target: dict, sae, device: str, source: Path | None, sae_dir: Path | None):
    where = f"{source} (SAE {sae_dir})" if source is not None else None
    return TargetReader(target, sae, device, source=where)


def cache_stage(data: Path, base_dir: Path, target_path: Path, sae_dir: Path | None, out: Path,
                settings: dict, threads: int = 1) -> None:
    """Base latents of a target on a domain's training examples (reference mode `cache`)."""
    from safetensors.torch import save_file

    from blockem.chat import encode_chats, load_rows
    from blockem.io import atomic_path, provenance, read_json
    from blockem.models import load_model, load_tokenizer, resolve_device, setup_torch

    setup_torch(threads, 0)
    device = resolve_device(settings["compute"]["device"])
    target = read_json(target_path)
    check_target(target, target_path)
    if not target["latents"]:  # an empty target kept on purpose: its cells read no cache
        import torch

        meta = {"target": _cache_key(target),
                "provenance": json.dumps(provenance("block_cache", settings, None,
                                                    target=target["name"], empty=True))}
        with atomic_path(out) as tmp:
            save_file({"z": torch.zeros(0, 0), "offsets": torch.zeros(1, dtype=torch.long)},
                      str(tmp), metadata=meta)
        return
    tok = load_tokenizer(base_dir)
    base = load_model(base_dir, device=device, dtype=settings["compute"]["dtype"]).eval()
    examples = encode_chats(tok, [r["messages"] for r in load_rows(data)],
                            max_length=settings["model"]["max_length"])
    reader = _reader(target, _load_sae(target, sae_dir, device), device, target_path, sae_dir)
    z, offsets = compute_cache(base, examples, reader,
                               pad_id=tok.pad_token_id, device=device)
    meta = {"target": _cache_key(target),
            "provenance": json.dumps(provenance("block_cache", settings, None,
                                                target=target["name"]))}
    with atomic_path(out) as tmp:
        save_file({"z": z.contiguous(), "offsets": offsets}, str(tmp), metadata=meta)


def train_stage(data: Path, base_dir: Path, out: Path, settings: dict, seed: int, *,
                target_path: Path | None = None, sae_dir: Path | None = None,
                cache_path: Path | None = None, extra_inputs: dict[str, Path] | None = None,
                threads: int = 1) -> None:
    """One cell of the grid: fine-tune the base on a domain with the method's penalty.

    settings["block"]: method, lam, reference, token_mask, epochs. The method's registry entry
    (`blockem.methods.get(method)`) decides the rest: its `objective` (block | kl | sft), whether
    only layers <= L train (`freeze_above`), its training pools and hook (`pools`, `hook`, given
    a `TrainContext`; `extra_inputs` are its extra input files by name), and whether lambda 0 is
    refused as the plain sft cell (`sft_at_zero`). With epochs > 1 the run is `epochs` x
    `train.steps` steps and an adapter is saved after each `train.steps` steps under epoch-<k>/
    (the top level holds the last).

    Resumable (blockem.train.Checkpoint): the checkpoint and the adapters of finished epochs live
    in `<out>.ckpt/` until the output is written."""
    import shutil
    import sys

    from blockem.chat import load_rows
    from blockem.errors import EmptyIntervention
    from blockem.io import atomic_dir, provenance, read_json, write_table
    from blockem.methods import TrainContext
    from blockem.models import load_model, save_model
    from blockem.organism import _log_table, prepare_finetune
    from blockem.runtime import check_injected_failure
    from blockem.train import Checkpoint, TrainConfig, checkpoint_key, train

    check_injected_failure(Path(out).name)  # the grid run id
    b = settings["block"]
    method, lam = b["method"], float(b["lam"])
    m = methods.get(method)
    target = read_json(target_path) if target_path else None
    if m.blocks and target is None:
        raise ValueError(f"method {method!r} needs a blocking target (--target)")
    if target is not None:
        check_target(target, target_path)
    empty = target is not None and not target["latents"]
    if lam == 0 and m.sft_at_zero:
        raise EmptyIntervention(f"{Path(out).name}: {m.strength} 0 adds no penalty: this is the "
                                f"plain sft cell, not a {method} run")
    if empty:
        print(f"[block] {target_path}: empty target kept (allow_empty_interventions): training "
              f"without the penalty", file=sys.stderr)
    max_layer = target["layer"] if m.freeze_above else None
    model, tok, examples, cfg, device = prepare_finetune(data, base_dir, settings, seed, threads,
                                                         max_layer=max_layer)
    epochs = int(b.get("epochs", 1))
    cfg = TrainConfig.from_dict({**settings["train"], "steps": cfg.steps * epochs,
                                 "grad_accum": b.get("grad_accum", 1)}, seed=seed)
    mode = b["reference"]
    base_copy = None  # a plain-SFT method (an intervention in its hook or pools) needs no base
    if m.objective != "sft" and (mode == "copy" or (m.objective == "kl"
                                                    and settings["train"]["method"] != "lora")):
        base_copy = load_model(base_dir, device=device, dtype=settings["compute"]["dtype"])
        base_copy = base_copy.eval().requires_grad_(False)
    model_ref = ModelReference("copy" if base_copy is not None else "adapter_off", base_copy)
    sae = _load_sae(target, sae_dir, device) if target is not None and not empty else None
    if m.objective == "kl":
        objective = BlockObjective(kl_lam=lam, kl_reference=model_ref)
    elif m.objective == "sft" or empty:
        objective = BlockObjective()
    else:
        reader = _reader(target, sae, device, target_path, sae_dir)
        if mode == "cache":
            if cache_path is None:
                raise ValueError("reference 'cache' needs the cached base latents (--cache)")
            reference = CacheReference.load(cache_path, target, device)
        else:
            reference = ModelReference(mode, base_copy)
        objective = BlockObjective(reader=reader, reference=reference, lam=lam,
                                   mask=b["token_mask"])
    prov = provenance("block", settings, seed, target=target["name"] if target else None,
                      empty_intervention=empty)
    extra_inputs = dict(extra_inputs or {})
    ctx = TrainContext(model=model, tokenizer=tok, examples=examples, rows=load_rows(data),
                       target=target, sae=sae, lam=lam, settings=settings, device=device,
                       seed=seed, inputs=extra_inputs)
    pools = m.pools(ctx) if m.pools is not None else [(examples, 1.0)]
    hook = m.hook(ctx) if m.hook is not None else nullcontext()
    per_epoch = cfg.steps // epochs
    inputs = [p for p in (data, base_dir, target_path, sae_dir, cache_path,
                          *extra_inputs.values()) if p is not None]

    def epochs_present(extra: dict) -> bool:
        return all((ckpt.dir / f"epoch-{k}").is_dir()
                   for k in range(1, int(extra.get("epochs_saved", 0)) + 1))

    ckpt = Checkpoint(out, checkpoint_key("block", settings, seed, inputs), accept=epochs_present)

    def save_epoch(step: int) -> None:
        """The adapter of a finished epoch, kept beside the checkpoint until the output is
        written (a resumed run keeps the epochs finished before the interruption)."""
        if epochs > 1 and step % per_epoch == 0:
            k = step // per_epoch
            with atomic_dir(ckpt.dir / f"epoch-{k}") as d:
                save_model(model, tok, d, {**prov, "step": step})
            ckpt.extra["epochs_saved"] = k

    with atomic_dir(out) as tmp:
        with hook:  # the method's training-time hook, if any (not active while saving)
            log = train(model, pools, cfg, pad_id=tok.pad_token_id, device=device,
                        name=f"block {method} {settings['domain']} lam {lam:g} seed {seed}",
                        log_every=25, objective=objective, on_step=save_epoch, checkpoint=ckpt)
        for row in log:
            row.setdefault("block_loss", 0.0)
            row.setdefault("kl", 0.0)
            row["epoch"] = (row["step"] - 1) // per_epoch + 1
        if epochs > 1:
            for k in range(1, epochs + 1):
                shutil.copytree(ckpt.dir / f"epoch-{k}", tmp / f"epoch-{k}")
        save_model(model, tok, tmp, prov)
        write_table(tmp / "train_log.parquet", _log_table(log), prov)
    ckpt.discard()  # the output is complete
    print(f"[block] wrote {out}", file=sys.stderr)
