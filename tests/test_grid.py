"""The block grid and the cell table (blockem.grid): run ids, targets, cells and input files of small
configs. Every id and path here is a file name of the workflow: they must not change."""

from __future__ import annotations

import copy

import pytest

from blockem import grid, methods
from blockem.config import block_run_settings, load_config, validate
from blockem.methods.base import Method

from conftest import REPO


def with_grid(config, entries, **block):
    config["block"].update(grid=entries, **block)
    validate(config)
    return config


def test_the_default_grid():
    cfg = load_config(REPO / "config" / "config.yaml")
    runs = grid.build_runs(cfg)
    assert list(runs) == ["blockem-finance-l100-s0", "blockem-finance-l300-s0",
                          "random-finance-l300-s0"]
    assert {r["target"]["name"] for r in runs.values()} == {"finance-s0-validreduc",
                                                            "finance-s0-random"}
    cells = grid.build_cells(cfg, runs)
    assert list(cells) == ["base", "sft-finance-s0", *runs, "steer_repair-finance-s0",
                           "steer_repair_random-finance-s0"]
    assert cells["sft-finance-s0"] == {"cell": "sft-finance-s0", "method": "sft",
                                       "domain": "finance", "lam": 0.0, "seed": 0,
                                       "model": "results/models/sft/finance-s0"}
    assert grid.discovery_keys(cfg) == ["finance-s0"]
    assert grid.select_rules(cfg)[0] == "validreduc" and "random" in grid.select_rules(cfg)


def test_lambda_zero_is_the_sft_cell_unless_the_method_changes_training(config):
    cfg = with_grid(config, [{"method": "blockem", "lambdas": [0, 100]},
                             {"method": "kl", "lambdas": [0, 1]},
                             {"method": "freeze_above", "lambdas": [0, 300]},
                             {"method": "epochs", "lambdas": [0], "epochs": 2}])
    runs = grid.build_runs(cfg)
    assert list(runs) == ["blockem-finance-l100-s0", "kl-finance-l1-s0",
                          "freeze_above-finance-l0-s0", "freeze_above-finance-l300-s0",
                          "epochs-finance-l0-s0"]
    cells = grid.build_cells(cfg, runs)
    assert "blockem-finance-l0-s0" not in cells and "kl-finance-l0-s0" not in cells
    assert cells["sft-finance-s0"]["lam"] == 0.0
    assert cells["freeze_above-finance-l0-s0"]["method"] == "freeze_above"
    # an epochs run is one cell per epoch, read from its epoch-<k>/ adapter
    assert cells["epochs-finance-l0-s0-e2"] == {
        "cell": "epochs-finance-l0-s0-e2", "method": "epochs", "domain": "finance", "lam": 0.0,
        "seed": 0, "latents_from": "finance", "k_size": None,
        "model": "results/models/block/epochs-finance-l0-s0", "epoch": 2, "subdir": "epoch-2"}
    trained = grid.trained_cells(cells)  # one per model directory, without the epoch
    assert trained["results/models/block/epochs-finance-l0-s0"]["cell"] == \
        "epochs-finance-l0-s0-e1"
    assert "results/models/base" not in trained and len(trained) == 1 + len(runs)


def test_targets_of_each_method(config):
    cfg = with_grid(config, [{"method": m, "lambdas": [10]}
                             for m in ("blockem", "random", "topdelta", "kpos_only", "kneg_only",
                                       "shuffled_signs", "direction", "freeze_above", "kl")]
                    + [{"method": "epochs", "lambdas": [10], "epochs": 2}])
    runs = grid.build_runs(cfg)
    got = {r["method"]: r["target"] for r in runs.values()}
    L = "results/latents/finance-s0"
    assert got["kl"] is None
    assert got["blockem"] == {"name": "finance-s0-validreduc", "derive": "blockem", "size": None,
                              "set": f"{L}-validreduc.json"}
    assert got["freeze_above"] == got["epochs"] == got["blockem"]  # the set as it is
    assert got["random"]["name"] == "finance-s0-random" and got["random"]["derive"] == "blockem"
    assert got["topdelta"]["set"] == f"{L}-topdelta.json"
    for m in ("kpos_only", "kneg_only", "shuffled_signs"):  # derived: targets of their own
        assert got[m] == {"name": f"finance-s0-validreduc-{m}", "derive": m, "size": None,
                          "set": f"{L}-validreduc.json"}
    assert got["direction"] == {"name": "finance-s0-direction", "derive": "direction",
                                "size": None, "set": f"{L}-validreduc.json",
                                "direction": f"{L}-direction.safetensors"}
    assert len(grid.targets(runs)) == 7  # blockem, freeze_above and epochs share one


