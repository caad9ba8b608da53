"""`python -m blockem status` on a directory where nothing ran (every job missing), then with the
metadata Snakemake leaves (a started job under a lock: running; without it: interrupted; a job
log without outputs: failed, with its error line; an `Error in rule` block of Snakemake's own log).
The real failure (`faults.fail_cells`) is in test_faults.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from base64 import urlsafe_b64encode
from pathlib import Path

from runner import REPO, SMOKE

TOKENIZER = "results/models/tokenizer"


def status(work: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockem", "status", "--directory", str(work),
                           "--configfile", str(SMOKE), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, **(env or {})})


def jobs(r: subprocess.CompletedProcess) -> dict[str, dict]:
    return {j["name"]: j for j in json.loads(r.stdout)["jobs"]}


def mark_started(work: Path, output: str, slurm_jobid: str | None = None) -> None:
    d = work / ".snakemake" / "incomplete"
    d.mkdir(parents=True, exist_ok=True)
    (d / urlsafe_b64encode(output.encode()).decode()).write_text(
        json.dumps({"external_jobid": slurm_jobid}))


def test_status_of_a_fresh_directory_and_of_snakemakes_metadata(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    r = status(work, "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["total"]["missing"] == len(st["jobs"]) > 40 and st["total"]["done"] == 0
    by = jobs(r)
    assert by["block_train[run=blockem-finance-l10-s0]"]["logs"] == [
        "results/logs/block/train/blockem-finance-l10-s0.log"]
    assert by["generate[cell=sft-finance-s0]"]["outputs"] == [
        "results/generations/sft-finance-s0.parquet"]
    assert "all" not in st["rules"]  # the target rule has no job of its own
    assert not (work / ".snakemake" / "log").exists() or not any(
        (work / ".snakemake" / "log").iterdir())  # status writes no Snakemake log
    table = status(work)
    assert table.returncode == 0 and "ok: nothing failed" in table.stdout
    assert "block_train" in table.stdout and "failed (" not in table.stdout

    # done: the world's outputs; failed: the tokenizer's log says why, no output;
    # running: pretrain started under a lock; interrupted: base started, no lock
    world = [o for o in by["world"]["outputs"]]
    for o in world:
        (work / o).parent.mkdir(parents=True, exist_ok=True)
        (work / o).write_text("x")
    log = work / by["tokenizer"]["logs"][0]
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("Traceback (most recent call last):\n  ...\nblockem tokenizer: error: boom\n"
                   '[usage] {"stage": "tokenizer"}\n')
    mark_started(work, "results/models/pretrained", slurm_jobid="4242")
    locks = work / ".snakemake" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    (locks / "0.output.lock").write_text("results/models/pretrained\n")
    mark_started(work, "results/models/base")
    main_log = work / ".snakemake" / "log" / "2026-01-01T000000.000000.snakemake.log"
    main_log.parent.mkdir(parents=True, exist_ok=True)
    main_log.write_text("Error in rule sae:\n    jobid: 9\n    output: results/sae/model\n"
                        "    log: results/logs/sae.log (check log file(s) for error details)\n"
                        "    shell:\n        python -m blockem sae ...\n\n"
                        "Shutting down, this might take some time.\n")

    shims = tmp_path / "bin"  # SLURM's squeue: the started pretrain job is RUNNING
    shims.mkdir()
    (shims / "squeue").write_text("#!/bin/sh\necho '4242 RUNNING'\n")
    (shims / "squeue").chmod(0o755)
    slurm = {"PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
    r = status(work, "--json", env=slurm)
    assert r.returncode == 1, r.stderr
    by = jobs(r)
    assert by["world"]["state"] == "done"
    assert by["tokenizer"]["state"] == "failed"
    assert by["tokenizer"]["error"] == "blockem tokenizer: error: boom"
    assert by["pretrain"]["state"] == "running" and by["pretrain"]["slurm_jobid"] == "4242"
    assert by["base"]["state"] == "failed" and "interrupted" in by["base"]["error"]
    assert by["sae"]["state"] == "failed" and str(main_log) in by["sae"]["notes"][0]
    assert by["pretrain"]["slurm_state"] == "RUNNING"
    table = status(work, env=slurm)
    assert table.returncode == 1
    out = table.stdout
    assert f"log:   {work / 'results/logs/tokenizer.log'}" in out
    assert "error: blockem tokenizer: error: boom" in out
    assert f"log:   {work / 'results/logs/sae.log'}  (not written)" in out
    assert "pretrain  (SLURM job 4242, RUNNING)" in out and "3 failed" in out


def test_status_names_a_broken_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("block: {grid: 3}\n")
    r = subprocess.run([sys.executable, "-m", "blockem", "status", "--directory", str(tmp_path),
                        "--configfile", str(SMOKE), str(bad)], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("blockem status: error:"), r.stderr
    assert "'block.grid'" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_missing_directory_is_an_error_and_an_old_clean_log_is_not_a_failure(tmp_path):
    r = status(tmp_path / "typo")
    assert r.returncode == 2 and "no such directory (--directory)" in r.stderr, r.stderr
    assert not (tmp_path / "typo").exists()  # nothing made where the typo points
    work = tmp_path / "work"
    log = work / "results" / "logs" / "world.log"
    log.parent.mkdir(parents=True)  # outputs deleted after a run that went well: to redo
    log.write_text('[world] done\n[usage] {"stage": "world"}\n')
    r = status(work, "--json")
    world = [j for j in json.loads(r.stdout)["jobs"] if j["rule"] == "world"]
    assert r.returncode == 0 and [j["state"] for j in world] == ["missing"], r.stdout[-2000:]
    assert "earlier run" in world[0]["notes"][0]
