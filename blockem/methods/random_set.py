"""Random latents: the BLOCK-EM penalty on a random latent set of the same size (METHOD.md,
"Baselines and ablations": "Random latents and Top-Delta latents of the same size"). The set is
discovery's `random` selection rule, which must be in discovery.select.extra_rules."""

from blockem.methods.base import Method

METHOD = Method(
    name="random", label="Random latents", color="C2",
    doc="the BLOCK-EM penalty on a random latent set of the same size (selection rule random)",
    needs="latents", latent_set="random", grid_fields=("sizes",))
