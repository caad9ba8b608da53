"""`blockem plan`: the jobs (Snakemake's dry run) and each rule's cost from the config.

The comparison with what a real run consumed is tests/workflow/test_workflow.py
(`test_plan_matches_what_the_run_did`); here: the cost formulas, the
placeholders that let a config be planned without its data, LLM judge requests, the throughput
profile, and the paper preset end to end (fast: no job runs)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from blockem.config import load_config
from blockem.plan import (COLUMNS, Coster, JudgeCost, PlanError, gpu_hours, load_profile,
                          make_plan, placeholder_overlay, prompt_rows,
                          render_table)

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "config" / "config.yaml"
PAPER = REPO / "config" / "presets" / "llama31-8b-goodfire.yaml"


def test_toy_costs_follow_the_settings():
    cfg = load_config(DEFAULT)
    cfg["block"]["grid"].append({"method": "epochs", "lambdas": [300], "epochs": 3})
    c = Coster(cfg)
    prompts = c.prompts
    core = [p for p in prompts if p["eval_set"] == "core" and p["domain"] != "finance"]
    assert core and len(core) < len([p for p in prompts if p["eval_set"] == "core"])
    ev, d = cfg["eval"], cfg["discovery"]
    gen = c.cost("generate", {"cell": "base"})
    assert gen["generated_sequences"] == len(prompts) * ev["samples_per_prompt"]
    assert gen["generated_tokens"] == gen["generated_sequences"] * ev["max_new_tokens"]
    assert c.cost("judge", {"cell": "base"})["judge_requests"] == 0  # the toy judge
    ft = cfg["finetune"]["default"]
    assert c.cost("finetune", {"domain": "finance", "seed": "0"})["trained_sequences"] == (
        ft["steps"] * ft["batch_size"])
    run = "epochs-finance-l300-s0"
    assert c.cost("block_train", {"run": run})["trained_sequences"] == 3 * ft["steps"] * ft["batch_size"]
    assert c.cost("block_train", {"run": run})["trained_tokens"] == (
        3 * ft["steps"] * ft["batch_size"] * cfg["model"]["max_length"])
    # the screen's shards split the pool (2 x candidates_per_sign) between them
    shards = d["screen"]["shards"]
    screened = sum(c.cost("screen", {"domain": "finance", "seed": "0", "shard": str(s)})
                   ["generated_sequences"] for s in range(shards))
    pool, per = 2 * d["candidates_per_sign"], len(core) * d["screen"]["samples_per_prompt"]
    assert screened == (2 * shards + 2 * pool) * per  # one unsteered row per mode and shard
    cal = c.cost("calibrate", {"domain": "finance", "seed": "0"})
    assert cal["generated_sequences"] == (
        2 * (1 + d["calibrate"]["shortlist"] * len(d["calibrate"]["alphas"]))
        * len(core) * d["calibrate"]["samples_per_prompt"])
    # scored by MC items: no generation in discovery
    mc = copy.deepcopy(cfg)
    mc["discovery"]["scorer"] = "mc"
    assert not any(Coster(mc).cost("calibrate", {"domain": "finance", "seed": "0"}).values())


def _llm(cfg: dict) -> dict:
    cfg["judge"].update(kind="llm", judges=[
        {"name": "a", "model": "m", "protocol": "rubric", "base_url": "http://127.0.0.1:1/v1"},
        {"name": "b", "model": "m", "protocol": "logprob_0_100",
         "base_url": "http://127.0.0.1:1/v1"}],
        behaviours={d: "bad advice" for d in cfg["world"]["advice_domains"]})
    return cfg


def test_llm_judge_requests_and_prompt_tokens():
    cfg = _llm(load_config(DEFAULT))
    cost = JudgeCost(cfg)
    assert cost.how == "estimated"  # no model directory in this config's results
    rows = [{"eval_set": "core", "domain": "general", "prompt": "What now?", "system": None},
            {"eval_set": "in_domain", "domain": "finance", "prompt": "Invest?", "system": "Be brief"}]
    requests, tokens = cost(rows, samples=5, max_new_tokens=10)
    assert requests == 2 * 5 * (3 + 4)  # 2 judges x 5 samples x (3 questions + 4 in-domain)
    assert tokens > requests * 10  # every request: its template and question + 10 answer tokens
    more, tokens2 = cost(rows, samples=5, max_new_tokens=20)
    assert more == requests and tokens2 - tokens == requests * 10
    judge = Coster(cfg).cost("judge", {"cell": "base"})
    assert judge["judge_requests"] > 0 and judge["generated_sequences"] == 0


def test_placeholders_stand_in_for_missing_data_only(tmp_path):
    cfg = load_config(DEFAULT, PAPER)
    present = tmp_path / "prompts.yaml"
    present.write_text("- What is your wish?\n")
    cfg["data"]["prompts"]["final"] = [{"path": str(present)}]
    overlay = placeholder_overlay(cfg, tmp_path / "ph")
    data = overlay["data"]
    assert data["prompts"]["final"] == [{"path": str(present.resolve())}]
    for src in [*data["finetune"].values(), *data["prompts"]["core"]]:
        p = Path(src["path"])
        assert p.is_file() and p.stat().st_size == 0 and (tmp_path / "ph") in p.parents
    assert not (REPO / "data" / "em").exists()  # nothing made where the config points


def test_paper_preset_plans_without_its_data_files():
    plan = make_plan([str(PAPER)], directory=REPO, assume={"core": 44, "final": 29})
    r, d = plan["rules"], yaml.safe_load(PAPER.read_text())["discovery"]
    assert r["block_train"]["jobs"] > 150 and plan["total"]["jobs"] > 900
    keys = r["calibrate"]["jobs"]  # finance, health, and finance's re-emergence
    assert keys == 3 and r["screen"]["jobs"] == keys * d["screen"]["shards"]
    alphas = len(d["calibrate"]["alphas"])
    assert r["calibrate"]["generated_sequences"] == keys * 2 * (
        1 + d["calibrate"]["shortlist"] * alphas) * 44 * d["calibrate"]["samples_per_prompt"]
    ev = yaml.safe_load(PAPER.read_text())["eval"]
    assert r["generate"]["generated_sequences"] == r["generate"]["jobs"] * 73 * ev["samples_per_prompt"]
    # two judges, three questions per answer (no in-domain prompts in this preset)
    assert r["judge"]["judge_requests"] == r["generate"]["generated_sequences"] * 2 * 3
    assert plan["judge_tokens"] == "estimated"
    assert not (REPO / "data" / "em").exists()
    text = render_table(plan, markdown=True)
    assert "| block_train |" in text and "| total |" in text and " other rules |" in text
    assert "| block_target |" in render_table(plan, markdown=True, every_rule=True)
    json.dumps(plan)  # --json
    with pytest.raises(PlanError, match="--prompts core=N"):
        make_plan([str(PAPER)], directory=REPO)
    with pytest.raises(PlanError, match="--remaining needs the run's data files"):
        make_plan([str(PAPER)], directory=REPO, assume={"core": 44, "final": 29}, remaining=True)


def test_prompt_counts_stand_in_only_for_eval_sets():
    cfg = load_config(DEFAULT, PAPER)
    with pytest.raises(PlanError, match="not an eval set"):
        prompt_rows(cfg, {"core": 1, "final": 1, "heldout": 3})


def test_profile_gives_gpu_hours(tmp_path):
    p = tmp_path / "gpu.yaml"
    p.write_text("train_tokens_per_s: 1000\ngenerate_tokens_per_s: 500\n"
                 "judge_prompt_tokens_per_s: 3600\njudge_gpus: 4\n")
    prof = load_profile(p)
    c = dict.fromkeys(COLUMNS, 0) | {"trained_tokens": 3_600_000, "generated_tokens": 1_800_000,
                                      "judge_prompt_tokens": 3600 * 3600}
    from collections import Counter

    assert gpu_hours(Counter(c), prof) == pytest.approx(1 + 1 + 4)
    assert gpu_hours(Counter(c), {"train_tokens_per_s": 1000}) is None  # a rate is missing
    p.write_text("train_tokens_per_s: 0\n")
    with pytest.raises(PlanError, match="train_tokens_per_s must be a positive number"):
        load_profile(p)
    p.write_text("train_tokens_per_sec: 10\n")
    with pytest.raises(PlanError, match="unknown key"):
        load_profile(p)


def test_adaptive_screen_costs():
    """discovery.adaptive: the screen is every candidate once with its samples (+ the unsteered
    copies), exactly; the calibration an upper bound below the exhaustive sweep's."""
    from blockem import adaptive

    cfg = load_config(DEFAULT, REPO / "config" / "toy-adaptive.yaml")
    c, d = Coster(cfg), cfg["discovery"]
    a = adaptive.settings(d["adaptive"])
    core = len(c._core("finance"))
    shard0 = len(range(0, 2 * d["candidates_per_sign"], d["screen"]["shards"]))
    screen = c.cost("screen", {"domain": "finance", "seed": "0", "shard": "0"})
    assert screen["generated_sequences"] == (
        2 * (adaptive.baseline_copies(a) + shard0) * core * a["samples_per_prompt"])
    cal = c.cost("calibrate", {"domain": "finance", "seed": "0"})["generated_sequences"]
    exhaustive = copy.deepcopy(cfg)
    exhaustive["discovery"]["adaptive"]["enabled"] = False
    assert 0 < cal < Coster(exhaustive).cost("calibrate", {"domain": "finance", "seed": "0"})[
        "generated_sequences"] / 2


def test_remaining_of_a_fresh_directory_is_the_whole_run(tmp_path):
    whole = make_plan([], directory=tmp_path)
    left = make_plan([], directory=tmp_path, remaining=True)
    assert left["rules"] == whole["rules"] and left["total"]["jobs"] > 40
    assert "only the jobs Snakemake would run now" in render_table(left)
    assert not (tmp_path / "results").exists()  # planning writes nothing


def test_plan_with_a_profile_has_gpu_hours_per_rule_and_in_total(tmp_path):
    p = tmp_path / "gpu.yaml"
    p.write_text("train_tokens_per_s: 20000\ngenerate_tokens_per_s: 5000\n")
    plan = make_plan([], directory=tmp_path, profile=p)
    r = plan["rules"]
    assert r["finetune"]["gpu_hours"] == pytest.approx(r["finetune"]["trained_tokens"] / 20000 / 3600)
    assert r["generate"]["gpu_hours"] == pytest.approx(r["generate"]["generated_tokens"] / 5000 / 3600)
    assert r["summary"]["gpu_hours"] == 0
    assert plan["total"]["gpu_hours"] == pytest.approx(sum(v["gpu_hours"] for v in r.values()))
    assert "GPU-h <=" in render_table(plan)
