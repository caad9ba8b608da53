"""`python -m blockem status`: which jobs of the workflow are done, failed, running or missing.

Snakemake itself says what the jobs are: the Snakefile is parsed with the run's own config files
and working directory, and its DAG (every job from the world to the figures, done or not, with its
rule, wildcards, output files and log file) is built as `snakemake -n` would build it, without
running, locking or logging anything. Each job's state then comes from the files and from
Snakemake's metadata in `<directory>/.snakemake`:

  running   Snakemake marked the job started (`.snakemake/incomplete/`) and a Snakemake process
            holds the directory's lock (`.snakemake/locks/`); on SLURM with its job id
  failed    its outputs are missing and it was run: its log exists, or a Snakemake log
            (`.snakemake/log/*.snakemake.log`) has an `Error in rule` block for it; or it was
            marked started and no Snakemake holds the lock any more ("interrupted": Snakemake
            was killed; the next run redoes it with --rerun-incomplete)
  done      every output exists (and is not marked started)
  missing   nothing of it yet (waiting for its inputs, or never started)

and `outdated` counts the done jobs Snakemake would run again (changed code, params or inputs, an
input that will be remade). The DAG comes from Snakemake's Python API and the two steps its own
`--summary` runs (`Workflow._prepare_dag`, `_build_dag`): internals, so tests/workflow/
test_status.py fails if a Snakemake release changes them.

For a failed job it names the log to read and its last error line (a `blockem <stage>: error:`
line, the exception of a traceback, ...), and on SLURM the job's SLURM log
(`.snakemake/slurm_logs/rule_<rule>/<wildcards>/<jobid>.log`) when the executor kept one, with
its last error line (a time limit, an OOM kill). A started job's SLURM job id is in its marker;
when `squeue` is on PATH it is asked (5 s at most) for those jobs' states. A stale
lock (Snakemake killed with SIGKILL, a login node rebooted) shows the started jobs as running
until `snakemake --unlock`. Exit status: 0, or 1 when a job failed (2: the config or the workflow
is broken, as for every stage).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from base64 import urlsafe_b64decode
from dataclasses import asdict, dataclass, field
from pathlib import Path

from blockem.config import DEFAULT_CONFIG, REPO

STATES = ("done", "failed", "running", "missing")
ERROR_BLOCK = re.compile(r"^Error in rule (\w+)")


@dataclass
class Job:
    rule: str
    wildcards: dict[str, str]
    outputs: list[str]
    logs: list[str]
    state: str = "missing"
    error: str | None = None  # failed: the last error line of its log (or Snakemake's reason)
    slurm_jobid: str | None = None  # running / interrupted on SLURM
    slurm_log: str | None = None
    slurm_state: str | None = None  # from squeue, for a started job
    outdated: bool = False  # done, but Snakemake would run it again (changed code, params, ...)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        wc = ",".join(f"{k}={v}" for k, v in self.wildcards.items())
        return f"{self.rule}[{wc}]" if wc else self.rule


# --- what the jobs are: Snakemake's DAG -------------------------------------------------------

@contextlib.contextmanager
def _without_scontrol():
    """snakemake-executor-plugin-slurm runs `scontrol show config` (timeout 10 s) when Snakemake
    imports its plugins; `status` submits nothing, so that call answers "no scontrol" at once."""
    import subprocess

    real = subprocess.check_output

    def check_output(cmd, *a, **kw):
        if isinstance(cmd, (list, tuple)) and cmd and cmd[0] == "scontrol":
            raise FileNotFoundError("scontrol (not asked by blockem status)")
        return real(cmd, *a, **kw)

    subprocess.check_output = check_output
    try:
        yield
    finally:
        subprocess.check_output = real


def workflow_jobs(directory: Path, configfiles: list[Path], snakefile: Path) -> list[Job]:
    """Every job of the DAG Snakemake would build for `snakemake --directory directory
    --configfile configfiles` (the target rule without outputs left out), with whether Snakemake
    would (re)run it."""
    with _without_scontrol():
        from snakemake.api import SnakemakeApi
        from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings,
                                              Quietness, ResourceSettings)

    chatter = io.StringIO()  # "Building DAG of jobs...", or the reason the Snakefile fails
    try:
        with contextlib.redirect_stderr(chatter), contextlib.redirect_stdout(chatter), \
                SnakemakeApi(OutputSettings(dryrun=True, quiet={Quietness.ALL},
                                            enable_file_logging=False)) as api:
            wf = api.workflow(ResourceSettings(cores=1),
                              ConfigSettings(configfiles=list(configfiles)),
                              snakefile=snakefile, workdir=directory)
            wf.dag(DAGSettings())  # sets the workflow's DAG settings
            workflow = wf._workflow
            # as `snakemake --summary` does (snakemake/workflow.py): no lock, incomplete ignored
            workflow._prepare_dag(forceall=False, ignore_incomplete=True, lock_warn_only=True,
                                  nolock=True)
            workflow._build_dag()
            dag = workflow.dag
            jobs = []
            for job in dag.jobs:
                if not job.output:
                    continue
                jobs.append(Job(rule=job.rule.name,
                                wildcards={k: str(v) for k, v in job.wildcards_dict.items()},
                                outputs=[str(f) for f in job.output],
                                logs=[str(f) for f in job.log],
                                outdated=bool(dag.needrun(job))))
            order = {r.name: i for i, r in enumerate(workflow.rules)}  # the Snakefile's order
            jobs.sort(key=lambda j: (order.get(j.rule, len(order)), j.name))
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [
            ln for ln in chatter.getvalue().splitlines()
            if ln.strip() and not ln.startswith(("Config file", "Building DAG"))][-6:]
        detail = "; ".join(lines) or type(e).__name__
        raise ValueError(f"Snakemake could not build the workflow's jobs: {detail}") from None
    return jobs


# --- what Snakemake recorded in <directory>/.snakemake ----------------------------------------

def started_outputs(meta: Path) -> dict[str, str | None]:
    """Output file -> external (SLURM) job id of every output Snakemake marked started and not
    finished (`.snakemake/incomplete/`: one file per output, named by its urlsafe base64 path,
    split into '@'-prefixed chunks at the file name length limit)."""
    root = meta / "incomplete"
    out: dict[str, str | None] = {}
    if not root.is_dir():
        return out
    for p in root.rglob("*"):
        if not p.is_file() or p.name == "migration_underway":
            continue
        parts = p.relative_to(root).parts
        try:
            key = urlsafe_b64decode("".join(s.removeprefix("@") for s in parts)).decode()
        except ValueError:
            continue
        try:
            jobid = json.loads(p.read_text() or "{}").get("external_jobid")
        except (OSError, ValueError, AttributeError):
            jobid = None
        out[key] = None if jobid is None else str(jobid)
    return out


def locked_files(meta: Path) -> set[str]:
    """Files locked by a running Snakemake (`.snakemake/locks/<n>.{input,output}.lock`)."""
    out: set[str] = set()
    for lock in sorted((meta / "locks").glob("*.lock")) if (meta / "locks").is_dir() else []:
        with contextlib.suppress(OSError):
            out.update(ln.strip() for ln in lock.read_text().splitlines() if ln.strip())
    return out


def error_blocks(meta: Path) -> dict[str, dict]:
    """Output file -> the last `Error in rule` block naming it in Snakemake's own logs
    (`.snakemake/log/*.snakemake.log`, oldest first): rule, log, message, run log."""
    out: dict[str, dict] = {}
    logdir = meta / "log"
    for main_log in sorted(logdir.glob("*.snakemake.log")) if logdir.is_dir() else []:
        try:
            lines = main_log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        i = 0
        while i < len(lines):
            m = ERROR_BLOCK.match(lines[i])
            if not m:
                i += 1
                continue
            block = {"rule": m.group(1), "run_log": str(main_log), "outputs": [], "log": None,
                     "message": None}
            i += 1
            while i < len(lines) and (lines[i].startswith((" ", "\t")) or not lines[i].strip()):
                line = lines[i].strip()
                key, _, value = line.partition(": ")
                value = value.strip()
                if key == "output":
                    block["outputs"] = [v.strip() for v in value.split(",") if v.strip()]
                elif key == "log":
                    block["log"] = value.split(" (check log")[0].strip()
                elif key == "message" and value not in ("", "None"):
                    block["message"] = value
                elif line.startswith("(") and line.endswith(")") and not block["message"]:
                    block["message"] = line[1:-1]  # "(command exited with non-zero exit code)"
                i += 1
            for o in block["outputs"]:
                out[o] = block
    return out


ERROR_WORDS = re.compile(r"error|exception|killed|cancelled|oom|out of memory|traceback|stopped",
                         re.IGNORECASE)


def _tail(log: Path, size: int = 64_000) -> list[str] | None:
    """The non-empty lines of the last `size` bytes of a log, its `[usage]` line left out (None:
    the log cannot be read)."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - size))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return None
    return [ln for ln in lines if ln and not ln.startswith("[usage]")]


