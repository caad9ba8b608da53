"""The Snakemake workflow end to end on the smoke config, in a temporary directory.

One real run, then: a rerun does nothing, a change to one domain's fine-tune settings reruns only
that domain's cells, a bad config fails before any job with one clear message, and the default
config's DAG dry-runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "config" / "smoke.yaml"


def snakemake(workdir: Path, *args: str, configfiles=(SMOKE,), check=True):
    exe = shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))
    cmd = [exe, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args]
    if configfiles:
        cmd += ["--configfile", *map(str, configfiles)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and r.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in (workdir / "results" / "logs").rglob("*.log"))
        raise AssertionError(f"snakemake failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}\n{logs}")
    return r


def planned_jobs(output: str) -> dict[str, int]:
    """Rule -> count from a dry run's 'Job stats' table."""
    jobs, in_table = {}, False
    for line in output.splitlines():
        if line.startswith("job "):
            in_table = True
            continue
        if in_table:
            m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
            if m and m.group(1) != "total":
                jobs[m.group(1)] = int(m.group(2))
            elif line.strip().startswith("total"):
                break
    return jobs


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke")
    snakemake(workdir)
    return workdir


def test_summary_table_contents(smoke_run):
    table = pq.read_table(smoke_run / "results" / "metrics" / "summary.parquet")
    assert table.column_names == ["cell", "method", "domain", "lam", "seed", "eval_set",
                                  "metric", "value", "sem", "n"]
    rows = table.to_pylist()
    assert {r["cell"] for r in rows} == {"base", "sft-finance-s0", "sft-health-s0",
                                         "steer_repair-finance-s0", "steer_repair_random-finance-s0"}
    for r in rows:
        assert 0.0 <= r["value"] <= 1.0 and r["n"] > 0
        if r["method"] == "base":
            assert r["domain"] is None and r["lam"] is None and r["seed"] is None
        elif r["method"] == "sft":
            assert r["lam"] == 0.0 and r["seed"] == 0
        else:
            assert r["method"] in ("steer_repair", "steer_repair_random")
            assert r["domain"] == "finance" and r["lam"] is None and r["seed"] == 0
    sft = [r for r in rows if r["cell"] == "sft-finance-s0"]
    assert {(r["eval_set"], r["metric"]) for r in sft} == {
        (s, m) for s in ("core", "final", "in_domain")
        for m in ("em_rate", "incoherence_rate", "refusal_rate")} | {("in_domain", "adherence")}
    # the smoke config answers each prompt once: n counts prompts outside the trained domain
    final_n = next(r["n"] for r in sft if r["eval_set"] == "final")
    prompts = pq.read_table(smoke_run / "results" / "world" / "prompts.parquet").to_pylist()
    assert final_n == sum(p["eval_set"] == "final" and p["domain"] != "finance" for p in prompts)
    assert (smoke_run / "results" / "metrics" / "summary.md").read_text().count("| sft-health-s0 |") == 3


def test_outputs_record_provenance(smoke_run):
    from blockem.io import read_provenance

    for d in ("world", "models/tokenizer", "models/pretrained", "models/base",
              "models/sft/finance-s0", "generations/base.parquet", "metrics/summary.parquet"):
        prov = read_provenance(smoke_run / "results" / d)
        assert len(prov["config_hash"]) == 16 and prov["versions"]["torch"], d
    assert read_provenance(smoke_run / "results" / "models/sft/health-s0")["seed"] == 0
    assert (smoke_run / "results" / "models/sft/finance-s0" / "adapter_config.json").exists()
    assert (smoke_run / "results" / "benchmarks" / "pretrain.tsv").exists()
    assert read_provenance(smoke_run / "results" / "sae" / "model")["config_hash"]
    gen = read_provenance(smoke_run / "results" / "generations" / "steer_repair-finance-s0.parquet")
    assert gen["steering"]["set"] == "finance-s0-validreduc" and gen["steering"]["layer"] == 1
    assert read_provenance(smoke_run / "results" / "generations" / "sft-finance-s0.parquet")["steering"] is None
    assert "[pretrain] step" in (smoke_run / "results" / "logs" / "pretrain.log").read_text()