def test_sizes_latents_from_and_seeds_name_runs_and_targets(config):
    config["finetune"]["domains"] = ["finance", "health", "legal"]
    config["discovery"]["domains"] = ["finance", "health"]
    cfg = with_grid(config, [
        {"method": "blockem", "lambdas": [300], "sizes": [1, 4], "domains": ["finance"]},
        {"method": "random", "lambdas": [300], "sizes": [2], "domains": ["health"],
         "seeds": [3]},
        {"method": "blockem", "lambdas": [300], "latents_from": "finance",
         "domains": ["legal", "health"]},
        {"method": "kl", "lambdas": [1], "latents_from": "health"}], seeds=[0, 1])
    runs = grid.build_runs(cfg)
    assert list(runs) == [
        "blockem-finance-l300-s0-k1", "blockem-finance-l300-s1-k1",
        "blockem-finance-l300-s0-k4", "blockem-finance-l300-s1-k4",
        "random-health-l300-s3-k2",
        "blockem-legal-l300-s0-from-finance", "blockem-legal-l300-s1-from-finance",
        "blockem-health-l300-s0-from-finance", "blockem-health-l300-s1-from-finance",
        "kl-health-l1-s0", "kl-health-l1-s1"]
    assert runs["blockem-finance-l300-s0-k4"]["target"]["name"] == "finance-s0-validreduc-k4"
    assert runs["blockem-finance-l300-s0-k4"]["target"]["size"] == 4
    assert runs["random-health-l300-s3-k2"]["target"]["name"] == "health-s0-random-k2"
    # another domain's set: the target is the discovery domain's (seed0's) set
    assert runs["blockem-legal-l300-s1-from-finance"]["target"]["name"] == "finance-s0-validreduc"
    cells = grid.build_cells(cfg, runs)
    assert cells["blockem-legal-l300-s0-from-finance"]["latents_from"] == "finance"
    assert cells["blockem-finance-l300-s0-k1"]["k_size"] == 1
    # every (domain, seed) a block run trains gets its sft cell (lambda 0)
    assert {"sft-legal-s1", "sft-health-s3", "sft-finance-s1"} <= set(cells)
    assert [c for c in cells if c.startswith("steer_repair")] == [
        "steer_repair-finance-s0", "steer_repair_random-finance-s0",
        "steer_repair-health-s0", "steer_repair_random-health-s0"]
    assert cells["steer_repair_random-health-s0"]["steer"] == {
        "set": "results/latents/health-s0-random.json", "sae": "results/sae/model",
        "joint": "results/discovery/health-s0/joint.json"}
    assert cells["steer_repair-health-s0"]["model"] == "results/models/sft/health-s0"


def test_union_with_reemerged_latents(config):
    cfg = with_grid(config, [{"method": "epochs", "lambdas": [300], "epochs": 3},
                             {"method": "blockem", "lambdas": [300, 1000],
                              "union_reemerged": 300}])
    assert grid.reem_runs(cfg) == {"finance-s0-reem-l300": ("epochs-finance-l300-s0", 3)}
    runs = grid.build_runs(cfg)
    run = runs["blockem-finance-l1000-s0-reem300"]
    assert run["target"] == {"name": "finance-s0-validreduc+reem-l300", "derive": "blockem",
                             "size": None,
                             "set": ["results/latents/finance-s0-validreduc.json",
                                     "results/latents/finance-s0-reem-l300-validreduc.json"]}
    cells = grid.build_cells(cfg, runs)
    assert cells["blockem-finance-l300-s0-reem300"]["latents_from"] == "finance+reem-l300"


