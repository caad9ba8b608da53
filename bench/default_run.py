"""Wall time of the whole default workflow from a clean results/, and its per-job start-up cost.

    python bench/default_run.py [--keep DIR] [--cores 2] [--configfile config/smoke.yaml]

Runs `snakemake --cores 2` on the embedded default in a temporary `--directory` (the repository's
results/ is not touched) with PYTHONPROFILEIMPORTTIME=1, so every job's log (each rule redirects
stderr to results/logs/...) holds Python's import-time lines, and with an import-chain hook
(`bench/startup.py`) naming who imported torch, transformers, peft, sae_lens, datasets and
matplotlib. `startup_overhead_s` is the sum over jobs of their top-level import times; per rule:
jobs, mean import seconds, the rule's summed job seconds (Snakemake benchmark files), and which
jobs imported the heavy packages. About 9-10 minutes on 2 quiet cores. The profiler's own cost
(a line to stderr per imported module) is a few ms per job.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.startup import analyse_logs, chain_hook_env, parse_jobs, snakemake_exe


def measure(workdir: Path | None = None, cores: int = 2, configfiles: tuple = ()) -> dict:
    """Run the default workflow in `workdir` (a new temporary directory if None; it must not
    hold a results/ already) and analyse it. The directory is kept: the caller removes it.
    `configfiles` (e.g. config/smoke.yaml, to test this script quickly) are passed to Snakemake
    with --configfile."""
    work = Path(workdir or tempfile.mkdtemp(prefix="bench-default-"))
    work.mkdir(parents=True, exist_ok=True)
    if (work / "results").exists():
        raise FileExistsError(f"{work}/results exists: the run must start from a clean results/")
    with chain_hook_env() as hook:
        env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", **hook}
        cmd = [snakemake_exe(), "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
               "--cores", str(cores)]
        if configfiles:
            cmd += ["--configfile", *map(str, configfiles)]
        c0 = _children_cpu()
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - t0
        cpu = _children_cpu() - c0
    (work / "snakemake.out").write_text(r.stdout + "\n" + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"snakemake --cores {cores} failed ({r.returncode}); output in "
                           f"{work / 'snakemake.out'}:\n{r.stderr[-3000:]}")
    jobs = parse_jobs(r.stdout + "\n" + r.stderr)
    analysis = analyse_logs(work, jobs)
    job_s = sum(j["job_s"] or 0 for j in analysis["per_job"])
    return {"default_run_s": round(wall, 1), "cpu_s": round(cpu, 1), "cores": cores,
            "jobs": len(jobs),
            "startup_overhead_s": analysis["startup_overhead_s"],
            "startup_fraction_of_job_time": round(analysis["startup_overhead_s"] / job_s, 3)
            if job_s else None,
            "per_rule": analysis["per_rule"],
            "unexpected_heavy_imports": analysis["unexpected_heavy_imports"],
            "per_job": analysis["per_job"], "workdir": str(work)}


def _children_cpu() -> float:
    """User + system CPU seconds of this process's waited-for children (and theirs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, help="run in this directory and keep it")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--configfile", nargs="+", default=[],
                    help="extra config files (config/smoke.yaml: a one-minute check of this "
                         "script, not a measurement)")
    args = ap.parse_args()
    out = measure(args.keep, args.cores, tuple(Path(c).resolve() for c in args.configfile))
    if args.keep is None:
        shutil.rmtree(out.pop("workdir"), ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
