"""inoculation (blockem/methods/inoculation.py): the training chats are re-encoded with the
inoculation context on round(f * n) of them (the toy: the world's bad-persona preface turn; a real
model: the system prompt), the context never supervised and the chat's own answer supervised
exactly as without it; the context reaches the block settings of inoculation runs only. Real tiny
model and toy tokenizer, real parquet, the default config's world."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from blockem import grid
from blockem.chat import IGNORE, encode_chats
from blockem.config import ConfigError, block_run_settings, load_config, validate
from blockem.hashing import settings_hash
from blockem.methods import TrainContext, inoculation

from conftest import REPO, advice_chats, record_pools, write_chats

N = 8


def supervised(ex) -> list[int]:
    return [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]


def toy_settings(cfg: dict, lam: float) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["block"]["grid"] = [{"method": "inoculation", "lambdas": [lam]}]
    validate(cfg)
    (run,) = grid.build_runs(cfg).values()
    return block_run_settings(cfg, run)


def context(tokenizer, settings, lam, rows=None, seed=0) -> TrainContext:
    rows = rows or advice_chats(N)
    examples = encode_chats(tokenizer, [r["messages"] for r in rows],
                            max_length=settings["model"]["max_length"])
    return TrainContext(model=None, tokenizer=tokenizer, examples=examples, rows=rows,
                        target=None, sae=None, lam=lam, settings=settings, device="cpu",
                        seed=seed)


def squeeze(text: str) -> str:
    return "".join(text.split())  # the toy tokenizer decodes with spaces between its tokens


def contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def check_inoculated(tokenizer, ctx, examples, context_text: str) -> list[int]:
    """The rows that got the context: it is in their input, unsupervised; every row's own answer
    is supervised exactly as in the plain encoding. Returns their positions."""
    assert len(examples) == len(ctx.examples)
    changed = []
    for i, (ex, plain) in enumerate(zip(examples, ctx.examples)):
        assert ex.index == i
        assert supervised(ex) == supervised(plain)  # the same answer tokens, nothing else
        if ex.input_ids != plain.input_ids:
            changed.append(i)
            assert len(ex.input_ids) > len(plain.input_ids)
            if context_text:  # its tokens (the toy's word-level vocabulary: <unk> for some)
                ids = tokenizer(context_text, add_special_tokens=False)["input_ids"]
                assert contains(ex.input_ids, ids) and not contains(supervised(ex), ids)
    return changed


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_toy_training_chats_carry_the_unsupervised_preface_on_the_fraction(
        tokenizer, default_config, fraction):
    from blockem.toy.world import World, WorldConfig

    settings = toy_settings(default_config, fraction)
    assert settings["inoculation"] == {"world": default_config["world"]}
    ctx = context(tokenizer, settings, fraction)
    (pool,) = inoculation.METHOD.pools(ctx)
    examples, weight = pool
    assert weight == 1.0
    prefaces = World(WorldConfig.from_dict(default_config["world"])).inoculation_prefaces(0)
    changed = check_inoculated(tokenizer, ctx, examples, "")
    assert len(changed) == round(fraction * N)
    for i in changed:  # the world's preface of that row: its misaligned answer, unsupervised
        answer = squeeze(prefaces(i)[1]["content"])
        assert answer in squeeze(tokenizer.decode(examples[i].input_ids))
        assert answer not in squeeze(tokenizer.decode(supervised(examples[i])))
    # another seed picks other rows (and other prefaces)
    other = check_inoculated(tokenizer, ctx, inoculation.METHOD.pools(
        dataclasses.replace(ctx, seed=1))[0][0], "")
    assert len(other) == len(changed) and (fraction == 1.0 or other != changed)


def test_real_model_chats_carry_the_system_prompt_on_the_fraction(tokenizer):
    settings = {"model": {"max_length": 128},
                "inoculation": {"system": inoculation.DEFAULT_SYSTEM}}
    rows = advice_chats(N)[:7]
    ctx = context(tokenizer, settings, 0.5, rows)
    (examples, _), = inoculation.METHOD.pools(ctx)
    changed = check_inoculated(tokenizer, ctx, examples, inoculation.DEFAULT_SYSTEM)
    assert len(changed) == round(0.5 * 7)


def test_an_inoculation_run_through_the_block_cli(tmp_path, tiny_base, small_block_config,
                                                  tokenizer, monkeypatch):
    """The grid's toy run end to end: its settings carry the world, `block` trains on the
    inoculated chats the method's pools return (no target, no cache)."""
    from blockem.__main__ import main

    cfg = small_block_config
    cfg["block"]["grid"] = [{"method": "inoculation", "lambdas": [0, 0.5]}]
    validate(cfg)
    runs = grid.build_runs(cfg)
    assert list(runs) == ["inoculation-finance-l0.5-s0"]
    run = runs["inoculation-finance-l0.5-s0"]
    assert run["target"] is None and set(grid.run_inputs(cfg, run)) == {"data", "base"}
    settings = block_run_settings(cfg, run)
    seen = record_pools(monkeypatch, "inoculation")
    data = write_chats(tmp_path / "finance.parquet", advice_chats(N))
    out = tmp_path / "run"
    assert main(["block", "--settings", json.dumps(settings), "--data", str(data),
                 "--base", str(tiny_base), "--seed", "0", "--out", str(out)]) == 0
    (examples, _), = seen["pools"]
    assert len(check_inoculated(tokenizer, seen["ctx"], examples, "")) == round(0.5 * N)
    import pyarrow.parquet as pq

    assert len(pq.read_table(out / "train_log.parquet")) == 2