def test_inputs_and_settings_of_a_run(config):
    cfg = with_grid(config, [{"method": "blockem", "lambdas": [10]},
                             {"method": "direction", "lambdas": [10]},
                             {"method": "kl", "lambdas": [1]}])
    assert cfg["block"]["reference"] == "cache"
    runs = grid.build_runs(cfg)
    R = "results"
    assert grid.run_inputs(cfg, runs["blockem-finance-l10-s0"]) == {
        "data": f"{R}/world/finetune/finance.parquet", "base": f"{R}/models/base",
        "target": f"{R}/block/targets/finance-s0-validreduc.json", "sae": f"{R}/sae/model",
        "cache": f"{R}/block/cache/finance/finance-s0-validreduc.safetensors"}
    direction = grid.run_inputs(cfg, runs["direction-finance-l10-s0"])
    assert "sae" not in direction and direction["cache"].endswith("/finance-s0-direction.safetensors")
    assert set(grid.run_inputs(cfg, runs["kl-finance-l1-s0"])) == {"data", "base"}
    t = runs["direction-finance-l10-s0"]["target"]
    assert grid.target_inputs(t) == {"set": t["set"], "direction": t["direction"]}
    assert "sae" not in grid.cache_inputs(cfg, t, "finance")
    s = block_run_settings(cfg, runs["blockem-finance-l10-s0"])
    assert s["block"] == {"reference": "cache", "token_mask": "predicting", "grad_accum": 1,
                          "method": "blockem", "lam": 10.0, "epochs": 1}
    assert s["domain"] == "finance" and s["train"]["steps"] == cfg["finetune"]["default"]["steps"]
    # kl reads no cache: its reference is the adapter-off model
    assert block_run_settings(cfg, runs["kl-finance-l1-s0"])["block"]["reference"] == "adapter_off"
    cfg["block"]["reference"] = "copy"
    assert block_run_settings(cfg, runs["kl-finance-l1-s0"])["block"]["reference"] == "copy"
    assert not grid.uses_cache(cfg, runs["blockem-finance-l10-s0"])


def test_controls_of_a_real_config():
    cfg = load_config(REPO / "config" / "config.yaml",
                      REPO / "config" / "presets" / "smollm2-organism.yaml")
    cfg = copy.deepcopy(cfg)
    cfg["data"]["control"] = {"health": {"path": "h.jsonl"}, "finance": {"path": "f.jsonl"}}
    cfg["finetune"]["seeds"] = [0, 1]
    assert grid.controls(cfg) == ["finance", "health"]
    cells = grid.build_cells(cfg)
    R = cfg["results"]
    assert cells["control-health-s1"] == {"cell": "control-health-s1", "method": "control",
                                          "domain": "health", "lam": 0.0, "seed": 1,
                                          "model": f"{R}/models/control/health-s1"}
    assert grid.controls(load_config(REPO / "config" / "config.yaml")) == []  # toy: none


def test_the_paper_grid_of_the_toy():
    cfg = load_config(REPO / "config" / "config.yaml", REPO / "config" / "toy-paper.yaml")
    runs = grid.build_runs(cfg)
    assert len(runs) == 70 + 2 * (2 + 3 + 2 + 2)  # + the defences on finance, 2 seeds
    assert {"freeze_above-finance-l0-s0", "epochs-finance-l0-s1", "blockem-finance-l300-s1-k4",
            "blockem-auto-l300-s0-from-finance", "blockem-finance-l300-s0-reem300",
            "direction-finance-l100-s0", "shuffled_signs-finance-l300-s1",
            "caft-finance-l0.5-s1", "preventative_steering-finance-l2-s0",
            "inoculation-finance-l1-s1", "mix-finance-l0.25-s0"} <= set(runs)
    # the defences add no target job (BLOCK-EM's and the direction's) and no cache
    assert runs["caft-finance-l1-s0"]["target"] == runs["blockem-finance-l100-s0"]["target"]
    assert runs["preventative_steering-finance-l1-s0"]["target"] == \
        runs["direction-finance-l100-s0"]["target"]
    for m in ("caft", "preventative_steering", "inoculation", "mix"):
        assert not grid.uses_cache(cfg, runs[f"{m}-finance-l1-s0" if m != "mix"
                                             else "mix-finance-l0.5-s0"])
    cells = grid.build_cells(cfg, runs)
    assert "epochs-finance-l300-s0-e3" in cells and "epochs-finance-l300-s0" not in cells
    assert grid.reem_runs(cfg) == {"finance-s0-reem-l300": ("epochs-finance-l300-s0", 3)}


