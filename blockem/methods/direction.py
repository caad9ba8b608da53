"""Direction: the one-sided BLOCK-EM penalty on a single feature, the projection of the layer-L
residual onto the unit mean-difference direction (misaligned minus base, from stage 1), sign +1:
no SAE. The selected set's file gives the layer."""

from blockem.methods.base import Method

METHOD = Method(
    name="direction", label="mean-difference direction", color="C7",
    doc="the one-sided penalty on the projection onto the mean-difference direction at layer L",
    needs="direction", latent_set="main")
