"""BLOCK-EM: fine-tune with `L_SFT + lambda * L_block` on the selected latent set K (METHOD.md,
"Stage 4: blocked fine-tuning"): a one-sided, base-anchored penalty that is zero unless the
fine-tune pushes a latent of K+ up, or of K- down, past the base model.

`sizes` keeps the set's first n latents (EM vs |K|); `union_reemerged: <lambda>` blocks the union
of the set and the set re-discovered on the last epoch of the `epochs` run at that lambda
("Re-emergence ... block the union (Fin+Reem)")."""

from blockem.methods.base import Method

METHOD = Method(
    name="blockem", label="BLOCK-EM", color="C0",
    doc="the BLOCK-EM penalty on the selected latent set (discovery.select.rule)",
    needs="latents", latent_set="main", grid_fields=("sizes", "union_reemerged"))
