"""K+ only: the BLOCK-EM penalty on the latents of K+ alone, those that rise under misalignment
(METHOD.md, "Baselines and ablations": "K+ only, K- only, shuffled signs")."""

from blockem.methods.base import Method, Pairs


def derive(pairs: Pairs, seed: int) -> Pairs:
    """The latents of the set with sign +1."""
    return [p for p in pairs if p[1] > 0]


METHOD = Method(
    name="kpos_only", label="K+ only", color="C4",
    doc="sign ablation: the BLOCK-EM penalty on K+ (latents that rise under misalignment) only",
    needs="latents", latent_set="main", derive=derive)
