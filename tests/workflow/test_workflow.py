"""The Snakemake workflow end to end on the smoke config, in a temporary directory.

One real run, then: a rerun does nothing, a change to one domain's fine-tune settings reruns only
that domain's cells, a block cell killed mid-run reruns alone, a bad config fails before any job
with one clear message, and the default config's DAG dry-runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from runner import REPO, SMOKE, planned_jobs, snakemake


# the smoke config's block grid: cell -> (method, lambda)
BLOCK_CELLS = {"blockem-finance-l10-s0": ("blockem", 10.0), "random-finance-l10-s0": ("random", 10.0),
               "kl-finance-l1-s0": ("kl", 1.0)}
FIGURES = {"tradeoff", "adherence_sft_loss", "blockem_vs_kl", "training_curves", "selection_rules",
           "core_vs_final", "methods"}


# the smoke run's results directory has a space and a shell metacharacter: every config-derived
# path in a rule's shell command must be quoted (unquoted, `;touch injected` would run)
RESULTS = "results dir;touch injected"
SPACED = REPO / "tests" / "workflow" / "spaced-results.yaml"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke")
    snakemake(workdir, configfiles=(SMOKE, SPACED))
    return workdir


def test_config_paths_are_quoted_in_every_shell_command(smoke_run):
    assert yaml.safe_load(SPACED.read_text())["results"] == RESULTS
    assert (smoke_run / RESULTS / "metrics" / "summary.parquet").exists()
    assert not (smoke_run / "results").exists()  # not split at the space
    assert not list(smoke_run.rglob("injected*"))  # the `;` ran nothing


def test_summary_table_contents(smoke_run):
    table = pq.read_table(smoke_run / RESULTS / "metrics" / "summary.parquet")
    assert table.column_names == ["cell", "method", "domain", "lam", "seed", "eval_set",
                                  "metric", "value", "sem", "n", "epoch", "k_size", "latents_from",
                                  "judge", "empty_intervention"]
    rows = table.to_pylist()
    assert {r["cell"] for r in rows} == {"base", "sft-finance-s0", "sft-health-s0",
                                         "steer_repair-finance-s0", "steer_repair_random-finance-s0",
                                         *BLOCK_CELLS}
    for r in rows:
        assert 0.0 <= r["value"] <= 1.0 and r["n"] > 0
        if r["method"] == "base":
            assert r["domain"] is None and r["lam"] is None and r["seed"] is None
        elif r["method"] == "sft":
            assert r["lam"] == 0.0 and r["seed"] == 0
        elif r["cell"] in BLOCK_CELLS:
            assert (r["method"], r["lam"]) == BLOCK_CELLS[r["cell"]] and r["seed"] == 0
            assert r["domain"] == "finance" and r["latents_from"] == "finance"
        else:
            assert r["method"] in ("steer_repair", "steer_repair_random")
            assert r["domain"] == "finance" and r["lam"] is None and r["seed"] == 0
    sft = [r for r in rows if r["cell"] == "sft-finance-s0"]
    assert {(r["eval_set"], r["metric"]) for r in sft} == {
        (s, m) for s in ("core", "final", "in_domain")
        for m in ("em_rate", "incoherence_rate", "refusal_rate")} | {("in_domain", "adherence")}
    # the smoke config answers each prompt once: n counts prompts outside the trained domain
    final_n = next(r["n"] for r in sft if r["eval_set"] == "final")
    prompts = pq.read_table(smoke_run / RESULTS / "world" / "prompts.parquet").to_pylist()
    assert final_n == sum(p["eval_set"] == "final" and p["domain"] != "finance" for p in prompts)
    assert (smoke_run / RESULTS / "metrics" / "summary.md").read_text().count("| sft-health-s0 |") == 3


def test_outputs_record_provenance(smoke_run):
    from blockem.io import read_provenance

    for d in ("world", "models/tokenizer", "models/pretrained", "models/base",
              "models/sft/finance-s0", "generations/base.parquet", "metrics/summary.parquet"):
        prov = read_provenance(smoke_run / RESULTS / d)
        assert len(prov["config_hash"]) == 16 and prov["versions"]["torch"], d
    assert read_provenance(smoke_run / RESULTS / "models/sft/health-s0")["seed"] == 0
    assert (smoke_run / RESULTS / "models/sft/finance-s0" / "adapter_config.json").exists()
    assert (smoke_run / RESULTS / "benchmarks" / "pretrain.tsv").exists()
    assert read_provenance(smoke_run / RESULTS / "sae" / "model")["config_hash"]
    gen = read_provenance(smoke_run / RESULTS / "generations" / "steer_repair-finance-s0.parquet")
    # the smoke config selects with topdelta (random weights leave validreduc empty)
    assert gen["steering"]["set"] == "finance-s0-topdelta" and gen["steering"]["layer"] == 1
    assert read_provenance(smoke_run / RESULTS / "generations" / "sft-finance-s0.parquet")["steering"] is None
    assert "[pretrain] done " in (smoke_run / RESULTS / "logs" / "pretrain.log").read_text()


# `python -m blockem <stage>` name -> the rule(s) that run it (the usage lines name the stage)
STAGE_RULES = {"pretrain": "pretrain", "base": "base", "finetune": "finetune", "block": "block_train",
               "generate": "generate", "judge": "judge", "screen": "screen",
               "calibrate": "calibrate", "joint-strength": "joint_strength"}


def test_plan_matches_what_the_run_did(smoke_run):
    """`blockem plan` against the usage lines of the smoke run's job logs: job counts and
    sequence counts exactly, tokens as upper bounds (sampling stops early, chats are shorter than
    max_length), per rule."""
    from blockem.plan import COLUMNS, make_plan
    from blockem.usage import read_log_usage

    plan = make_plan([str(SMOKE), str(SPACED)], directory=smoke_run)
    ran: dict[str, dict] = {}
    for log in (smoke_run / RESULTS / "logs").rglob("*.log"):
        u = read_log_usage(log)
        if u is None:
            continue
        rule = STAGE_RULES[u["stage"]]
        acc = ran.setdefault(rule, dict.fromkeys(COLUMNS, 0) | {"jobs": 0})
        acc["jobs"] += 1
        for k in COLUMNS:
            acc[k] += u[k]
    assert set(ran) == {"pretrain", "base", "finetune", "block_train", "generate", "screen",
                        "calibrate", "joint_strength"}, sorted(ran)
    total_jobs = sum(1 for _ in (smoke_run / RESULTS / "benchmarks").rglob("*.tsv"))
    assert plan["total"]["jobs"] == total_jobs  # every job of the run has a benchmark file
    for rule, got in ran.items():
        want = plan["rules"][rule]
        assert want["jobs"] == got["jobs"], rule
        for seqs, toks in (("trained_sequences", "trained_tokens"),
                           ("generated_sequences", "generated_tokens")):
            # the smoke pool is full (3 candidates a sign): discovery's bounds are exact too
            assert got[seqs] == want[seqs], (rule, seqs, got, want)
            assert 0 < got[toks] <= want[toks] if want[seqs] else got[toks] == 0, (rule, got, want)
        assert got["judge_requests"] == want["judge_requests"] == 0  # the toy judge: no request
    assert plan["rules"]["generate"]["generated_sequences"] == 8 * 168  # 8 cells x 168 prompts
    for rule in set(plan["rules"]) - set(ran):  # every other rule consumes none of it
        assert not any(plan["rules"][rule][k] for k in COLUMNS), rule
    left = make_plan([str(SMOKE), str(SPACED)], directory=smoke_run, remaining=True)
    assert left["total"]["jobs"] == 0 and not left["rules"]  # the run is complete


def test_second_run_does_nothing(smoke_run):
    r = snakemake(smoke_run, "-n", configfiles=(SMOKE, SPACED))
    assert "Nothing to be done" in r.stdout + r.stderr


def test_changing_one_domain_reruns_only_its_cells(smoke_run, tmp_path):
    default_lr = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["finetune"]["default"]["lr"]
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"finetune": {"overrides": {"health": {"lr": default_lr / 3}}}}))
    r = snakemake(smoke_run, "-n", configfiles=(SMOKE, SPACED, override))
    jobs = planned_jobs(r.stdout)
    figures = {f"figure_{f}": 1 for f in FIGURES}
    assert jobs == {"finetune": 1, "generate": 1, "judge": 1, "cell_metrics": 1, "summary": 1,
                    "train_logs": 1, **figures, "compare": 1, "all": 1}, r.stdout
    assert f"output: {RESULTS}/models/sft/health-s0" in r.stdout
    assert f"output: {RESULTS}/models/sft/finance-s0" not in r.stdout


def test_bad_config_fails_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"pretrain": {"stepz": 3}}))
    r = snakemake(tmp_path, configfiles=(SMOKE, bad), check=False)
    assert r.returncode != 0
    assert "unknown key 'pretrain.stepz'" in r.stdout + r.stderr
    assert not (tmp_path / "results").exists()


def test_discovery_outputs(smoke_run):
    import json

    latents = smoke_run / RESULTS / "latents"
    for rule in ("topdelta", "random"):
        doc = json.loads((latents / f"finance-s0-{rule}.json").read_text())
        assert doc["layer"] == 1 and doc["sae"]["source"] == "train"
    assert (latents / "finance-s0-direction.safetensors").exists()
    # latent cards (workflow/rules/cards.smk): a page and a JSON per set, one contexts pass
    for rule in ("topdelta", "random"):
        doc = json.loads((latents / f"finance-s0-{rule}.json").read_text())
        cards = json.loads((latents / f"finance-s0-{rule}.cards.json").read_text())
        assert [c["latent"] for c in cards["latents"]] == [k["latent"] for k in doc["latents"]]
        page = (latents / f"finance-s0-{rule}.html").read_text()
        assert all(f'id="latent-{k["latent"]}"' in page for k in doc["latents"])
    assert pq.read_table(latents / "contexts.parquet").num_rows > 0
    assert "[contexts corpus] done " in (smoke_run / RESULTS / "logs" / "latent_contexts.log").read_text()
    sanity = pq.read_table(smoke_run / RESULTS / "sae" / "sanity.parquet").to_pylist()
    assert [r["model"] for r in sanity] == ["base", "sft-finance-s0"]
    joint = json.loads((smoke_run / RESULTS / "discovery" / "finance-s0" / "joint.json").read_text())
    assert joint["factor"] in (0.0, 0.5, 1.0) and joint["positions"] == "prompt"
    # the smoke config keeps empty interventions (allow_empty_interventions), and says so: a
    # factor 0 steer_repair cell is flagged in every summary row, a real factor is not
    assert joint["empty"] == (joint["factor"] == 0.0)
    rows = pq.read_table(smoke_run / RESULTS / "metrics" / "summary.parquet").to_pylist()
    for r in rows:
        if r["method"] in ("steer_repair", "steer_repair_random"):
            assert r["empty_intervention"] is joint["empty"], r
        elif r["method"] in ("base", "sft"):
            assert r["empty_intervention"] is None, r
        else:  # block cells: topdelta/random sets of size 2 are never empty
            assert r["empty_intervention"] is False, r


def test_block_grid_outputs(smoke_run):
    from blockem.io import read_provenance

    res = smoke_run / RESULTS
    for cell, (method, lam) in BLOCK_CELLS.items():
        log = pq.read_table(res / "models" / "block" / cell / "train_log.parquet").to_pylist()
        assert len(log) == 10 and {"sft_loss", "block_loss", "kl", "lr"} <= set(log[0])
        prov = read_provenance(res / "models" / "block" / cell)
        assert prov["settings"]["block"]["method"] == method and prov["seed"] == 0
        if method == "kl":
            assert all(r["block_loss"] == 0 for r in log) and log[-1]["kl"] > 0
        else:  # the cache reference: one per (domain, target)
            assert prov["settings"]["block"]["reference"] == "cache"
    assert sorted(p.name for p in (res / "block" / "cache" / "finance").iterdir()) == [
        "finance-s0-random.safetensors", "finance-s0-topdelta.safetensors"]
    logs = pq.read_table(res / "metrics" / "train_logs.parquet").to_pylist()
    assert {r["cell"] for r in logs} == {*BLOCK_CELLS, "sft-finance-s0", "sft-health-s0"}
    for name in FIGURES:
        for ext in ("png", "pdf"):
            assert (res / "figures" / f"{name}.{ext}").stat().st_size > 1000, name
    # the method comparison (blockem/compare.py): every grid method, sft/base/steering not
    comparison = pq.read_table(res / "metrics" / "comparison.parquet").to_pylist()
    assert {r["method"] for r in comparison} == {m for m, _ in BLOCK_CELLS.values()}
    assert read_provenance(res / "metrics" / "comparison.parquet")["stage"] == "compare"
    assert "## Best point per method" in (res / "metrics" / "comparison.md").read_text()


def test_report_holds_the_figures(smoke_run, tmp_path):
    report = tmp_path / "report.html"
    snakemake(smoke_run, "--report", str(report), configfiles=(SMOKE, SPACED))
    html = report.read_text(errors="replace")
    assert "tradeoff.png" in html and "Safety-quality trade-off" in html
    assert "finance-s0-topdelta.html" in html and "Latent cards" in html


def kill_processes_mentioning(text: str) -> None:
    """SIGKILL every process whose command line contains `text` (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def test_killed_cell_reruns_alone(smoke_run):
    """A run that had not finished one block cell yet (its model and evaluation missing) is
    SIGKILLed, Snakemake and the job together (a node crash or a preemption), while that cell
    trains: no partial model is left, and after `--unlock` the rerun plans that cell and its
    evaluation only."""
    res = smoke_run / RESULTS
    cell = "blockem-finance-l10-s0"
    out = res / "models" / "block" / cell
    shutil.rmtree(out)
    # what a first run that died in this cell would not have written yet (Snakemake does not
    # redo a missing intermediate file whose downstream outputs all exist)
    unfinished = [res / d / f"{cell}.parquet" for d in ("generations", "judgements", "metrics/cells")]
    unfinished += [*res.glob("metrics/summary.*"), res / "metrics" / "train_logs.parquet",
                   *res.glob("figures/*")]
    for p in unfinished:
        p.unlink()
    other = res / "models" / "block" / "random-finance-l10-s0"
    before = other.stat().st_mtime_ns
    exe = shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))
    proc = subprocess.Popen(
        [exe, "--snakefile", str(REPO / "Snakefile"), "--directory", str(smoke_run), "--cores", "2",
         "--configfile", str(SMOKE), str(SPACED)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    training, stale = [], set(out.parent.glob(f".{cell}.*.tmp"))
    while not training and time.time() < deadline and proc.poll() is None:
        # the run's temporary directory exists from the first training step until the rename
        training = [p for p in out.parent.glob(f".{cell}.*.tmp") if p not in stale]
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    kill_processes_mentioning(str(out))  # the job runs in its own session: a crash kills it too
    proc.wait()
    assert training, "the block job was not caught mid-training"
    assert not out.exists()  # the model directory appears only once training finished
    snakemake(smoke_run, "--unlock", configfiles=(SMOKE, SPACED))  # a killed run leaves its lock
    r = snakemake(smoke_run, "-n", "--rerun-incomplete", configfiles=(SMOKE, SPACED))
    jobs = planned_jobs(r.stdout)
    assert jobs.get("block_train") == 1 and jobs["generate"] == 1 and jobs["cell_metrics"] == 1, r.stdout
    assert not {"finetune", "block_cache", "block_target", "sae"} & set(jobs), r.stdout
    snakemake(smoke_run, "--rerun-incomplete", configfiles=(SMOKE, SPACED))
    assert out.exists() and not list(out.parent.glob(f".{cell}.*.tmp"))  # stale temp removed
    assert other.stat().st_mtime_ns == before
    assert "Nothing to be done" in snakemake(smoke_run, "-n", configfiles=(SMOKE, SPACED)).stdout


def test_deleted_shard_reruns_alone(smoke_run):
    """Runs last in this module. A crash during the screen leaves one shard written, the other
    missing and nothing downstream: the rerun redoes the missing shard (and what follows), not the
    finished shard nor anything before it."""
    res = smoke_run / RESULTS
    disc = res / "discovery" / "finance-s0"
    kept, lost = disc / "screen" / "0.parquet", disc / "screen" / "1.parquet"
    downstream = [lost, disc / "calibration.parquet", disc / "joint.json",
                  *(res / "latents").glob("finance-s0-*.json"), *res.glob("metrics/summary.*")]
    for cell in ("steer_repair-finance-s0", "steer_repair_random-finance-s0"):
        downstream += [res / d / f"{cell}.parquet" for d in ("generations", "judgements", "metrics/cells")]
    for p in downstream:
        p.unlink()
    kept_mtime = kept.stat().st_mtime_ns
    r = snakemake(smoke_run, "-n", configfiles=(SMOKE, SPACED))
    jobs = planned_jobs(r.stdout)
    assert jobs["screen"] == 1 and jobs["calibrate"] == 1, r.stdout
    assert not {"sae", "shift", "finetune", "pretrain"} & set(jobs), r.stdout
    screen_job = r.stdout.split("rule screen:")[1].split("\n\n")[0]
    output_line = next(line for line in screen_job.splitlines() if "output:" in line)
    assert output_line.strip().endswith("screen/1.parquet"), screen_job
    snakemake(smoke_run, configfiles=(SMOKE, SPACED))
    assert lost.exists() and kept.stat().st_mtime_ns == kept_mtime
    assert "Nothing to be done" in snakemake(smoke_run, "-n", configfiles=(SMOKE, SPACED)).stdout


def test_default_config_dry_run(tmp_path):
    r = snakemake(tmp_path, "-n", configfiles=())
    jobs = planned_jobs(r.stdout)
    assert jobs["pretrain"] == 1 and jobs["finetune"] == 1 and jobs["generate"] == 7, r.stdout
    assert jobs["screen"] == 2 and jobs["joint_strength"] == 1, r.stdout
    assert jobs["block_train"] == 3 and jobs["block_cache"] == 2, r.stdout
    assert jobs["latent_contexts"] == 1 and jobs["latent_cards"] == 4, r.stdout
    assert not (tmp_path / "results").exists()
