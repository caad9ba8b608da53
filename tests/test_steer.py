"""The batched steering hook and steering vectors."""

from __future__ import annotations

import pytest
import torch

from blockem.chat import generation_prompts
from blockem.generate import generate_rows
from blockem.hooks import steering
from blockem.sae import set_vector, steering_vectors

PROMPTS = ["what helps with my cough ?", "how should i invest my savings ?"]


def batch(tokenizer):
    a, b = generation_prompts(tokenizer, PROMPTS)
    n = max(len(a), len(b))
    ids = torch.full((2, n), tokenizer.pad_token_id)
    ids[0, :len(a)], ids[1, :len(b)] = torch.tensor(a), torch.tensor(b)
    mask = (ids != tokenizer.pad_token_id).long()
    return ids, mask


def logits(model, ids, mask, layer=None, vectors=None):
    with torch.no_grad(), steering(model, layer, vectors):
        return model(input_ids=ids, attention_mask=mask).logits


def test_alpha_zero_leaves_logits_unchanged(tiny_model, tokenizer):
    ids, mask = batch(tokenizer)
    plain = logits(tiny_model, ids, mask)
    assert torch.equal(plain, logits(tiny_model, ids, mask, 0, torch.zeros(2, 32)))


def test_per_row_vectors_steer_only_their_rows(tiny_model, tokenizer):
    ids, mask = batch(tokenizer)
    plain = logits(tiny_model, ids, mask)
    vec = torch.zeros(2, 32)
    vec[1] = 3.0 * torch.randn(32, generator=torch.Generator().manual_seed(0))
    steered = logits(tiny_model, ids, mask, 1, vec)
    assert torch.equal(steered[0], plain[0])
    assert not torch.allclose(steered[1], plain[1], atol=1e-3)


def test_prompt_positions_steer_the_prefill_but_not_decoding_steps(tiny_model, tokenizer):
    """`prompt` steering: a multi-token (prefill) forward is steered, a one-token (decode) is not."""
    ids, mask = batch(tokenizer)
    vec = 3.0 * torch.ones(2, 32)
    plain = logits(tiny_model, ids, mask)
    with torch.no_grad(), steering(tiny_model, 0, vec, positions="prompt"):
        prefill = tiny_model(input_ids=ids, attention_mask=mask).logits
        one = tiny_model(input_ids=ids[:, :1]).logits
    assert not torch.allclose(prefill, plain, atol=1e-3)
    assert torch.allclose(one, logits(tiny_model, ids[:, :1], None), atol=1e-6)
    with pytest.raises(ValueError, match="unknown steering positions"):
        with steering(tiny_model, 0, None, positions="answers"):
            pass


def test_hook_is_removed_after_the_block(tiny_model, tokenizer):
    ids, mask = batch(tokenizer)
    plain = logits(tiny_model, ids, mask)
    logits(tiny_model, ids, mask, 0, torch.ones(2, 32))
    assert torch.equal(plain, logits(tiny_model, ids, mask))


def test_zero_steering_generates_the_same_answers(tiny_model, tokenizer):
    rows = generation_prompts(tokenizer, PROMPTS * 3)
    kw = dict(temperature=1.0, max_new_tokens=6, batch_size=4, seed=5)
    plain = generate_rows(tiny_model, tokenizer, rows, **kw)
    zero = generate_rows(tiny_model, tokenizer, rows, steer=torch.zeros(6, 32), layer=1, **kw)
    assert plain == zero and len(plain) == 6


@pytest.fixture()
def sae(make_sae):
    """A sae-lens TopK SAE (the default architecture) with 3 latents on a 2-d residual whose decoder
    directions are set: latent 0 along +x (norm 3), 1 along -y (norm 0.5), 2 along the diagonal."""
    return make_sae("topk", W_dec=torch.tensor([[3.0, 0.0], [0.0, -0.5], [1.0, 1.0]]),
                    cfg={"k": 1})


def test_steering_vectors_sign_mode_and_scale(sae):
    ind = steering_vectors(sae, [0, 1], [1, -1], [0.5, 0.2], 10.0, "induce")
    rep = steering_vectors(sae, [0, 1], [1, -1], [0.5, 0.2], 10.0, "repair")
    assert torch.allclose(ind, torch.tensor([[5.0, 0.0], [0.0, 2.0]]))
    assert torch.allclose(rep, -ind)
    with pytest.raises(ValueError):
        steering_vectors(sae, [0], [1], [0.1], 1.0, "amplify")


def test_set_vector_sums_repair_directions(sae):
    s = {"scale": 2.0, "latents": [{"latent": 0, "sign": 1, "alpha_rep": 1.0},
                                   {"latent": 2, "sign": -1, "alpha_rep": 0.5}]}
    v = set_vector(s, sae)
    want = -2.0 * torch.tensor([1.0, 0.0]) + 1.0 * torch.tensor([1.0, 1.0]) / 2 ** 0.5
    assert torch.allclose(v, want)
