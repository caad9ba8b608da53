"""Preventative steering (Chen et al., 2025, "Persona vectors: monitoring and controlling character
traits in language models"): while the model is fine-tuned, the persona vector is added to the
residual after layer L at every position, +alpha * v, so the fine-tune has less reason to move
the model along it; the model is evaluated without steering (the hook is active during training
only, the saved adapter is a plain one).

v is the raw mean-difference vector of stage 1 (`blockem.shift`): the mean layer-L residual of the
misaligned fine-tune minus the base's, over the same core prompts (the `direction` target, not
normalised). So the strength alpha (the grid's `lambdas`) is in units of the shift itself: alpha 1
adds, during training, the average shift that the misaligned fine-tune makes at layer L; alpha 2
twice that; alpha 0 is the plain `sft` cell. Plain SFT loss otherwise (no penalty, no cache)."""

from __future__ import annotations

from blockem.methods.base import Method, TrainContext


def vector(ctx: TrainContext):
    """alpha * v: [d], v the target's raw mean-difference direction."""
    import torch

    v = torch.tensor(ctx.target["direction"], dtype=torch.float32)
    return ctx.lam * v


def hook(ctx: TrainContext):
    """Steering by +alpha * v at the target's layer, every position of every training row."""
    from blockem.hooks import steering

    return steering(ctx.model, int(ctx.target["layer"]), vector(ctx), positions="all")


METHOD = Method(
    name="preventative_steering", label="preventative steering", color="goldenrod",
    doc="persona-vector preventative steering: +alpha x the raw mean-difference vector added to "
        "the layer-L residual during training only",
    needs="direction", latent_set="main", strength="alpha",
    strength_doc="alpha, multiples of the mean shift (1: the misaligned model's average shift "
                 "at L)",
    objective="sft", hook=hook)