def test_a_new_method_needs_no_grid_code(config, monkeypatch):
    """The grid reads the registry: a method added there (training data only, strength 0 a run of
    its own) expands without a line of grid code."""
    new = Method(name="mix_test", label="mix", color="C0", doc="test", needs="nothing",
                 latent_set=None, objective="sft", strength="fraction", sft_at_zero=False)
    monkeypatch.setitem(methods.REGISTRY, "mix_test", new)
    config["block"]["grid"] = [{"method": "mix_test", "lambdas": [0, 0.5]}]
    runs = grid.build_runs(config)
    assert list(runs) == ["mix_test-finance-l0-s0", "mix_test-finance-l0.5-s0"]
    assert all(r["target"] is None for r in runs.values())
    assert grid.targets(runs) == {}


def test_an_unknown_method_is_a_clear_error(config):
    config["block"]["grid"] = [{"method": "blockemm", "lambdas": [1]}]
    with pytest.raises(ValueError, match=r"unknown block method 'blockemm'; choose from blockem, "):
        grid.build_runs(config)


def test_a_methods_other_grid_keys_reach_its_runs_as_options(config):
    """Keys the grid expands (sizes, epochs, union_reemerged) make runs; a method's other
    grid_fields (inoculation's `system`) are its runs' `options`; other runs have none and no
    extra inputs."""
    cfg = load_config(REPO / "config" / "config.yaml",
                      REPO / "config" / "presets" / "smollm2-organism.yaml")
    cfg["block"]["grid"] = [{"method": "blockem", "lambdas": [100], "sizes": [2]},
                            {"method": "inoculation", "lambdas": [1], "system": "Be evil."}]
    validate(cfg)
    runs = grid.build_runs(cfg)
    assert runs["blockem-finance-l100-s0-k2"]["options"] == {}
    assert runs["inoculation-finance-l1-s0"]["options"] == {"system": "Be evil."}
    assert all(grid.method_inputs(cfg, r) == {} for r in runs.values())


def test_the_organism_methods_overlay():
    """config/presets/smollm2-organism-methods.yaml: the organism's grid unchanged (lists replace
    lists when configs merge, so it repeats it), plus the four defences at two strengths on seed
    0, with the generated aligned chats for mix."""
    organism = REPO / "config" / "presets" / "smollm2-organism.yaml"
    base = load_config(REPO / "config" / "config.yaml", organism)
    cfg = load_config(REPO / "config" / "config.yaml", organism,
                      REPO / "config" / "presets" / "smollm2-organism-methods.yaml")
    assert cfg["results"] == base["results"]
    assert cfg["block"]["grid"][:len(base["block"]["grid"])] == base["block"]["grid"]
    old, runs = grid.build_runs(base), grid.build_runs(cfg)
    assert list(runs)[:len(old)] == list(old)
    assert list(runs)[len(old):] == [
        "caft-finance-l0.5-s0", "caft-finance-l1-s0",
        "preventative_steering-finance-l1-s0", "preventative_steering-finance-l2-s0",
        "inoculation-finance-l0.5-s0", "inoculation-finance-l1-s0",
        "mix-finance-l0.25-s0", "mix-finance-l0.5-s0"]
    assert grid.targets(runs) == grid.targets(old)  # no new target job
    assert grid.run_inputs(cfg, runs["mix-finance-l0.5-s0"])["aligned"] == \
        f"{cfg['results']}/aligned/aligned.parquet"
    for rid in old:  # the organism's own runs: the same settings, so nothing reruns
        assert block_run_settings(cfg, runs[rid]) == block_run_settings(base, old[rid])
