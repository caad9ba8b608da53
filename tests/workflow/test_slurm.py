"""The workflow on a real SLURM with job accounting: the one-node cluster of .ci/slurm-up.sh.

Both status paths of snakemake-executor-plugin-slurm, on one trimmed smoke config (no discovery,
no block grid, one fine-tune domain; 12 cluster jobs) in one results directory:

1. test_shipped_profile_polls_with_sacct: the shipped profiles/slurm (`slurm-status-command:
   sacct`) with only what this cluster needs on top (SACCT_OVERRIDES: the account and partition,
   and faster polling), making world and tokenizer. The first world job is killed (SIGKILL to its
   batch shell: SLURM state FAILED), so the job is resubmitted with twice the memory and time.
   Proof that sacct did the polling: sacct/squeue on PATH are shims that log their calls (the
   plugin's status query names the run: `--name <run id>`), and the plugin's failure message
   carries the sacct-only "Reason"; sacct itself reports every job COMPLETED (the killed one
   FAILED) under the account `blockem`.
2. test_slurm_test_profile_polls_with_squeue: profiles/slurm-test (`squeue`, as on clusters
   without accounting) runs the rest of the DAG. The first pretrain job is cancelled with scancel
   and resubmitted with twice the memory and time. summary.parquet must equal that of a local
   run (`--cores 2`, no profile, started at the beginning beside the SLURM runs) and a second run
   must submit nothing.

When `sinfo` or accounting does not answer, the cluster is started with .ci/slurm-up.sh (as root;
it installs slurm-wlm, slurmdbd, munge and MariaDB with apt) and the daemons it started are
stopped at the end. Without SLURM or the plugin the tests are skipped with the reason printed,
except under CI=true, where they fail instead: CI must not pass without having run them.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
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

SHIPPED = REPO / "profiles" / "slurm"
PROFILE = REPO / "profiles" / "slurm-test"
SLURM_UP = REPO / ".ci" / "slurm-up.sh"
ON_CI = os.environ.get("CI") == "true"
# the trimmed DAG: world, tokenizer, pretrain, base, finetune, generate x2, judge x2,
# cell_metrics x2, summary on SLURM (+ the local `all`)
TRIM = {"finetune": {"domains": ["finance"]}, "discovery": {"domains": []}, "block": {"grid": []}}
CLUSTER_JOBS = {"world": 1, "tokenizer": 1, "pretrain": 1, "base": 1, "finetune": 1,
                "generate": 2, "judge": 2, "cell_metrics": 2, "summary": 1}
# made through profiles/slurm (sacct) in test 1; the rest through profiles/slurm-test in test 2
SACCT_RULES = ("world", "tokenizer")
# what the sacct run changes in profiles/slurm/config.yaml, and nothing else: the account and
# partition of the test cluster (.ci/slurm-up.sh; the profile leaves them to each cluster), and
# polling every 2 s instead of 40 s first and up to 180 s (time only)
ACCOUNT = "blockem"
SACCT_OVERRIDES = {
    "default-resources": {"slurm_account": ACCOUNT, "slurm_partition": "debug"},
    "seconds-between-status-checks": 2,
    "slurm-init-seconds-before-status-checks": 2,
}
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) "
                       r"\(log: (\S+/slurm_logs/rule_(\w+)/\S+\.log)\)")
RUN_ID = re.compile(r"SLURM run ID: ([0-9a-f-]{36})")

pytestmark = pytest.mark.slow


def say(request, line: str) -> None:
    """A line in the terminal even with output captured (CI's log)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[slurm] {line}")


def unavailable(request, reason: str):
    """Skip, but fail under CI=true: a green CI must have run the cluster tests."""
    if ON_CI:
        say(request, f"FAILED (CI=true, no skipping): {reason}")
        pytest.fail(f"CI=true and the SLURM test cannot run: {reason}", pytrace=False)
    say(request, f"SKIPPED: {reason}")
    pytest.skip(reason)


def run(*cmd: str, timeout: int = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(cmd, 1, "", str(e))


def sinfo_ok() -> bool:
    r = run("sinfo", "-h", "-o", "%t", timeout=20)
    return r.returncode == 0 and any(s.strip("*") in ("idle", "mix", "alloc")
                                     for s in r.stdout.split())


def accounting_ok() -> bool:
    """slurmdbd answers (sacct knows jobs) and the account the sacct run uses exists."""
    r = run("sacctmgr", "-n", "-P", "list", "account", "format=account", timeout=20)
    return (r.returncode == 0 and ACCOUNT in r.stdout.split()
            and run("sacct", "-n", "-X", "-S", "now", timeout=20).returncode == 0)


@pytest.fixture(scope="module")
def slurm(request):
    """A SLURM with accounting; started here (and stopped afterwards) if it is not up already."""
    if util.find_spec("snakemake_executor_plugin_slurm") is None:
        unavailable(request, "snakemake-executor-plugin-slurm is not installed "
                             "(pip install snakemake-executor-plugin-slurm==2.8.0)")
    if sinfo_ok() and accounting_ok():
        yield
        return
    started = not sinfo_ok()  # only a cluster this fixture brought up is stopped at the end
    if os.geteuid() != 0:
        unavailable(request, "SLURM with accounting does not answer (sinfo, sacctmgr) and this is "
                             "not root: cannot run .ci/slurm-up.sh")
    say(request, "SLURM with accounting does not answer: starting it with .ci/slurm-up.sh")
    t0 = time.monotonic()
    r = run(str(SLURM_UP), timeout=900)
    if r.returncode != 0 or not sinfo_ok() or not accounting_ok():
        unavailable(request, f".ci/slurm-up.sh failed ({r.returncode}): "
                             f"{(r.stderr or r.stdout).strip()[-600:]}")
    say(request, f"SLURM up in {time.monotonic() - t0:.0f} s")
    yield
    if started:
        r = run(str(SLURM_UP), "--stop", timeout=120)
        say(request, f"stopped the SLURM daemons started for this test: {r.stderr.strip()}")


class Shared:
    """The results directory both runs share, and the local reference run beside them."""

    def __init__(self, root: Path):
        self.root = root
        (root / "trim.yaml").write_text(yaml.safe_dump(TRIM))
        self.configs = (SMOKE, root / "trim.yaml")
        self.on_slurm, self.local = (root / "on-slurm").resolve(), (root / "local").resolve()
        self.on_slurm.mkdir()
        self.local.mkdir()
        self.ref: dict = {}
        self.reference = threading.Thread(target=self._local_run)

    def _local_run(self):
        t = time.monotonic()
        try:
            snakemake(self.local, configfiles=self.configs)
        except Exception as e:  # noqa: BLE001 (re-raised by the test that needs the table)
            self.ref["error"] = e
        self.ref["seconds"] = time.monotonic() - t

    def reference_result(self):
        self.reference.join()
        if "error" in self.ref:
            raise self.ref["error"]
        return self.ref["seconds"]


@pytest.fixture(scope="module")
def shared(slurm, tmp_path_factory):
    s = Shared(tmp_path_factory.mktemp("slurm"))
    s.reference.start()  # mostly overlaps the SLURM runs, which wait on their polling
    yield s
    s.reference.join()


def shims(where: Path) -> tuple[dict, dict[str, Path]]:
    """sacct and squeue on PATH that append their arguments to <name>.calls, then run the real
    command: which one the plugin polls with is then on record. Returns (env, call logs)."""
    where.mkdir(exist_ok=True)
    logs = {}
    for name in ("sacct", "squeue"):
        real = shutil.which(name)
        assert real, f"{name} is not on PATH"
        logs[name] = where / f"{name}.calls"
        shim = where / name
        shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{logs[name]}"\nexec "{real}" "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return {**os.environ, "PATH": f"{where}{os.pathsep}{os.environ['PATH']}"}, logs


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def slurm_snakemake(workdir: Path, profile: Path, *args: str, configfiles, **popen):
    """Snakemake with a SLURM profile (runner.snakemake passes --cores 2, a local run)."""
    exe = shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))
    cmd = [exe, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--profile", str(profile), *args, "--configfile", *map(str, configfiles)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def our_jobs(workdir: Path) -> list[tuple[str, str, str]]:
    """(job id, comment, state) of every SLURM job that ran in `workdir` (squeue keeps finished
    jobs for MinJobAge, an hour on the test cluster)."""
    out = run("squeue", "-h", "-t", "all", "-o", "%i|%k|%T|%Z").stdout
    rows = [line.split("|") for line in out.splitlines() if line.count("|") == 3]
    return [(i, k.strip(), t) for i, k, t, z in rows if Path(z) == workdir]


def show_job(job_id: str) -> dict:
    return dict(re.findall(r"(\w+)=(\S*)", run("scontrol", "show", "job", job_id).stdout))


def sacct_jobs(ids) -> dict[str, dict]:
    """What the accounting database says about jobs: id -> fields."""
    fields = ["JobIDRaw", "JobName", "State", "ExitCode", "Account", "ReqMem", "Timelimit"]
    out = run("sacct", "-n", "-X", "-P", "-j", ",".join(ids), "-o", ",".join(fields)).stdout
    rows = [dict(zip(fields, line.split("|"))) for line in out.splitlines()]
    return {r["JobIDRaw"]: r for r in rows}


def drive(proc, workdir: Path, until: float, act) -> str:
    """Read snakemake's output to its end while calling act(our_jobs) every 0.3 s; on timeout
    or error kill snakemake and cancel its jobs. Returns the log."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout))
    reader.start()
    try:
        while proc.poll() is None and time.monotonic() < until:
            act(our_jobs(workdir))
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
            for job_id, _, state in our_jobs(workdir):
                if state in ("PENDING", "RUNNING"):
                    run("scancel", job_id)
        proc.wait()
        reader.join()
    return "".join(lines)


def read_summary(workdir: Path):
    df = pq.read_table(workdir / "results" / "metrics" / "summary.parquet").to_pandas()
    return df.sort_values(["cell", "eval_set", "metric"]).reset_index(drop=True)


def test_shipped_profile_polls_with_sacct(shared, request, tmp_path):
    shipped = yaml.safe_load((SHIPPED / "config.yaml").read_text())
    assert shipped["slurm-status-command"] == "sacct" and shipped["executor"] == "slurm"
    assert "slurm-status-command" not in SACCT_OVERRIDES
    profile = tmp_path / "profile"
    profile.mkdir()
    (profile / "config.yaml").write_text(yaml.safe_dump({**shipped, **SACCT_OVERRIDES}))
    env, logs = shims(tmp_path / "bin")

    t0 = time.monotonic()
    proc = slurm_snakemake(shared.on_slurm, profile, *SACCT_RULES, configfiles=shared.configs,
                           env=env)
    killed: list[str] = []

    def kill_first_world(jobs):  # SIGKILL the first world job's batch shell: state FAILED
        if not killed:
            for job_id, comment, state in jobs:
                if comment == "rule_world" and state == "RUNNING":
                    if run("scancel", "--batch", "--signal=KILL", job_id).returncode == 0:
                        killed.append(job_id)

    log = drive(proc, shared.on_slurm, t0 + 600, kill_first_world)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, f"snakemake (profiles/slurm) failed ({proc.returncode}):\n{log[-8000:]}"

    submitted = SUBMITTED.findall(log)
    rules = [rule for _, _, rule in submitted]
    assert sorted(rules) == ["tokenizer", "world", "world"], log[-6000:]
    assert killed and killed[0] in {i for i, _, _ in submitted}, log[-4000:]
    run_id = RUN_ID.search(log).group(1)

    # the plugin polled with sacct, never with squeue: the status query names the run
    polls = [c for c in calls(logs["sacct"]) if f"--name {run_id}" in c]
    assert len(polls) >= 2, calls(logs["sacct"])
    assert all("--format=JobIdRaw,State" in c for c in polls), polls
    assert not [c for c in calls(logs["squeue"]) if run_id in c], calls(logs["squeue"])
    assert "Falling back" not in log and "'sacct' unavailable" not in log, log[-4000:]
    # ... and learnt of the failure from sacct (its message has the reason only sacct gives)
    failed = f"SLURM-job '{killed[0]}' failed, SLURM status is: 'FAILED'. Reason"
    assert failed in log, log[-4000:]
    assert "status command is not 'sacct'" not in log, log[-4000:]

    # the accounting database: every job of the run, under the account, COMPLETED (the killed
    # one FAILED), and the retry with twice the memory and time
    acct = sacct_jobs([i for i, _, _ in submitted])
    assert set(acct) == {i for i, _, _ in submitted}, acct
    for job_id, _, rule in submitted:
        row = acct[job_id]
        assert row["JobName"] == run_id and row["Account"] == ACCOUNT, row
        assert show_job(job_id).get("Comment", "").startswith(f"rule_{rule}"), job_id
        if job_id in killed:
            assert (row["State"], row["ExitCode"]) == ("FAILED", "0:9"), row
        else:
            assert (row["State"], row["ExitCode"]) == ("COMPLETED", "0:0"), row
    first, retry = (acct[i] for i, _, r in submitted if r == "world")
    assert (first["ReqMem"], first["Timelimit"]) == ("2000M", "00:10:00"), first
    assert (retry["ReqMem"], retry["Timelimit"]) == ("4000M", "00:20:00"), retry
    for rule in SACCT_RULES:
        assert (shared.on_slurm / "results" / "logs" / f"{rule}.log").is_file(), rule

    say(request, f"profiles/slurm (sacct, {len(polls)} status queries): {len(submitted)} sbatch "
                 f"jobs (world, tokenizer + the retry of world after killing {killed[0]}) in "
                 f"{seconds:.0f} s; sacct: {', '.join(r['State'] for r in acct.values())}")


def test_slurm_test_profile_polls_with_squeue(shared, request, tmp_path):
    import numpy as np
    import pandas as pd

    on_slurm = shared.on_slurm
    env, logs = shims(tmp_path / "bin")
    # what test 1 made is not redone (run alone, this test makes everything)
    done = {"world": on_slurm / "results" / "world" / "corpus.parquet",
            "tokenizer": on_slurm / "results" / "models" / "tokenizer"}
    expected = {r: n for r, n in CLUSTER_JOBS.items() if not (r in done and done[r].exists())}

    t0 = time.monotonic()
    proc = slurm_snakemake(on_slurm, PROFILE, configfiles=shared.configs, env=env)
    cancelled: list[str] = []
    seen: list[dict] = []  # `blockem status --json` while that job was in the queue

    def cancel_first_pretrain(jobs):  # the first pretrain job, pending or running: cancel it
        if not cancelled:
            for job_id, comment, state in jobs:
                if comment == "rule_pretrain" and state in ("PENDING", "RUNNING"):
                    st = subprocess.run(
                        [sys.executable, "-m", "blockem", "status", "--json", "--directory",
                         str(on_slurm), "--configfile", *map(str, shared.configs)],
                        capture_output=True, text=True, timeout=120, env={**os.environ, **env})
                    seen.append({"job_id": job_id, "rc": st.returncode, "out": st.stdout,
                                 "err": st.stderr})
                    subprocess.run(["scancel", job_id], check=True, timeout=30)
                    cancelled.append(job_id)

    log = drive(proc, on_slurm, t0 + 900, cancel_first_pretrain)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, f"snakemake on SLURM failed ({proc.returncode}):\n{log[-8000:]}"
    local_seconds = shared.reference_result()

    # every cluster job went through sbatch: SLURM ids in Snakemake's log, known to slurmctld
    submitted = SUBMITTED.findall(log)
    rules = [rule for _, _, rule in submitted]
    assert {r: rules.count(r) for r in set(rules)} == {**expected, "pretrain": 2}, log[-6000:]
    assert cancelled and cancelled[0] in {i for i, _, _ in submitted}, log[-4000:]
    run_id = RUN_ID.search(log).group(1)
    # the plugin polled with squeue, never with sacct
    polls = [c for c in calls(logs["squeue"]) if f"--name {run_id}" in c]
    assert len(polls) >= 2, calls(logs["squeue"])
    assert not [c for c in calls(logs["sacct"]) if run_id in c], calls(logs["sacct"])
    assert "Falling back" not in log, log[-4000:]

    ctld_log = Path("/var/log/slurm/slurmctld.log")
    ctld = ctld_log.read_text(errors="replace") if os.access(ctld_log, os.R_OK) else None
    acct = sacct_jobs([i for i, _, _ in submitted])
    for job_id, slurm_log, rule in submitted:
        job = show_job(job_id)
        assert job.get("Comment", "").startswith(f"rule_{rule}"), (job_id, job)
        assert Path(job["WorkDir"]) == on_slurm, (job_id, job)
        if job_id in cancelled:
            assert job["JobState"] == "CANCELLED", job
            assert acct[job_id]["State"].startswith("CANCELLED"), acct[job_id]
            continue
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job_id, job)
        assert (acct[job_id]["State"], acct[job_id]["ExitCode"]) == ("COMPLETED", "0:0"), acct
        assert Path(slurm_log).is_file(), slurm_log  # the plugin's per-job log (kept by the profile)
        assert f"rule {rule}:" in Path(slurm_log).read_text()
        if ctld is not None:
            assert f"_job_complete: JobId={job_id} done" in ctld, job_id
    # the retry asked for twice the memory and time (mem_mb and runtime grow with `attempt`)
    first, retry = (show_job(i) for i, _, r in submitted if r == "pretrain")
    assert (first["MinMemoryNode"], first["TimeLimit"]) == ("4000M", "01:00:00"), first
    assert (retry["MinMemoryNode"], retry["TimeLimit"]) == ("8000M", "02:00:00"), retry
    assert f"SLURM-job '{cancelled[0]}' failed, SLURM status is: 'CANCELLED'" in log
    # `blockem status` saw that job in the queue: running, with its SLURM id and squeue's state
    assert seen and seen[0]["rc"] == 0, seen
    import json

    pretrain = [j for j in json.loads(seen[0]["out"])["jobs"] if j["rule"] == "pretrain"]
    assert [(j["state"], j["slurm_jobid"]) for j in pretrain] == [("running", cancelled[0])], seen
    assert pretrain[0]["slurm_state"] in ("PENDING", "RUNNING"), pretrain

    # the same table as the local run
    a, b = read_summary(on_slurm), read_summary(shared.local)
    assert len(a) > 0 and list(a.columns) == list(b.columns)
    numeric = ["value", "sem", "n"]
    pd.testing.assert_frame_equal(a.drop(columns=numeric), b.drop(columns=numeric))
    assert np.allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), rtol=1e-9,
                       atol=0, equal_nan=True), pd.concat([a, b], axis=1)

    # a second run submits nothing
    again = slurm_snakemake(on_slurm, PROFILE, configfiles=shared.configs)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and "Nothing to be done" in out, out[-3000:]
    assert "submitted with SLURM jobid" not in out, out[-3000:]

    say(request, f"profiles/slurm-test (squeue, {len(polls)} status queries): {len(submitted)} "
                 f"sbatch jobs (+ the retry of pretrain after scancel {cancelled[0]}) in "
                 f"{seconds:.0f} s; the local run took {local_seconds:.0f} s; summary.parquet "
                 f"equal ({len(a)} rows)")
