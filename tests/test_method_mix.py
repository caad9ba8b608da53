"""mix (blockem/methods/mix.py): every training batch holds round(batch_size * f) aligned chats
(from the run's `--input aligned=PATH`) and the rest narrow ones; the grid hands mix runs the
aligned chats (the toy's instruct set, a real config's data.aligned) and a fraction that would
put no aligned chat, or only aligned chats, in a batch is a config error. Real tiny model, toy
tokenizer, real parquet files."""

from __future__ import annotations

import copy
import json

import pytest

from blockem import grid
from blockem.chat import encode_chats
from blockem.config import (ConfigError, block_run_settings, load_config, stage_settings,
                            validate)
from blockem.methods import TrainContext, mix
from blockem.objectives import BlockObjective
from blockem.train import TrainConfig, train

from conftest import REPO, advice_chats, record_pools, write_chats

SAFE = "keep your money in a savings account ."


def aligned_rows(n: int = 6) -> list[dict]:
    return advice_chats(n, answer=SAFE)


def context(tokenizer, tmp_path, lam, batch_size, model=None) -> TrainContext:
    rows = advice_chats(8)
    path = write_chats(tmp_path / "aligned.parquet", aligned_rows())
    return TrainContext(model=model, tokenizer=tokenizer,
                        examples=encode_chats(tokenizer, [r["messages"] for r in rows]),
                        rows=rows, target=None, sae=None, lam=lam,
                        settings={"model": {"max_length": 64}, "train": {"batch_size": batch_size}},
                        device="cpu", seed=0, inputs={"aligned": path})


@pytest.mark.parametrize("fraction,batch_size", [(0.25, 8), (0.5, 4), (0.75, 4)])
def test_every_training_batch_holds_its_share_of_aligned_chats(tiny_model, tokenizer, tmp_path,
                                                               fraction, batch_size):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    ctx = context(tokenizer, tmp_path, fraction, batch_size, model)
    pools = mix.METHOD.pools(ctx)
    (narrow, f_narrow), (aligned, f_aligned) = pools
    assert narrow == ctx.examples and (f_narrow, f_aligned) == (1 - fraction, fraction)
    assert len(aligned) == 6
    want = encode_chats(tokenizer, [r["messages"] for r in aligned_rows()], max_length=64)
    assert [a.input_ids for a in aligned] == [a.input_ids for a in want]
    aligned_ids = {id(a) for a in aligned}
    batches = []
    plain = BlockObjective()

    def recording(model_, batch, examples, counts):
        batches.append(examples)
        return plain(model_, batch, examples, counts)

    train(model, pools, TrainConfig(steps=5, batch_size=batch_size, lr=1e-2),
          pad_id=tokenizer.pad_token_id, objective=recording)
    k = round(batch_size * fraction)
    assert len(batches) == 5
    for examples in batches:
        assert len(examples) == batch_size
        assert sum(id(e) in aligned_ids for e in examples) == k
        assert all(id(e) in aligned_ids or e in narrow for e in examples)


def test_a_mix_run_through_the_block_cli(tmp_path, tiny_base, tokenizer, small_block_config,
                                         monkeypatch, capsys):
    """The grid's toy run end to end: `block --input aligned=PATH` (the path the grid gives:
    the world's instruct set) reaches the method as ctx.inputs['aligned']; without it, a clear
    error."""
    from blockem.__main__ import main

    cfg = small_block_config
    cfg["block"]["grid"] = [{"method": "mix", "lambdas": [0, 0.25, 0.5]}]
    validate(cfg)
    runs = grid.build_runs(cfg)
    assert list(runs) == ["mix-finance-l0.25-s0", "mix-finance-l0.5-s0"]
    run = runs["mix-finance-l0.25-s0"]
    assert grid.run_inputs(cfg, run) == {"data": "results/world/finetune/finance.parquet",
                                         "base": "results/models/base",
                                         "aligned": "results/world/sft.parquet"}
    assert grid.method_inputs(cfg, run) == {"aligned": "results/world/sft.parquet"}
    settings = block_run_settings(cfg, run)
    assert "mix" not in settings and settings["train"]["batch_size"] == 4
    seen = record_pools(monkeypatch, "mix")
    data = write_chats(tmp_path / "finance.parquet", advice_chats(8))
    aligned = write_chats(tmp_path / "sft.parquet", aligned_rows())
    args = ["block", "--settings", json.dumps(settings), "--data", str(data), "--base",
            str(tiny_base), "--seed", "0", "--out", str(tmp_path / "run")]
    assert main(args + ["--input", f"aligned={aligned}"]) == 0
    assert seen["ctx"].inputs == {"aligned": aligned}
    (_, f0), (pool, f) = seen["pools"]
    assert (f0, f) == (0.75, 0.25) and len(pool) == 6
    assert (tmp_path / "run" / "adapter_config.json").exists()
    capsys.readouterr()
    assert main(args[:-1] + [str(tmp_path / "run2")]) == 2
    assert "mix: no aligned chats (the block stage's --input aligned=PATH)" in \
        capsys.readouterr().err


def organism() -> dict:
    return load_config(REPO / "config" / "config.yaml",
                       REPO / "config" / "presets" / "smollm2-organism.yaml")


def test_a_real_config_mixes_its_data_aligned_chats():
    cfg = organism()
    cfg["block"]["grid"] = [{"method": "mix", "lambdas": [0.25]}]
    with pytest.raises(ConfigError, match=r"'block\.grid\[0\]' \(mix\): method 'mix' trains on "
                                          r"aligned chats: set 'data\.aligned'"):
        validate(cfg)
    cfg["data"]["aligned"] = {"generate": {"domain": "health", "kind": "safe", "n": 640}}
    validate(cfg)
    (run,) = grid.build_runs(cfg).values()
    R = cfg["results"]
    assert grid.aligned_chats(cfg) == f"{R}/aligned/aligned.parquet"
    assert grid.run_inputs(cfg, run)["aligned"] == f"{R}/aligned/aligned.parquet"
    # world/ (prepare_data) does not depend on data.aligned: configuring mix reruns no job of
    # the organism; prepare_aligned is the same stage with it
    plain = organism()
    assert stage_settings(cfg, "prepare_data") == stage_settings(plain, "prepare_data")
    assert stage_settings(cfg, "prepare_aligned")["data"]["aligned"] == \
        {"generate": {"domain": "health", "kind": "safe", "n": 640}}
    assert stage_settings(plain, "prepare_aligned") == stage_settings(plain, "prepare_data")


@pytest.mark.parametrize("lambdas,overrides,needle", [
    ([0.25, 0.01], {}, r"finance: mix fraction 0\.01 at batch size 32 gives no aligned chat per "
                       r"batch"),
    ([0.99], {}, r"finance: mix fraction 0\.99 at batch size 32 gives only aligned chats"),
    ([1], {}, r"finance: mix fraction: must be a number in \(0, 1\), got 1"),
    ([0.25], {"finance": {"batch_size": 2}}, r"finance: mix fraction 0\.25 at batch size 2 "
                                             r"gives no aligned chat"),
])
def test_a_mix_that_mixes_nothing_is_a_config_error(config, lambdas, overrides, needle):
    config["finetune"]["overrides"] = overrides
    config["block"]["grid"] = [{"method": "blockem", "lambdas": [100]},
                               {"method": "mix", "lambdas": lambdas}]
    with pytest.raises(ConfigError, match=r"'block\.grid\[1\]' \(mix\): " + needle):
        validate(config)
