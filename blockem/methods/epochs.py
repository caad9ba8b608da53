"""Epochs: BLOCK-EM over `epochs` x finetune.steps steps, an adapter saved and evaluated after each
epoch (METHOD.md, "extended multi-epoch training (EM re-emerges)"). Its last epoch is the
re-emerged model whose latents `blockem`'s `union_reemerged` re-discovers. Lambda 0 is a run of
its own (plain SFT for as many epochs)."""

from blockem.methods.base import Method

METHOD = Method(
    name="epochs", label="BLOCK-EM, multi-epoch", color="C9",
    doc="the BLOCK-EM penalty over several epochs, each epoch evaluated (re-emergence)",
    needs="latents", latent_set="main", sft_at_zero=False, multi_epoch=True,
    grid_fields=("epochs",))
