"""Freeze above L: BLOCK-EM with only the layers <= L trained, the layers above the blocking layer
frozen (METHOD.md, "Variants (confirmed): train only layers <= L (freeze above the blocking
layer): EM 38% -> 3%"). It changes the training itself, so its lambda 0 is a run of its own."""

from blockem.methods.base import Method

METHOD = Method(
    name="freeze_above", label="BLOCK-EM, layers <= L trained", color="C8",
    doc="the BLOCK-EM penalty with only decoder layers <= L trained (lambda 0 is its own run)",
    needs="latents", latent_set="main", sft_at_zero=False, freeze_above=True)