def error_line(log: Path) -> str | None:
    """The log's last line that says something went wrong, or None (a finished job's log)."""
    return next((ln for ln in reversed(_tail(log) or []) if ERROR_WORDS.search(ln)), None)


def last_error(log: Path) -> str | None:
    """The line of a job log that says what went wrong (`error_line`: `blockem <stage>: error:
    ...`, an exception), else its last line (the `[usage]` line skipped)."""
    lines = _tail(log)
    if not lines:
        return None
    return next((ln for ln in reversed(lines) if ERROR_WORDS.search(ln)), lines[-1])


def slurm_log(meta: Path, job: Job, jobid: str | None = None) -> str | None:
    """The SLURM log of the job's latest (or given) SLURM job, as snakemake-executor-plugin-slurm
    names it, if it exists."""
    d = meta / "slurm_logs" / f"rule_{job.rule}" / "_".join(job.wildcards.values()).replace("/",
                                                                                            "_")
    if not d.is_dir():
        return None
    if jobid:
        p = d / f"{jobid}.log"
        return str(p) if p.exists() else None
    logs = sorted(d.glob("*.log"), key=lambda p: p.stat().st_mtime)
    return str(logs[-1]) if logs else None


def squeue_states(jobids: set[str], timeout: float = 5.0) -> dict[str, str]:
    """SLURM job id -> state (PENDING, RUNNING, ...) of the given jobs still in SLURM's queue;
    {} without `squeue` or when it does not answer within `timeout` seconds."""
    import shutil
    import subprocess

    exe = shutil.which("squeue")
    if not jobids or exe is None:
        return {}
    try:
        r = subprocess.run([exe, "-h", "-j", ",".join(sorted(jobids)), "-o", "%i %T"],
                           capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in r.stdout.splitlines():
        jobid, _, state = line.strip().partition(" ")
        if jobid in jobids and state:
            states[jobid] = state.strip()
    return states


# --- the states ---------------------------------------------------------------------------------

def job_states(directory: Path, jobs: list[Job]) -> list[Job]:
    meta = directory / ".snakemake"
    started, locked, errors = started_outputs(meta), locked_files(meta), error_blocks(meta)

    def exists(f: str) -> bool:
        return (directory / f).exists()

    for job in jobs:
        needrun, job.outdated = job.outdated, False
        marked = [o for o in job.outputs if o in started]
        if marked:
            ids = sorted({started[o] for o in marked if started[o]})
            job.slurm_jobid = ids[0] if ids else None
            if set(job.outputs) & locked:
                job.state = "running"
                job.slurm_log = slurm_log(meta, job, job.slurm_jobid)
                continue
            job.state = "failed"
            job.error = ("interrupted: started and not finished, and no Snakemake runs now "
                         "(the next run redoes it with --rerun-incomplete)")
        elif all(exists(o) for o in job.outputs):
            job.state, job.outdated = "done", needrun
            continue
        else:
            ran = [lg for lg in job.logs if exists(lg)]
            blocks = [errors[o] for o in job.outputs if o in errors]
            said = [e for e in (error_line(directory / lg) for lg in ran) if e]
            if not said and not blocks:  # no log, or the log of an earlier run that went well
                job.state = "missing"
                if ran:
                    job.notes.append(f"outputs missing; {ran[0]} is from an earlier run that "
                                     "reported no error")
                continue
            job.state = "failed"
            for lg in ran:
                job.error = last_error(directory / lg) or job.error
            if blocks and not job.error:
                job.error = blocks[-1]["message"] or f"failed (see {blocks[-1]['run_log']})"
            if blocks:
                job.notes.append(f"Snakemake's log: {blocks[-1]['run_log']}")
        job.slurm_log = slurm_log(meta, job, job.slurm_jobid)
        if job.slurm_log:  # "CANCELLED ... DUE TO TIME LIMIT", "oom_kill event", ...
            slurm_error = last_error(Path(job.slurm_log))
            if slurm_error and slurm_error != job.error:
                job.notes.append(f"SLURM: {slurm_error}")
    queued = squeue_states({j.slurm_jobid for j in jobs if j.slurm_jobid})
    for job in jobs:
        job.slurm_state = queued.get(job.slurm_jobid or "")
        if job.state == "failed" and job.slurm_state:
            job.notes.append(f"SLURM job {job.slurm_jobid} is still {job.slurm_state}: scancel "
                             "it, or wait, before running Snakemake again")
    return jobs


def status(directory: str | Path = ".", configfiles=(), snakefile: str | Path | None = None
           ) -> dict:
    """The state of every job: {"directory", "jobs": [...], "rules": {rule: {state: n}}}."""
    directory = Path(directory).resolve()
    if not directory.is_dir():  # Snakemake would create it, and report every job missing
        raise FileNotFoundError(f"{directory}: no such directory (--directory)")
    if snakefile is None:
        snakefile = Path("Snakefile") if Path("Snakefile").exists() else REPO / "Snakefile"
    snakefile = Path(snakefile).resolve()
    configs = [Path(c).resolve() for c in configfiles]
    for c in configs:
        if not c.exists():
            raise FileNotFoundError(f"{c}: config file not found")
    jobs = job_states(directory, workflow_jobs(directory, configs, snakefile))
    rules: dict[str, dict[str, int]] = {}
    for job in jobs:
        counts = rules.setdefault(job.rule, {**dict.fromkeys(STATES, 0), "outdated": 0})
        counts[job.state] += 1
        counts["outdated"] += job.outdated
    return {"directory": str(directory), "snakefile": str(snakefile),
            "configfiles": [str(DEFAULT_CONFIG)] * (snakefile == REPO / "Snakefile")
            + [str(c) for c in configs],
            "total": {s: sum(r[s] for r in rules.values()) for s in (*STATES, "outdated")},
            "rules": rules, "jobs": [{**asdict(j), "name": j.name} for j in jobs]}


def render(st: dict, show_done: bool = False) -> str:
    """The table per rule, then the failed jobs with their logs, then the running ones."""
    cols = (*STATES, "outdated")
    width = max([len("rule"), *map(len, st["rules"])]) + 2
    out = [f"{st['directory']}  ({sum(st['total'][s] for s in STATES)} jobs)", "",
           "rule".ljust(width) + "".join(c.rjust(9) for c in cols)]
    for rule, counts in st["rules"].items():
        out.append(rule.ljust(width) + "".join(str(counts[c] or ".").rjust(9) for c in cols))
    out.append("total".ljust(width) + "".join(str(st["total"][c]).rjust(9) for c in cols))
    jobs = st["jobs"]
    rel = lambda p: p if os.path.isabs(p) else os.path.join(st["directory"], p)  # noqa: E731
    failed = [j for j in jobs if j["state"] == "failed"]
    if failed:
        out += ["", f"failed ({len(failed)}):"]
        for j in failed:
            out.append(f"  {j['name']}")
            for lg in j["logs"]:
                out.append(f"    log:   {rel(lg)}" + ("" if Path(rel(lg)).exists()
                                                       else "  (not written)"))
            if j["slurm_log"]:
                out.append(f"    slurm: {j['slurm_log']}")
            if j["error"]:
                out.append(f"    error: {j['error']}")
            out += [f"    {n}" for n in j["notes"]]
    running = [j for j in jobs if j["state"] == "running"]
    if running:
        out += ["", f"running ({len(running)}):"]
        for j in running:
            extra = (f"  (SLURM job {j['slurm_jobid']}"
                     + (f", {j['slurm_state']})" if j["slurm_state"] else ")")
                     if j["slurm_jobid"] else "")
            out.append(f"  {j['name']}{extra}  log: {', '.join(map(rel, j['logs']))}")
    if st["total"]["outdated"]:
        out += ["", f"outdated: {st['total']['outdated']} done jobs Snakemake would run again "
                "(changed code, params or inputs; `snakemake -n` says why)"]
    if show_done:
        out += ["", "done:"] + [f"  {j['name']}" for j in jobs if j["state"] == "done"]
    out += ["", "ok: nothing failed" if not failed else
            f"{len(failed)} failed: read the logs above, fix, run Snakemake again "
            "(only failed and missing jobs run)"]
    return "\n".join(out)
