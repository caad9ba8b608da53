"""Faults: a crash mid-write leaves nothing a later rule would accept, and a cell made to fail on
purpose (`faults.fail_cells`) leaves every other cell complete and reruns alone once the switch is
removed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from runner import REPO, SMOKE, planned_jobs, snakemake


def temps(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.*.tmp"))


# --- atomic writes ----------------------------------------------------------------------------

def test_exception_mid_write_leaves_nothing(tmp_path, monkeypatch):
    import pyarrow.parquet as pq_module

    from blockem.io import atomic_dir, write_json, write_table

    target = tmp_path / "t.parquet"
    real = pq_module.write_table

    def half_then_crash(table, where, **kw):
        Path(where).write_bytes(b"PAR1 half a parquet file")
        raise OSError("disk full")

    monkeypatch.setattr(pq_module, "write_table", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        write_table(target, pa.table({"x": [1, 2, 3]}))
    assert not target.exists() and not temps(target)
    monkeypatch.setattr(pq_module, "write_table", real)

    write_table(target, pa.table({"x": [1, 2, 3]}))  # an earlier complete version ...
    monkeypatch.setattr(pq_module, "write_table", half_then_crash)
    with pytest.raises(OSError):
        write_table(target, pa.table({"x": [4]}))
    assert pq.read_table(target).column("x").to_pylist() == [1, 2, 3]  # ... stays whole
    assert not temps(target)

    out = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"x" * 100)
        raise RuntimeError("killed mid-save")
    assert not out.exists() and not temps(out)
    with pytest.raises(TypeError):
        write_json(tmp_path / "a.json", {"x": 1} | {1j: 2})  # unserialisable key
    assert not (tmp_path / "a.json").exists() and not temps(tmp_path / "a.json")


WRITER = """
import sys
import numpy as np
import pyarrow as pa
from blockem.io import write_table
rng = np.random.default_rng(0)
table = pa.table({f"c{i}": rng.random(6_000_000) for i in range(6)})  # ~290 MB, incompressible
print("ready", flush=True)
write_table(sys.argv[1], table)
print("done", flush=True)
"""


def test_sigkill_mid_write_of_a_large_parquet(tmp_path):
    """A process killed while writing a large parquet leaves no file at the target (only its
    temporary); the next write of that output removes the temporary."""
    target = tmp_path / "big.parquet"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline, partial = time.time() + 120, []
    while not partial and time.time() < deadline and proc.poll() is None:
        partial = [t for t in temps(target) if t.stat().st_size > 0]
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial, "the write was not caught in progress"
    assert not target.exists()  # nothing a later rule would accept
    assert temps(target)  # the killed writer's partial temporary
    with pytest.raises(FileNotFoundError):
        pq.read_table(target)

    from blockem.io import write_table

    write_table(target, pa.table({"x": [1]}))
    assert pq.read_table(target).num_rows == 1 and not temps(target)


# --- injected failure and partial rerun -------------------------------------------------------

FAIL = "blockem-finance-l10-s0"
# a small DAG: one fine-tuning domain, one blocked and one KL cell
TRIM = {"finetune": {"domains": ["finance"]},
        "block": {"grid": [{"method": "blockem", "lambdas": [10]},
                           {"method": "kl", "lambdas": [1.0]}]}}
OTHER_CELLS = ["base", "sft-finance-s0", "steer_repair-finance-s0",
               "steer_repair_random-finance-s0", "kl-finance-l1-s0"]


def cell_outputs(res: Path, cell: str) -> list[Path]:
    return [res / "generations" / f"{cell}.parquet", res / "judgements" / f"{cell}.parquet",
            res / "metrics" / "cells" / f"{cell}.parquet"]


def status(work: Path, *configfiles: Path, json_out: bool = True):
    """`python -m blockem status` of the run in `work` (exit status 1: a job failed)."""
    r = subprocess.run([sys.executable, "-m", "blockem", "status", "--directory", str(work),
                        "--configfile", *map(str, configfiles), *["--json"] * json_out],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode in (0, 1), r.stderr
    return r, (json.loads(r.stdout) if json_out else r.stdout)


def test_failed_cell_reruns_alone(tmp_path):
    from blockem.figures import available

    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert "runtime_env(config)" in common, (
        "workflow/rules/common.smk must export the run-time switches: "
        "os.environ.update(runtime_env(config)) after validate()")
    trim, faults = tmp_path / "trim.yaml", tmp_path / "faults.yaml"
    trim.write_text(yaml.safe_dump(TRIM))
    faults.write_text(yaml.safe_dump({"faults": {"fail_cells": [FAIL]}}))
    work = tmp_path / "work"
    res = work / "results"

    r = snakemake(work, "--keep-going", configfiles=(SMOKE, trim, faults), check=False)
    assert r.returncode != 0, r.stdout[-3000:]
    log = (res / "logs" / "block" / "train" / f"{FAIL}.log").read_text()
    assert f"injected failure for cell {FAIL} (faults.fail_cells)" in log
    for cell in OTHER_CELLS:
        for p in cell_outputs(res, cell):
            assert p.exists(), p
    assert (res / "models" / "block" / "kl-finance-l1-s0" / "train_log.parquet").exists()
    failed = res / "models" / "block" / FAIL
    assert not failed.exists() and not temps(failed)
    assert not any(p.exists() for p in cell_outputs(res, FAIL))
    assert not (res / "metrics" / "summary.parquet").exists()

    # `blockem status` names the failed job and its log; every other cell is done
    r, st = status(work, SMOKE, trim, faults)
    assert r.returncode == 1
    jobs = {j["name"]: j for j in st["jobs"]}
    train = jobs[f"block_train[run={FAIL}]"]
    assert [j["name"] for j in st["jobs"] if j["state"] == "failed"] == [train["name"]]
    assert train["logs"] == [f"results/logs/block/train/{FAIL}.log"]
    assert train["error"] == (f"blockem block: error: injected failure for cell {FAIL} "
                              "(faults.fail_cells)")
    for cell in OTHER_CELLS:
        for rule in ("generate", "judge", "cell_metrics"):
            assert jobs[f"{rule}[cell={cell}]"]["state"] == "done", (rule, cell)
    assert jobs["block_train[run=kl-finance-l1-s0]"]["state"] == "done"
    assert {jobs[f"{rule}[cell={FAIL}]"]["state"] for rule in ("generate", "judge")} == {
        "missing"}
    assert st["total"]["running"] == 0 and st["rules"]["summary"]["missing"] == 1
    r, table = status(work, SMOKE, trim, faults, json_out=False)
    assert r.returncode == 1
    assert f"log:   {res / 'logs' / 'block' / 'train' / f'{FAIL}.log'}" in table, table
    assert "error: blockem block: error: injected failure" in table, table

    done = {p: p.stat().st_mtime_ns for p in res.rglob("*")
            if p.is_file() and not {"logs", "benchmarks"} & set(p.relative_to(res).parts)}

    r = snakemake(work, "-n", configfiles=(SMOKE, trim))
    figures = {f"figure_{f}": 1 for f in available({"blockem", "kl"})}
    assert planned_jobs(r.stdout) == {"block_train": 1, "generate": 1, "judge": 1,
                                      "cell_metrics": 1, "summary": 1, "train_logs": 1,
                                      **figures, "compare": 1, "all": 1}, r.stdout
    assert f"output: results/models/block/{FAIL}" in r.stdout

    snakemake(work, configfiles=(SMOKE, trim))
    assert (failed / "train_log.parquet").exists() and all(p.exists()
                                                           for p in cell_outputs(res, FAIL))
    assert {p: p.stat().st_mtime_ns for p in done} == done  # nothing else was redone
    cells = {r["cell"] for r in pq.read_table(res / "metrics" / "summary.parquet").to_pylist()}
    assert cells == {*OTHER_CELLS, FAIL}
    assert "Nothing to be done" in snakemake(work, "-n", configfiles=(SMOKE, trim)).stdout
    r, st = status(work, SMOKE, trim)
    assert r.returncode == 0 and st["total"]["done"] == len(st["jobs"]), st["total"]
