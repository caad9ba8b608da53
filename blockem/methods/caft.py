"""CAFT, concept ablation fine-tuning (Casademunt et al., 2025, "Steering out-of-distribution
generalization with concept ablation fine-tuning"): while the model is fine-tuned, the residual
after layer L is projected off the span of the SAE decoder directions of the selected latent set
(the rows of W_dec of the target's latents only), so the fine-tune cannot use those directions;
the model is evaluated without the ablation (the hook is active during training only, the saved
adapter is a plain one).

Strength (the grid's `lambdas`): the fraction of the projection removed, in [0, 1]: the residual
is h - s * proj(h) (`blockem.hooks.ablation(strength=s)`), so 1 is the full ablation of the paper
and 0.5 halves the component along the span; 0 is the plain `sft` cell. No penalty, no reference:
it trains with the plain SFT loss and reads no cached base latents; its target is BLOCK-EM's own
(the same target file)."""

from __future__ import annotations

from contextlib import nullcontext

from blockem.methods.base import ConfigView, Method, TrainContext, check_strengths


def directions(ctx: TrainContext):
    """[|K|, d] the decoder rows W_dec[k] of the target's latents (float32, any norms: the span
    is what is ablated)."""
    import torch

    idx = torch.as_tensor([int(k) for k in ctx.target["latents"]], dtype=torch.long)
    d_sae = int(ctx.sae.W_dec.shape[0])
    bad = [int(k) for k in idx if not 0 <= int(k) < d_sae]
    if bad:
        raise ValueError(f"target {ctx.target.get('name')!r}: latent {bad[0]} is out of range for "
                         f"the SAE (d_sae {d_sae})")
    return ctx.sae.W_dec.detach()[idx.to(ctx.sae.W_dec.device)].float().cpu()


def hook(ctx: TrainContext):
    """The ablation at the target's layer, strength ctx.lam (nothing for an empty target kept
    with allow_empty_interventions: its cells train as plain SFT)."""
    from blockem.hooks import ablation

    if not ctx.target["latents"]:
        return nullcontext()
    return ablation(ctx.model, int(ctx.target["layer"]), directions(ctx), strength=ctx.lam)


def check(entry: dict, view: ConfigView) -> None:
    check_strengths(entry, 1.0, "the fraction of the projection removed")


METHOD = Method(
    name="caft", label="CAFT (concept ablation)", color="navy",
    doc="concept ablation fine-tuning: the selected set's SAE decoder directions projected out "
        "of the layer-L residual during training only",
    needs="latents", latent_set="main", strength="fraction",
    strength_doc="fraction of the projection removed, in [0, 1] (1: full ablation)",
    objective="sft", hook=hook, check=check)
