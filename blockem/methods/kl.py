"""KL to base: `L_SFT + lambda * KL(p_model || p_base)` on the positions the SFT loss averages
over, no latents (METHOD.md, "Baselines and ablations": "KL regularisation to the base model's
next-token distribution"). The base is the adapter-off model (LoRA) or a frozen copy."""

from blockem.methods.base import Method

METHOD = Method(
    name="kl", label="KL to base", color="C1",
    doc="KL regularisation to the base model's next-token distribution (no latents)",
    needs="nothing", latent_set=None, objective="kl")
