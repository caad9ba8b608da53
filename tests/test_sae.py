"""SAEs through sae-lens: layer convention, training, save/load, latent activation, sanity."""

from __future__ import annotations

import pytest
import torch

from blockem.hooks import capture_residual
from blockem.sae import latent_activation, load_sae, residuals, sanity_row, train_sae, unit_directions


def ids(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "what helps with my cough ?"}],
                                         tokenize=False, add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_layer_convention_hidden_states_index_is_layer_plus_one(tiny_model, tokenizer):
    store = []
    x = ids(tokenizer)
    with torch.no_grad(), capture_residual(tiny_model, 0, store):
        out = tiny_model(x, output_hidden_states=True)
    assert torch.allclose(store[0], out.hidden_states[1])
    assert not torch.allclose(store[0], out.hidden_states[0])


def test_last_layer_is_read_before_the_final_norm(tiny_model, tokenizer):
    """HF's last hidden state has the final norm applied; blockem reads the raw residual."""
    store = []
    x = ids(tokenizer)
    with torch.no_grad(), capture_residual(tiny_model, 1, store):
        out = tiny_model(x, output_hidden_states=True)
        normed = tiny_model.model.norm(store[0])
    assert torch.allclose(normed, out.hidden_states[2], atol=1e-6)
    assert not torch.allclose(store[0], out.hidden_states[2])


def test_residuals_keep_only_selected_tokens(tiny_model, tokenizer):
    x = ids(tokenizer)
    sel = torch.zeros_like(x, dtype=torch.bool)
    sel[0, -1] = True
    h, rows = residuals(tiny_model, [{"input_ids": x, "attention_mask": torch.ones_like(x),
                                      "select": sel}], 0)
    with torch.no_grad():
        want = tiny_model(x, output_hidden_states=True).hidden_states[1][0, -1]
    assert h.shape == (1, 32) and rows.tolist() == [0]
    assert torch.allclose(h[0], want, atol=1e-6)


@pytest.fixture(scope="module")
def acts():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(16, 32, generator=g)
    codes = torch.relu(torch.randn(4000, 16, generator=g)) * (torch.rand(4000, 16, generator=g) < 0.2)
    return codes @ basis + 0.01 * torch.randn(4000, 32, generator=g)


@pytest.mark.parametrize("arch,params", [("topk", {"k": 4}), ("standard", {"l1_coefficient": 1e-3}),
                                         ("jumprelu", {}), ("batchtopk", {"k": 4})])
def test_sae_trains_saves_and_reloads_with_same_activations(acts, arch, params, tmp_path):
    sae, log = train_sae(acts, architecture=arch, d_sae=48, params=params, steps=150,
                         batch_size=256, lr=3e-3, seed=0)
    assert log[-1]["mse_loss"] < log[0]["mse_loss"]
    sae.save_inference_model(tmp_path)
    loaded = load_sae(tmp_path)
    x = acts[:64]
    with torch.no_grad():
        recon_train = sae.decode(sae.encode(x))
        recon_loaded = loaded.decode(loaded.encode(x))
        if arch == "batchtopk":
            # the inference model of BatchTopK is a JumpReLU at the learnt threshold
            err = lambda r: float(((x - r) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())  # noqa: E731
            assert abs(err(recon_train) - err(recon_loaded)) < 0.1
        else:
            assert torch.allclose(recon_train, recon_loaded, atol=1e-4), arch
        # what every later stage sees: the reloaded SAE, identical on a second load
        again = load_sae(tmp_path)
        for mode in ("relu_preact", "sae_encode"):
            assert torch.equal(latent_activation(loaded, x, mode), latent_activation(again, x, mode))


def test_relu_preact_is_the_dense_relu_of_the_encoder_preactivation(acts, tmp_path):
    sae, _ = train_sae(acts, architecture="topk", d_sae=48, params={"k": 4}, steps=20,
                       batch_size=128, lr=1e-3, seed=0)
    x = acts[:8]
    with torch.no_grad():
        want = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        z = latent_activation(sae, x, "relu_preact")
        sparse = latent_activation(sae, x, "sae_encode")
    assert torch.allclose(z, want)
    assert (sparse > 0).sum(-1).max() <= 4 < (z > 0).sum(-1).min()
    with pytest.raises(ValueError, match="unknown latent activation"):
        latent_activation(sae, x, "softmax")


def test_unit_directions_and_sanity(acts):
    sae, _ = train_sae(acts, architecture="topk", d_sae=48, params={"k": 4}, steps=300,
                       batch_size=256, lr=3e-3, seed=0)
    d = unit_directions(sae, [0, 5])
    assert torch.allclose(d.norm(dim=-1), torch.ones(2), atol=1e-5)
    row = sanity_row(sae, acts, dense_threshold=0.5)
    assert 0 <= row["fvu"] < 0.5 and row["cosine"] > 0.7
    assert 0 < row["l0"] <= 4 and 0 <= row["dead_fraction"] <= 1
    assert row["n_tokens"] == len(acts)


def test_same_seed_same_sae(acts):
    a, _ = train_sae(acts, architecture="topk", d_sae=16, params={"k": 2}, steps=10,
                     batch_size=64, lr=1e-3, seed=3)
    b, _ = train_sae(acts, architecture="topk", d_sae=16, params={"k": 2}, steps=10,
                     batch_size=64, lr=1e-3, seed=3)
    assert torch.equal(a.W_enc, b.W_enc)


def test_unknown_architecture(acts):
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        train_sae(acts, architecture="gated-ish", d_sae=8, params={}, steps=1, batch_size=8,
                  lr=1e-3, seed=0)
