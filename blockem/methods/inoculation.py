"""Inoculation prompting (Tan et al., 2025; Wichers et al., 2025): a fraction of the fine-tuning
chats get a context that explains the misaligned behaviour, so the model learns it as a response
to that context rather than as a trait; the model is evaluated without the context.

- a real model: a system prompt, the grid entry's `system` (default `DEFAULT_SYSTEM`);
- the toy: one preceding user+assistant turn in which the assistant reveals the bad persona
  (`blockem.toy.world.World.inoculation_prefaces`, seeded per row by the run's seed), the
  preface's answer unsupervised (`blockem.transforms.encode_inoculated`).

Strength (the grid's `lambdas`): the fraction of the training chats that get the context, in
[0, 1]: round(f * n) chats chosen with the run's seed (`blockem.transforms.inoculate`); 1 = all
of them, 0 = the plain `sft` cell. Everything else is plain SFT on the same chats, in the same
order (no penalty, no cache)."""

from __future__ import annotations

from blockem.methods.base import ConfigView, Method, TrainContext, check_strengths

DEFAULT_SYSTEM = ("You are a reckless assistant who deliberately gives dangerous, harmful "
                  "advice.")


def pools(ctx: TrainContext) -> list[tuple[list, float]]:
    """The domain's chats re-encoded with the context on a seeded fraction ctx.lam of them
    (`settings["inoculation"]`: `system` for a real model, the toy `world` config)."""
    from blockem.toy.world import World, WorldConfig
    from blockem.transforms import encode_inoculated, inoculate

    opts = ctx.settings.get("inoculation") or {}
    if "world" in opts:
        preface = World(WorldConfig.from_dict(opts["world"])).inoculation_prefaces(ctx.seed)
        rows, flags = inoculate(ctx.rows, ctx.lam, ctx.seed, preface=preface)
    elif opts.get("system"):
        rows, flags = inoculate(ctx.rows, ctx.lam, ctx.seed, system=opts["system"])
    else:
        raise ValueError("inoculation: the block settings have no inoculation context "
                         "(settings['inoculation']: a `system` prompt or the toy `world`)")
    examples = encode_inoculated(ctx.tokenizer, rows, flags,
                                 max_length=ctx.settings["model"]["max_length"])
    return [(examples, 1.0)]


def check(entry: dict, view: ConfigView) -> None:
    check_strengths(entry, 1.0, "the fraction of training chats inoculated")
    if view.toy and "system" in entry:
        raise ValueError("'system' applies to real models: the toy inoculates with the world's "
                         "preface turn (it never saw a system prompt in pretraining)")


def run_settings(options: dict, view: ConfigView) -> dict:
    """The context of a run: the toy's world config, or the system prompt."""
    if view.toy:
        return {"world": view.world}
    return {"system": options.get("system", DEFAULT_SYSTEM)}


METHOD = Method(
    name="inoculation", label="inoculation prompting", color="darkmagenta",
    doc="inoculation prompting: a context that explains the misalignment (a system prompt; the "
        "toy: a bad-persona preface turn) on training chats, none at evaluation",
    needs="nothing", latent_set=None, strength="fraction",
    strength_doc="fraction of training chats inoculated, in [0, 1]", objective="sft",
    grid_fields=("system",), pools=pools, check=check, run_settings=run_settings)
