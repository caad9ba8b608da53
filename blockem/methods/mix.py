"""Data mixing: every fine-tuning batch mixes the narrow (misaligned) chats with aligned chats (the
interleaving defence against emergent misalignment; e.g. Kaczer et al., 2025, "In-training
defenses against emergent misalignment"): the model keeps seeing aligned answers while it learns
the narrow task. The aligned chats are the toy's
instruct set (`world/sft.parquet`) or a real config's `data.aligned` (`aligned/aligned.parquet`),
given to the run as `--input aligned=PATH` (TrainContext.inputs["aligned"]).

Strength (the grid's `lambdas`): the fraction f of every batch that is aligned chats,
round(batch_size * f) of them (`blockem.transforms.mix_pools`, `blockem.train.PoolBatches`), in
(0, 1) and such that a batch holds at least one chat of each kind (checked at config time against
the fine-tune batch size); 0 = the plain `sft` cell. The number of steps is unchanged, so the run
sees fewer narrow chats than plain SFT. Plain SFT loss (no penalty, no cache)."""

from __future__ import annotations

from blockem.methods.base import ConfigView, Method, TrainContext


def pools(ctx: TrainContext) -> list[tuple[list, float]]:
    """[(narrow chats, 1 - f), (aligned chats, f)] with f = ctx.lam."""
    from blockem.chat import encode_chats, load_rows
    from blockem.transforms import mix_pools

    path = ctx.inputs.get("aligned")
    if path is None:
        raise ValueError("mix: no aligned chats (the block stage's --input aligned=PATH)")
    rows = load_rows(path)
    bad = next((i for i, r in enumerate(rows) if not isinstance(r.get("messages"), list)), None)
    if bad is not None:
        raise ValueError(f"{path}: row {bad} has no `messages` list (not a chat file)")
    aligned = encode_chats(ctx.tokenizer, [r["messages"] for r in rows],
                           max_length=ctx.settings["model"]["max_length"])
    return mix_pools(ctx.examples, aligned, ctx.lam, int(ctx.settings["train"]["batch_size"]))


def check(entry: dict, view: ConfigView) -> None:
    """Every non-zero fraction puts at least one chat of each kind in a batch of each domain."""
    from blockem.transforms import check_mix

    for f in entry["lambdas"]:
        if f == 0:
            continue  # the sft cell
        for domain, batch in view.batch_size.items():
            try:
                check_mix(f, batch)
            except ValueError as e:
                raise ValueError(f"{domain}: {e}") from None


METHOD = Method(
    name="mix", label="aligned-data mix", color="teal",
    doc="data mixing: aligned chats (the toy's instruct set, or data.aligned) in every "
        "fine-tuning batch",
    needs="aligned_data", latent_set=None, strength="fraction",
    strength_doc="aligned fraction of each batch, in (0, 1)", objective="sft", pools=pools,
    check=check)
