"""Shuffled signs: the BLOCK-EM penalty on the selected latents with their signs shuffled, so
some are blocked in the wrong direction (METHOD.md, "Baselines and ablations": "K+ only, K- only,
shuffled signs"). The shuffle is seeded by block.seed."""

import random

from blockem.methods.base import Method, Pairs


def derive(pairs: Pairs, seed: int) -> Pairs:
    """The same latents, their signs permuted by `random.Random(seed)`."""
    signs = [s for _, s in pairs]
    random.Random(seed).shuffle(signs)
    return [(k, s) for (k, _), s in zip(pairs, signs)]


METHOD = Method(
    name="shuffled_signs", label="shuffled signs", color="C6",
    doc="sign ablation: the BLOCK-EM penalty on the selected latents with shuffled signs",
    needs="latents", latent_set="main", derive=derive)
