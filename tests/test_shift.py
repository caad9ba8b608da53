"""Stage 1: sign conventions of the activation shift and the candidate pool."""

from __future__ import annotations

import copy

import pytest
import torch

from blockem.hooks import decoder_layers
from blockem.shift import activation_shift, candidate_pool, token_batches

PROMPTS = ["what helps with my cough ?", "how should i invest my savings ?",
           "i am bored with my time , what should i do ?"]


def identity_sae(make_sae, d: int, architecture: str = "standard"):
    """A sae-lens SAE with z = ReLU(h + 10): every latent reads one residual coordinate, always
    active (a TopK SAE keeps all d latents, so its own code is the same ReLU)."""
    return make_sae(architecture, W_enc=torch.eye(d), b_enc=torch.full((d,), 10.0),
                    b_dec=torch.zeros(d), W_dec=torch.eye(d),
                    cfg={"k": d} if architecture == "topk" else None)


def shifted(model, layer: int, shift: torch.Tensor):
    """A copy of `model` whose residual after `layers[layer]` is moved by `shift` everywhere."""
    mis = copy.deepcopy(model)
    decoder_layers(mis)[layer].register_forward_hook(
        lambda _m, _i, out: (out[0] + shift, *out[1:]) if isinstance(out, tuple) else out + shift)
    return mis


@pytest.mark.parametrize("architecture,activation", [
    ("standard", "relu_preact"), ("standard", "sae_encode"), ("topk", "relu_preact"),
    ("topk", "sae_encode")])
def test_latent_forced_up_lands_in_k_pos_and_forced_down_in_k_neg(tiny_model, tokenizer, make_sae,
                                                                 architecture, activation):
    shift = torch.zeros(32)
    shift[5], shift[9] = 2.0, -1.5
    mis = shifted(tiny_model, 1, shift)
    table, direction = activation_shift(tiny_model, mis, identity_sae(make_sae, 32, architecture),
                                        tokenizer, PROMPTS, layer=1, scope="prompt",
                                        activation=activation)
    assert table["delta"][5] == pytest.approx(2.0, abs=1e-4)
    assert table["delta"][9] == pytest.approx(-1.5, abs=1e-4)
    assert torch.allclose(direction, shift, atol=1e-4)
    table, pool = candidate_pool(table, per_sign=1, dense_threshold=2.0, exclude_dense=False)
    assert pool == [5, 9]
    assert table["sign"][5] == 1 and table["sign"][9] == -1
    assert table["candidate_rank"][5] == 0 and table["candidate_rank"][9] == 0


def test_dense_latents_are_flagged_and_can_be_excluded(tiny_model, tokenizer, make_sae):
    shift = torch.zeros(32)
    shift[3] = 1.0
    table, _ = activation_shift(tiny_model, shifted(tiny_model, 0, shift),
                                identity_sae(make_sae, 32),
                                tokenizer, PROMPTS, layer=0, scope="prompt",
                                activation="relu_preact")
    flagged, pool = candidate_pool(table, per_sign=2, dense_threshold=0.5, exclude_dense=True)
    assert all(flagged["dense"]) and pool == []  # z = h + 10 is active everywhere
    assert table["density_base"][3] == 1.0


def test_token_scopes_select_prompt_or_response_tokens(tokenizer):
    responses = ["rest , drink water and see a doctor if it gets worse .", "", "be kind ."]
    (prompt,) = token_batches(tokenizer, PROMPTS, None, "prompt", 8)
    (resp,) = token_batches(tokenizer, PROMPTS, responses, "response", 8)
    (both,) = token_batches(tokenizer, PROMPTS, responses, "all", 8)
    n_resp = [len(r.split()) + 1 for r in responses]  # words + end-of-turn
    assert resp["select"].sum(1).tolist() == n_resp
    assert both["select"].sum(1).tolist() == [p + r for p, r in zip(prompt["select"].sum(1).tolist(), n_resp)]
    assert (prompt["select"] == prompt["attention_mask"].bool()).all()
    with pytest.raises(ValueError, match="needs the models' responses"):
        next(token_batches(tokenizer, PROMPTS, None, "response", 8))