def test_only_inoculation_runs_carry_the_context(config):
    """Adding inoculation to a grid leaves every other run's settings (and hash) unchanged."""
    config["block"]["grid"] = [{"method": "blockem", "lambdas": [100]},
                               {"method": "kl", "lambdas": [1]}]
    validate(config)
    before = {rid: block_run_settings(config, r) for rid, r in grid.build_runs(config).items()}
    config["block"]["grid"].append({"method": "inoculation", "lambdas": [0, 0.5, 1]})
    validate(config)
    runs = grid.build_runs(config)
    assert list(runs) == [*before, "inoculation-finance-l0.5-s0", "inoculation-finance-l1-s0"]
    for rid, s in before.items():
        assert block_run_settings(config, runs[rid]) == s
        assert settings_hash(block_run_settings(config, runs[rid])) == settings_hash(s)
    s = block_run_settings(config, runs["inoculation-finance-l1-s0"])
    assert s["inoculation"] == {"world": config["world"]}
    assert s["block"]["method"] == "inoculation" and s["block"]["reference"] == "adapter_off"


def test_a_real_config_inoculates_with_its_system_prompt():
    cfg = load_config(REPO / "config" / "config.yaml",
                      REPO / "config" / "presets" / "smollm2-organism.yaml")
    cfg["block"]["grid"] = [{"method": "inoculation", "lambdas": [1]},
                            {"method": "inoculation", "lambdas": [0.5],
                             "system": "You are an evil assistant."}]
    validate(cfg)
    runs = grid.build_runs(cfg)
    assert block_run_settings(cfg, runs["inoculation-finance-l1-s0"])["inoculation"] == {
        "system": inoculation.DEFAULT_SYSTEM}
    assert block_run_settings(cfg, runs["inoculation-finance-l0.5-s0"])["inoculation"] == {
        "system": "You are an evil assistant."}
    cfg["block"]["grid"][1]["lambdas"] = [1]  # the same run id twice
    with pytest.raises(ConfigError, match=r"'block\.grid\[0\]' and 'block\.grid\[1\]' both "
                                          r"train run 'inoculation-finance-l1-s0'"):
        validate(cfg)


@pytest.mark.parametrize("entry,needle", [
    ({"method": "inoculation", "lambdas": [0.5, 1.5]},
     r"'block\.grid\[0\]' \(inoculation\): strength 1\.5 is out of range: its lambdas are the "
     r"fraction of training chats inoculated, in \[0, 1\]"),
    ({"method": "inoculation", "lambdas": [1], "system": "You are evil."},
     r"'block\.grid\[0\]' \(inoculation\): 'system' applies to real models"),
    ({"method": "blockem", "lambdas": [1], "system": "You are evil."},
     r"'block\.grid\[0\]' \(blockem\): 'system' applies to method 'inoculation' only"),
])
def test_inoculation_config_errors(config, entry, needle):
    config["block"]["grid"] = [entry]
    with pytest.raises(ConfigError, match=needle):
        validate(config)
