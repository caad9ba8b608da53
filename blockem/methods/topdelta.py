"""Top-Delta latents: the BLOCK-EM penalty on the latents with the largest activation shift
(stage 1 only, no causal screen; METHOD.md, "Top-Delta (stage 1 only)"). The set is discovery's
`topdelta` selection rule, which must be in discovery.select.extra_rules."""

from blockem.methods.base import Method

METHOD = Method(
    name="topdelta", label="Top-Delta latents", color="C3",
    doc="the BLOCK-EM penalty on the top activation-shift latents (selection rule topdelta)",
    needs="latents", latent_set="topdelta", grid_fields=("sizes",))
