"""The workflow on a real SLURM: profiles/slurm-test on the one-node cluster of .ci/slurm-up.sh.

A trimmed smoke config (12 cluster jobs: no discovery, no block grid, one fine-tune domain) runs
through `snakemake --profile profiles/slurm-test`, i.e. snakemake-executor-plugin-slurm: every job
is an sbatch job. The first pretrain job is cancelled with scancel, so the profile's retries
resubmit it, with twice the memory and time (the rules' resources grow with `attempt`). The run's
summary.parquet must equal that of a local run (`--cores 2`, no profile) of the same config, and
a second run must submit nothing.

When `sinfo` does not answer, the test starts the cluster with .ci/slurm-up.sh (as root; it
installs slurm-wlm and munge with apt) and stops the daemons it started at the end; when SLURM
cannot be had, or the plugin is not installed, it is skipped with the reason printed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from importlib import util
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from runner import REPO, SMOKE, snakemake

PROFILE = REPO / "profiles" / "slurm-test"
SLURM_UP = REPO / ".ci" / "slurm-up.sh"
# the trimmed DAG: world, tokenizer, pretrain, base, finetune, generate x2, judge x2,
# cell_metrics x2, summary on SLURM (+ the local `all`)
TRIM = {"finetune": {"domains": ["finance"]}, "discovery": {"domains": []}, "block": {"grid": []}}
CLUSTER_JOBS = {"world": 1, "tokenizer": 1, "pretrain": 1, "base": 1, "finetune": 1,
                "generate": 2, "judge": 2, "cell_metrics": 2, "summary": 1}
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) "
                       r"\(log: (\S+/slurm_logs/rule_(\w+)/\S+\.log)\)")

pytestmark = pytest.mark.slow


def say(request, line: str) -> None:
    """A line in the terminal even with output captured (CI's log)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[slurm] {line}")


def sinfo_ok() -> bool:
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20,
                           check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and any(s.strip("*") in ("idle", "mix", "alloc")
                                     for s in r.stdout.split())


@pytest.fixture(scope="module")
def slurm(request):
    """A SLURM that answers; started here (and stopped afterwards) if it is not up already."""
    def skip(reason):
        say(request, f"SKIPPED: {reason}")
        pytest.skip(reason)

    if util.find_spec("snakemake_executor_plugin_slurm") is None:
        skip("snakemake-executor-plugin-slurm is not installed "
             "(pip install snakemake-executor-plugin-slurm==2.8.0)")
    started = False
    if not sinfo_ok():
        if os.geteuid() != 0:
            skip("sinfo does not answer and this is not root: cannot run .ci/slurm-up.sh")
        say(request, "sinfo does not answer: starting a one-node SLURM with .ci/slurm-up.sh")
        t0 = time.monotonic()
        try:
            r = subprocess.run([str(SLURM_UP)], capture_output=True, text=True, timeout=600,
                               check=False)
        except subprocess.TimeoutExpired:
            skip(".ci/slurm-up.sh did not finish in 600 s")
        if r.returncode != 0 or not sinfo_ok():
            skip(f".ci/slurm-up.sh failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-600:]}")
        started = True
        say(request, f"SLURM up in {time.monotonic() - t0:.0f} s")
    yield
    if started:
        r = subprocess.run([str(SLURM_UP), "--stop"], capture_output=True, text=True, timeout=60,
                           check=False)
        say(request, f"stopped the SLURM daemons started for this test: {r.stderr.strip()}")


def slurm_snakemake(workdir: Path, *args: str, configfiles, **popen):
    """Snakemake with the SLURM test profile (runner.snakemake passes --cores 2, a local run)."""
    exe = shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))
    cmd = [exe, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--profile", str(PROFILE), *args, "--configfile", *map(str, configfiles)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def our_jobs(workdir: Path) -> list[tuple[str, str, str]]:
    """(job id, comment, state) of every SLURM job that ran in `workdir` (squeue keeps finished
    jobs for MinJobAge, an hour on the test cluster)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%k|%T|%Z"], capture_output=True,
                         text=True, timeout=30, check=False).stdout
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 3]
    return [(i, k.strip(), t) for i, k, t, z in rows if Path(z) == workdir]


def show_job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                         timeout=30, check=False).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def read_summary(workdir: Path):
    df = pq.read_table(workdir / "results" / "metrics" / "summary.parquet").to_pandas()
    return df.sort_values(["cell", "eval_set", "metric"]).reset_index(drop=True)


def test_slurm_profile_runs_the_workflow_through_sbatch(slurm, request, tmp_path_factory):
    import numpy as np
    import pandas as pd

    root = tmp_path_factory.mktemp("slurm")
    trim = root / "trim.yaml"
    trim.write_text(yaml.safe_dump(TRIM))
    on_slurm, local = (root / "on-slurm").resolve(), (root / "local").resolve()
    on_slurm.mkdir()
    local.mkdir()
    configs = (SMOKE, trim)

    # the local reference run, beside the SLURM run (which mostly waits on its polling)
    ref: dict = {}

    def local_run():
        t = time.monotonic()
        try:
            snakemake(local, configfiles=configs)
        except Exception as e:  # noqa: BLE001 (re-raised below, in the test's thread)
            ref["error"] = e
        ref["seconds"] = time.monotonic() - t

    reference = threading.Thread(target=local_run)
    reference.start()

    t0 = time.monotonic()
    proc = slurm_snakemake(on_slurm, configfiles=configs)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout))
    reader.start()
    cancelled = None
    try:
        while proc.poll() is None and time.monotonic() - t0 < 900:
            if cancelled is None:  # the first pretrain job, pending or running: cancel it
                for job_id, comment, state in our_jobs(on_slurm):
                    if comment == "rule_pretrain" and state in ("PENDING", "RUNNING"):
                        subprocess.run(["scancel", job_id], check=True, timeout=30)
                        cancelled = job_id
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
            for job_id, _, state in our_jobs(on_slurm):
                if state in ("PENDING", "RUNNING"):
                    subprocess.run(["scancel", job_id], timeout=30, check=False)
        proc.wait()
        reader.join()
        reference.join()
    seconds = time.monotonic() - t0
    log = "".join(lines)
    assert proc.returncode == 0, f"snakemake on SLURM failed ({proc.returncode}):\n{log[-8000:]}"
    if "error" in ref:
        raise ref["error"]

    # every cluster job went through sbatch: SLURM ids in Snakemake's log, known to slurmctld
    submitted = SUBMITTED.findall(log)
    rules = [rule for _, _, rule in submitted]
    expected = {**CLUSTER_JOBS, "pretrain": 2}  # + the resubmitted pretrain
    assert {r: rules.count(r) for r in set(rules)} == expected, log[-6000:]
    assert cancelled is not None and cancelled in {i for i, _, _ in submitted}, log[-4000:]
    ctld_log = Path("/var/log/slurm/slurmctld.log")
    ctld = ctld_log.read_text(errors="replace") if os.access(ctld_log, os.R_OK) else None
    for job_id, slurm_log, rule in submitted:
        job = show_job(job_id)
        assert job.get("Comment", "").startswith(f"rule_{rule}"), (job_id, job)
        assert Path(job["WorkDir"]) == on_slurm, (job_id, job)
        if job_id == cancelled:
            assert job["JobState"] == "CANCELLED", job
            continue
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job_id, job)
        assert Path(slurm_log).is_file(), slurm_log  # the plugin's per-job log (kept by the profile)
        assert f"rule {rule}:" in Path(slurm_log).read_text()
        if ctld is not None:
            assert f"_job_complete: JobId={job_id} done" in ctld, job_id
    # the retry asked for twice the memory and time (mem_mb and runtime grow with `attempt`)
    first, retry = (show_job(i) for i, _, r in submitted if r == "pretrain")
    assert (first["MinMemoryNode"], first["TimeLimit"]) == ("4000M", "01:00:00"), first
    assert (retry["MinMemoryNode"], retry["TimeLimit"]) == ("8000M", "02:00:00"), retry
    assert f"SLURM-job '{cancelled}' failed, SLURM status is: 'CANCELLED'" in log

    # the same table as the local run
    a, b = read_summary(on_slurm), read_summary(local)
    assert len(a) > 0 and list(a.columns) == list(b.columns)
    numeric = ["value", "sem", "n"]
    pd.testing.assert_frame_equal(a.drop(columns=numeric), b.drop(columns=numeric))
    assert np.allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), rtol=1e-9,
                       atol=0, equal_nan=True), pd.concat([a, b], axis=1)

    # a second run submits nothing
    again = slurm_snakemake(on_slurm, configfiles=configs)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and "Nothing to be done" in out, out[-3000:]
    assert "submitted with SLURM jobid" not in out, out[-3000:]

    say(request, f"{len(submitted)} sbatch jobs ({len(submitted) - 1} + the retry of pretrain after "
                 f"scancel {cancelled}) in {seconds:.0f} s; the local run took "
                 f"{ref['seconds']:.0f} s; summary.parquet equal ({len(a)} rows)")
