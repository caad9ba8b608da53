"""preventative_steering (blockem/methods/preventative_steering.py): +alpha * v, v the raw
mean-difference vector of the direction target, is in the layer-L residual of every training
forward and of no forward after training; its runs train against the `direction` method's target
file (one job) with no SAE and no cache. Real tiny model, real target and safetensors files."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from blockem import grid, methods
from blockem.config import block_run_settings, validate
from blockem.hooks import capture_residual
from blockem.methods import TrainContext, preventative_steering
from blockem.train import TrainConfig, train

from conftest import advice_chats, around, no_hooks, write_chats

LAYER = 0


def direction(d: int, seed: int = 5):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 0.3


def target(v) -> dict:
    return {"name": "finance-s0-direction", "method": "direction", "kind": "direction",
            "layer": LAYER, "direction": [float(x) for x in v], "latents": [0], "signs": [1]}


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_the_vector_is_added_during_training_forwards_only(tiny_model, tokenizer, alpha):
    from peft import LoraConfig, get_peft_model

    from blockem.chat import collate, encode_chats

    def lora():
        torch.manual_seed(0)
        return get_peft_model(copy.deepcopy(tiny_model), LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
            task_type="CAUSAL_LM"))

    model = lora()
    rows = advice_chats(8)
    examples = encode_chats(tokenizer, [r["messages"] for r in rows])
    v = direction(tiny_model.config.hidden_size)
    ctx = TrainContext(model=model, tokenizer=tokenizer, examples=examples, rows=rows,
                       target=target(v), sae=None, lam=alpha, settings={}, device="cpu", seed=0)
    assert torch.allclose(preventative_steering.vector(ctx), alpha * v)  # the raw vector
    raw, seen = [], []
    with around(model, preventative_steering.METHOD.hook(ctx), raw, seen):
        log = train(model, [(examples, 1.0)], TrainConfig(steps=3, batch_size=4, lr=1e-2),
                    pad_id=tokenizer.pad_token_id)
    assert len(log) == 3 and len(seen) == 3
    for h0, h in zip(raw, seen):  # every position of every row of every training forward
        assert torch.allclose(h - h0, (alpha * v).expand_as(h), atol=1e-6)
    assert no_hooks(model)
    # after training: a forward's residual and logits are those of a never-hooked model with the
    # trained weights (no vector)
    pristine = lora()
    pristine.load_state_dict(model.state_dict())
    batch = collate(examples, tokenizer.pad_token_id)
    got, want = [], []
    with torch.no_grad():
        with capture_residual(model, LAYER, got):
            logits = model(**batch).logits
        with capture_residual(pristine, LAYER, want):
            assert torch.equal(logits, pristine(**batch).logits)
    assert torch.equal(got[0], want[0])


def test_a_preventative_steering_run_through_the_block_cli(tmp_path, tiny_base,
                                                           small_block_config, monkeypatch):
    """The grid's run end to end: the direction target written from stage 1's safetensors as the
    grid writes it for the `direction` method, `block --target` (no SAE, no cache); the real hook
    adds alpha * v in every training forward of train_stage."""
    from safetensors.torch import save_file

    from blockem.__main__ import main
    from blockem.block import target_stage
    from blockem.io import write_json

    cfg = small_block_config
    cfg["block"]["grid"] = [{"method": "preventative_steering", "lambdas": [0, 2]}]
    validate(cfg)
    runs = grid.build_runs(cfg)
    assert list(runs) == ["preventative_steering-finance-l2-s0"]
    run = runs["preventative_steering-finance-l2-s0"]
    assert set(grid.run_inputs(cfg, run)) == {"data", "base", "target"}
    settings = block_run_settings(cfg, run)
    assert settings["block"]["reference"] == "adapter_off"

    d = 32  # the tiny model's hidden size
    v = direction(d)
    save_file({"direction": v.contiguous()}, str(tmp_path / "direction.safetensors"))
    write_json(tmp_path / "set.json", {"name": "finance-s0-validreduc", "layer": LAYER,
                                       "activation": "relu_preact", "sae": {},
                                       "latents": [{"latent": 1, "sign": 1}]})
    target_stage(run["target"]["derive"], [tmp_path / "set.json"], tmp_path / "target.json",
                 {"activation": "relu_preact", "seed": 0},
                 direction_path=tmp_path / "direction.safetensors")
    doc = json.loads((tmp_path / "target.json").read_text())
    assert doc["kind"] == "direction" and torch.allclose(torch.tensor(doc["direction"]), v)

    seen: dict = {"raw": [], "steered": []}
    real = methods.REGISTRY["preventative_steering"]

    def recording(ctx):
        seen["ctx"] = ctx
        return around(ctx.model, real.hook(ctx), seen["raw"], seen["steered"])

    monkeypatch.setitem(methods.REGISTRY, "preventative_steering",
                        dataclasses.replace(real, hook=recording))
    data = write_chats(tmp_path / "finance.parquet", advice_chats(8))
    out = tmp_path / "run"
    assert main(["block", "--settings", json.dumps(settings), "--data", str(data),
                 "--base", str(tiny_base), "--seed", "0", "--target", str(tmp_path / "target.json"),
                 "--out", str(out)]) == 0
    assert len(seen["steered"]) == 2 and seen["ctx"].sae is None
    for h0, h in zip(seen["raw"], seen["steered"]):
        assert torch.allclose(h - h0, (2 * v).expand_as(h), atol=1e-5)
    assert no_hooks(seen["ctx"].model)
    assert (out / "adapter_config.json").exists() and (out / "train_log.parquet").exists()


def test_preventative_steering_shares_the_direction_target(config):
    config["block"]["grid"] = [{"method": "direction", "lambdas": [100]},
                               {"method": "preventative_steering", "lambdas": [0.5, 1, 2]}]
    validate(config)
    runs = grid.build_runs(config)
    assert list(runs) == ["direction-finance-l100-s0", "preventative_steering-finance-l0.5-s0",
                          "preventative_steering-finance-l1-s0",
                          "preventative_steering-finance-l2-s0"]
    L = "results/latents/finance-s0"
    want = {"name": "finance-s0-direction", "derive": "direction", "size": None,
            "set": f"{L}-validreduc.json", "direction": f"{L}-direction.safetensors"}
    assert all(r["target"] == want for r in runs.values())
    assert grid.targets(runs) == {"finance-s0-direction": want}  # one target job
    # the direction penalty reads the cache; preventative steering reads none
    assert "cache" in grid.run_inputs(config, runs["direction-finance-l100-s0"])
    assert grid.run_inputs(config, runs["preventative_steering-finance-l1-s0"]) == {
        "data": "results/world/finetune/finance.parquet", "base": "results/models/base",
        "target": "results/block/targets/finance-s0-direction.json"}
    s = block_run_settings(config, runs["preventative_steering-finance-l0.5-s0"])
    assert s["block"]["method"] == "preventative_steering" and s["block"]["lam"] == 0.5
    assert "preventative_steering" not in s
