"""K- only: the BLOCK-EM penalty on the latents of K- alone, those that fall under misalignment
(METHOD.md, "Baselines and ablations": "K+ only, K- only, shuffled signs")."""

from blockem.methods.base import Method, Pairs


def derive(pairs: Pairs, seed: int) -> Pairs:
    """The latents of the set with sign -1."""
    return [p for p in pairs if p[1] < 0]


METHOD = Method(
    name="kneg_only", label="K- only", color="C5",
    doc="sign ablation: the BLOCK-EM penalty on K- (latents that fall under misalignment) only",
    needs="latents", latent_set="main", derive=derive)
