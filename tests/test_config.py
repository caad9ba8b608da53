"""Config schema: every wrong key or type is one clear error naming the key path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from blockem.config import ConfigError, finetune_settings, load_config, stage_settings, validate
from blockem.hashing import settings_hash

from conftest import REPO


def test_default_and_smoke_configs_are_valid():
    cfg = load_config(REPO / "config" / "config.yaml", REPO / "config" / "smoke.yaml")
    assert cfg["finetune"]["domains"] == ["finance", "health"]
    assert cfg["world"]["advice_domains"]  # merged from the default


def test_unknown_key_names_its_path(config):
    config["world"]["persona_mixx"] = {"good": 1}
    with pytest.raises(ConfigError) as e:
        validate(config, source="my.yaml")
    msg = str(e.value)
    assert "my.yaml" in msg and "unknown key 'world.persona_mixx'" in msg
    assert "persona_mix" in msg  # lists what is allowed there
    assert "\n" not in msg


def test_unknown_nested_key_in_override(config):
    config["finetune"]["overrides"] = {"health": {"lr": 1e-3, "step": 10}}
    with pytest.raises(ConfigError, match=r"unknown key 'finetune\.overrides\.health\.step'"):
        validate(config)


def test_wrong_type_names_key_and_type(config):
    config["pretrain"]["steps"] = "many"
    with pytest.raises(ConfigError) as e:
        validate(config, source="my.yaml")
    assert "'pretrain.steps'" in str(e.value) and "integer" in str(e.value)


@pytest.mark.parametrize("path,value,needle", [
    (("finetune", "domains"), ["Cooking!"], "finetune.domains.0"),
    (("finetune", "domains"), ["cooking"], "'cooking' is not in world.advice_domains"),
    (("eval", "temperature"), -1, "eval.temperature"),
    (("compute", "device"), "tpu", "compute.device"),
    (("finetune", "overrides"), {"Cooking": {"lr": 1.0}}, "finetune.overrides.Cooking"),
])
def test_bad_values(config, path, value, needle):
    config[path[0]][path[1]] = value
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate(config)


def test_overlapping_slot_splits_are_refused(config):
    config["world"]["slots"]["final"] = [7, 8]
    with pytest.raises(ConfigError, match="slot 7 is in both 'core' and 'final'"):
        validate(config)


def test_finetune_domain_must_exist_in_world(config):
    config["world"]["advice_domains"] = ["health"]
    with pytest.raises(ConfigError, match="'finance' is not in world.advice_domains"):
        validate(config)


def test_domain_override_changes_only_that_domains_settings(config):
    config["finetune"]["overrides"] = {"health": {"lr": 5e-4}}
    validate(config)
    assert finetune_settings(config, "health")["lr"] == 5e-4
    assert finetune_settings(config, "finance")["lr"] == config["finetune"]["default"]["lr"]
    h = lambda d: settings_hash(stage_settings(config, "finetune", d))  # noqa: E731
    before = h("finance")
    config["finetune"]["overrides"]["health"]["lr"] = 1e-4
    assert h("finance") == before


def test_cli_reports_one_line_and_exit_2(tmp_path, default_config):
    bad = dict(default_config, eval={**default_config["eval"], "samples": 3})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    r = subprocess.run([sys.executable, "-m", "blockem", "validate", str(path)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "eval.samples" in lines[0]


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


@pytest.mark.parametrize("entry,needle", [
    ({"method": "indpp", "lambdas": [1]}, r"block\.grid\.0\.method"),
    ({"method": "blockem", "lambdas": [-1]}, r"block\.grid\.0\.lambdas\.0"),
    ({"method": "epochs", "lambdas": [1]}, r"'block\.grid\[0\]' \(epochs\): method 'epochs' needs"),
    ({"method": "blockem", "lambdas": [1], "latents_from": "health"},
     r"no latents are discovered for 'health'"),
    ({"method": "kpos_only", "lambdas": [1], "sizes": [2]}, r"'sizes' applies to"),
    ({"method": "blockem", "lambdas": [1], "sizes": [99]}, r"size 99 is larger"),
])
def test_bad_block_grid_entries(config, entry, needle):
    config["block"]["grid"] = [entry]
    with pytest.raises(ConfigError, match=needle):
        validate(config)


def test_block_method_needs_its_selection_rule(config):
    config["discovery"]["select"]["extra_rules"] = ["topdelta"]
    with pytest.raises(ConfigError, match=r"needs the 'random' latent set; add 'random'"):
        validate(config)


def test_block_runs_expand_the_grid(config):
    from blockem.grid import block_runs

    config["block"]["seeds"] = [0, 1]
    config["block"]["grid"] = [{"method": "blockem", "lambdas": [0, 10]},
                               {"method": "blockem", "lambdas": [10], "latents_from": "finance",
                                "domains": ["health", "auto"]}]
    validate(config)
    runs = block_runs(config)
    assert len(runs) == 2 * 2 + 2 * 2
    assert {(r["domain"], r["latents_from"]) for r in runs} == {
        ("finance", "finance"), ("health", "finance"), ("auto", "finance")}


# --- bad config at a stage's command line: one line, exit 2, nothing written ------------------

@pytest.mark.parametrize("override,needles", [
    ({"finetune": {"default": {"stepz": 3}}}, ["unknown key 'finetune.default.stepz'"]),
    ({"finetune": {"default": {"steps": "ten"}}}, ["'finetune.default.steps'", "integer"]),
    ({"block": {"grid": [{"method": "blockem", "lambdas": [10, -1]}]}},
     ["'block.grid.0.lambdas.1'", "-1 is less than the minimum of 0"]),
])
def test_stage_cli_refuses_a_bad_config(tmp_path, override, needles):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(override))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "blockem", "finetune", "--config",
                        str(REPO / "config" / "config.yaml"), str(path), "--data", "x.parquet",
                        "--base", "base", "--domain", "finance", "--seed", "0", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, check=False)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / "out.ckpt").exists()


def test_negative_lambda_is_refused(config):
    config["block"]["grid"] = [{"method": "random", "lambdas": [300]},
                               {"method": "blockem", "lambdas": [-0.5]}]
    with pytest.raises(ConfigError, match=r"'block\.grid\.1\.lambdas\.0': -0\.5 is less than"):
        validate(config)


def test_checkpoint_every_must_be_a_non_negative_integer(config):
    config["compute"]["checkpoint_every"] = -1
    with pytest.raises(ConfigError, match=r"'compute\.checkpoint_every': -1 is less than"):
        validate(config)
    config["compute"]["checkpoint_every"] = 2.5
    with pytest.raises(ConfigError, match=r"'compute\.checkpoint_every'.*integer"):
        validate(config)


def test_organism_preset_is_valid_and_judge_free_needs_mc():
    """The real-LLM organism preset validates; `judge.kind: none` without MC items, or with a
    discovery screen that would judge generated answers, is one error naming the key."""
    preset = REPO / "config" / "presets" / "smollm2-organism.yaml"
    cfg = load_config(REPO / "config" / "config.yaml", preset)
    validate(cfg)
    assert stage_settings(cfg, "screen", "finance")["discovery"]["scorer"] == "mc"
    assert "judge" not in stage_settings(cfg, "screen", "finance")
    no_mc = {**cfg, "eval": {**cfg["eval"], "mc": None}}
    with pytest.raises(ConfigError, match=r"'judge.kind': 'none' \(no judge\) needs 'eval.mc'"):
        validate(no_mc)
    gen = {**cfg, "discovery": {**cfg["discovery"], "scorer": "generate"}}
    with pytest.raises(ConfigError, match=r"'discovery.scorer': with judge.kind 'none'"):
        validate(gen)


def test_default_settings_hashes_do_not_see_the_new_switches(default_config):
    """allow_empty_interventions (off) and discovery.scorer (generate by default) leave the
    default config's stage settings exactly as before: nothing reruns."""
    cfg = dict(default_config)
    for stage in ("select", "joint", "block_target", "screen", "calibrate"):
        s = stage_settings(cfg, stage, "finance")
        assert "allow_empty_interventions" not in s and "mc" not in s
        assert "scorer" not in s.get("discovery", {})
    on = {**cfg, "allow_empty_interventions": True}
    assert stage_settings(on, "select", "finance")["allow_empty_interventions"] is True
    assert settings_hash(stage_settings(on, "finetune", "finance")) == \
        settings_hash(stage_settings(cfg, "finetune", "finance"))
