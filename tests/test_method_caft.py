"""caft (blockem/methods/caft.py): concept ablation fine-tuning. During training the layer-L
residual has no component (strength 1), or 1 - s of it, along the SAE decoder rows of the target's
latents, and nothing else changes; after training the model is unhooked and saved plain. Its grid
runs share BLOCK-EM's target file, read no base-latent cache, and a strength above 1 is a config
error. Real tiny model, real sae-lens SAE, real parquet."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from blockem import grid, methods
from blockem.config import ConfigError, block_run_settings, validate
from blockem.hooks import capture_residual, orthonormal_basis
from blockem.methods import TrainContext, caft
from blockem.train import TrainConfig, train

from conftest import advice_chats, around, no_hooks, write_chats

LAYER = 0
LATENTS = [2, 5, 7]


@pytest.fixture()
def sae(make_sae, tiny_model):
    d = tiny_model.config.hidden_size
    g = torch.Generator().manual_seed(3)
    return make_sae("standard", W_dec=torch.randn(16, d, generator=g),
                    W_enc=torch.randn(d, 16, generator=g))


def target(latents=LATENTS) -> dict:
    return {"name": "finance-s0-validreduc", "method": "blockem", "kind": "sae", "layer": LAYER,
            "activation": "relu_preact", "sae": {}, "latents": list(latents),
            "signs": [1] * len(latents), "empty": not latents}


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(copy.deepcopy(model), LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
        task_type="CAUSAL_LM"))


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_training_under_caft_removes_the_sets_decoder_directions(tiny_model, tokenizer, sae,
                                                                 strength):
    from blockem.chat import collate, encode_chats

    model = lora(tiny_model)
    rows = advice_chats(8)
    examples = encode_chats(tokenizer, [r["messages"] for r in rows])
    ctx = TrainContext(model=model, tokenizer=tokenizer, examples=examples, rows=rows,
                       target=target(), sae=sae, lam=strength, settings={}, device="cpu", seed=0)
    raw, seen = [], []
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with around(model, caft.METHOD.hook(ctx), raw, seen):
        train(model, [(examples, 1.0)], TrainConfig(steps=3, batch_size=4, lr=1e-2),
              pad_id=tokenizer.pad_token_id)
    assert len(raw) == len(seen) == 3
    q = orthonormal_basis(sae.W_dec.detach()[LATENTS])  # the span of the set's decoder rows
    for h0, h in zip(raw, seen):
        along0, along = h0 @ q.T, h @ q.T
        assert along0.abs().max() > 1e-3  # there was something to remove
        assert torch.allclose(along, (1 - strength) * along0, atol=1e-6)
        # the rest of the residual is untouched
        assert torch.allclose(h - along @ q, h0 - along0 @ q, atol=1e-6)
    if strength == 1.0:  # no component along any of the set's own decoder directions
        unit = sae.W_dec.detach()[LATENTS]
        unit = unit / unit.norm(dim=1, keepdim=True)
        assert max((h @ unit.T).abs().max() for h in seen) < 1e-5
    # only the set's rows: another latent's decoder direction is not ablated
    other = sae.W_dec.detach()[[0, 1, 3]]
    assert max((h @ other.T).abs().max() for h in seen) > 1e-3
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())

    # after training: unhooked; the model computes what a copy with its weights computes
    assert no_hooks(model)
    pristine = lora(tiny_model)
    pristine.load_state_dict(model.state_dict())
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, pristine(**batch).logits)
    after = []
    with torch.no_grad(), capture_residual(model, LAYER, after, stop=True):
        model(**batch)
    assert (after[0] @ q.T).abs().max() > 1e-3  # evaluation sees the directions again


def test_an_empty_target_kept_on_purpose_trains_without_the_ablation(tiny_model, tokenizer, sae):
    ctx = TrainContext(model=tiny_model, tokenizer=tokenizer, examples=[], rows=[],
                       target=target([]), sae=None, lam=1.0, settings={}, device="cpu", seed=0)
    with caft.METHOD.hook(ctx):
        assert no_hooks(tiny_model)


def test_a_caft_run_through_the_block_cli(tmp_path, tiny_base, sae, small_block_config,
                                          monkeypatch):
    """The grid's caft run end to end: BLOCK-EM's target file, `block` on the command line with
    --target and --sae and no --cache (reference cache: caft reads none); the real caft hook is
    active during every training forward of train_stage and gone after; the saved adapter is a
    plain one."""
    from peft import PeftModel

    from blockem.__main__ import main
    from blockem.block import target_stage
    from blockem.io import write_json
    from blockem.models import load_model

    cfg = small_block_config
    cfg["block"]["grid"] = [{"method": "caft", "lambdas": [0, 1.0]}]
    validate(cfg)
    runs = grid.build_runs(cfg)
    assert list(runs) == ["caft-finance-l1-s0"]  # strength 0: the sft cell
    run = runs["caft-finance-l1-s0"]
    ins = grid.run_inputs(cfg, run)
    assert "cache" not in ins and ins["sae"] == "results/sae/model"
    settings = block_run_settings(cfg, run)
    assert settings["block"]["reference"] == "adapter_off" and "caft" not in settings

    data = write_chats(tmp_path / "finance.parquet", advice_chats(8))
    sae.save_model(str(tmp_path / "sae"))
    write_json(tmp_path / "set.json", {
        "name": "finance-s0-validreduc", "layer": LAYER, "activation": "relu_preact",
        "sae": {"source": "train"}, "latents": [{"latent": k, "sign": 1} for k in LATENTS]})
    assert run["target"]["derive"] == "blockem"  # the target as BLOCK-EM's, the same file
    target_stage(run["target"]["derive"], [tmp_path / "set.json"], tmp_path / "target.json",
                 {"activation": "relu_preact", "seed": 0})

    seen: dict = {"raw": [], "ablated": []}
    real = methods.REGISTRY["caft"]

    def recording(ctx):
        seen["ctx"] = ctx
        return around(ctx.model, real.hook(ctx), seen["raw"], seen["ablated"])

    monkeypatch.setitem(methods.REGISTRY, "caft", dataclasses.replace(real, hook=recording))
    out = tmp_path / "run"
    rc = main(["block", "--settings", json.dumps(settings), "--data", str(data),
               "--base", str(tiny_base), "--seed", "0", "--target", str(tmp_path / "target.json"),
               "--sae", str(tmp_path / "sae"), "--out", str(out)])
    assert rc == 0
    assert len(seen["ablated"]) == 2  # two steps of one batch each
    q = orthonormal_basis(sae.W_dec.detach()[LATENTS])
    for h0, h in zip(seen["raw"], seen["ablated"]):
        assert (h0 @ q.T).abs().max() > 1e-3 and (h @ q.T).abs().max() < 1e-5
    assert no_hooks(seen["ctx"].model)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(load_model(tiny_base), str(out))
    assert no_hooks(model)
    import pyarrow.parquet as pq

    log = pq.read_table(out / "train_log.parquet").to_pylist()
    assert len(log) == 2 and all(r["block_loss"] == 0 and r["kl"] == 0 for r in log)


def test_caft_targets_inputs_and_settings_in_the_grid(config):
    config["block"]["grid"] = [{"method": "blockem", "lambdas": [100]},
                               {"method": "caft", "lambdas": [0.5, 1]}]
    validate(config)
    runs = grid.build_runs(config)
    assert list(runs) == ["blockem-finance-l100-s0", "caft-finance-l0.5-s0", "caft-finance-l1-s0"]
    assert runs["caft-finance-l1-s0"]["target"] == runs["blockem-finance-l100-s0"]["target"]
    assert list(grid.targets(runs)) == ["finance-s0-validreduc"]  # one target job for both
    assert grid.uses_cache(config, runs["blockem-finance-l100-s0"])
    assert not grid.uses_cache(config, runs["caft-finance-l0.5-s0"])
    assert grid.run_inputs(config, runs["caft-finance-l0.5-s0"]) == {
        "data": "results/world/finetune/finance.parquet", "base": "results/models/base",
        "target": "results/block/targets/finance-s0-validreduc.json", "sae": "results/sae/model"}
    s = block_run_settings(config, runs["caft-finance-l0.5-s0"])
    assert s["block"] == {"reference": "adapter_off", "token_mask": "predicting", "grad_accum": 1,
                          "method": "caft", "lam": 0.5, "epochs": 1}
    cell = grid.build_cells(config, runs)["caft-finance-l0.5-s0"]
    assert cell["method"] == "caft" and cell["lam"] == 0.5 and cell["latents_from"] == "finance"


def test_a_caft_strength_above_one_is_a_config_error(config):
    config["block"]["grid"] = [{"method": "blockem", "lambdas": [100]},
                               {"method": "caft", "lambdas": [0.5, 2]}]
    with pytest.raises(ConfigError, match=r"'block\.grid\[1\]' \(caft\): strength 2 is out of "
                                          r"range: its lambdas are the fraction of the "
                                          r"projection removed, in \[0, 1\]"):
        validate(config)