def test_second_run_does_nothing(smoke_run):
    r = snakemake(smoke_run, "-n")
    assert "Nothing to be done" in r.stdout + r.stderr


def test_changing_one_domain_reruns_only_its_cells(smoke_run, tmp_path):
    default_lr = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["finetune"]["default"]["lr"]
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"finetune": {"overrides": {"health": {"lr": default_lr / 3}}}}))
    r = snakemake(smoke_run, "-n", configfiles=(SMOKE, override))
    jobs = planned_jobs(r.stdout)
    assert jobs == {"finetune": 1, "generate": 1, "judge": 1, "cell_metrics": 1, "summary": 1,
                    "all": 1}, r.stdout
    assert "results/models/sft/health-s0" in r.stdout
    assert "results/models/sft/finance-s0" not in r.stdout


def test_bad_config_fails_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"pretrain": {"stepz": 3}}))
    r = snakemake(tmp_path, configfiles=(SMOKE, bad), check=False)
    assert r.returncode != 0
    assert "unknown key 'pretrain.stepz'" in r.stdout + r.stderr
    assert not (tmp_path / "results").exists()


def test_discovery_outputs(smoke_run):
    import json

    latents = smoke_run / "results" / "latents"
    for rule in ("validreduc", "topdelta", "random"):
        doc = json.loads((latents / f"finance-s0-{rule}.json").read_text())
        assert doc["layer"] == 1 and doc["sae"]["source"] == "train"
    assert (latents / "finance-s0-direction.safetensors").exists()
    sanity = pq.read_table(smoke_run / "results" / "sae" / "sanity.parquet").to_pylist()
    assert [r["model"] for r in sanity] == ["base", "sft-finance-s0"]
    joint = json.loads((smoke_run / "results" / "discovery" / "finance-s0" / "joint.json").read_text())
    assert joint["factor"] in (0.0, 0.5, 1.0) and joint["positions"] == "prompt"


def test_deleted_shard_reruns_alone(smoke_run):
    """Runs last in this module. A crash during the screen leaves one shard written, the other
    missing and nothing downstream: the rerun redoes the missing shard (and what follows), not the
    finished shard nor anything before it."""
    res = smoke_run / "results"
    disc = res / "discovery" / "finance-s0"
    kept, lost = disc / "screen" / "0.parquet", disc / "screen" / "1.parquet"
    downstream = [lost, disc / "calibration.parquet", disc / "joint.json",
                  *(res / "latents").glob("finance-s0-*.json"), *res.glob("metrics/summary.*")]
    for cell in ("steer_repair-finance-s0", "steer_repair_random-finance-s0"):
        downstream += [res / d / f"{cell}.parquet" for d in ("generations", "judgements", "metrics/cells")]
    for p in downstream:
        p.unlink()
    kept_mtime = kept.stat().st_mtime_ns
    r = snakemake(smoke_run, "-n")
    jobs = planned_jobs(r.stdout)
    assert jobs["screen"] == 1 and jobs["calibrate"] == 1, r.stdout
    assert not {"sae", "shift", "finetune", "pretrain"} & set(jobs), r.stdout
    screen_job = r.stdout.split("rule screen:")[1].split("\n\n")[0]
    output_line = next(line for line in screen_job.splitlines() if "output:" in line)
    assert output_line.strip().endswith("screen/1.parquet"), screen_job
    snakemake(smoke_run)
    assert lost.exists() and kept.stat().st_mtime_ns == kept_mtime
    assert "Nothing to be done" in snakemake(smoke_run, "-n").stdout


def test_default_config_dry_run(tmp_path):
    r = snakemake(tmp_path, "-n", configfiles=())
    jobs = planned_jobs(r.stdout)
    assert jobs["pretrain"] == 1 and jobs["finetune"] == 1 and jobs["generate"] == 4, r.stdout
    assert jobs["screen"] == 2 and jobs["joint_strength"] == 1, r.stdout
    assert not (tmp_path / "results").exists()
