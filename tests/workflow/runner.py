"""Run Snakemake on this repository's Snakefile in a temporary directory (shared by the workflow
tests)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "config" / "smoke.yaml"


def snakemake(workdir: Path, *args: str, configfiles=(SMOKE,), check=True, env=None,
              timeout=900):
    exe = shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))
    cmd = [exe, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args]
    if configfiles:
        cmd += ["--configfile", *map(str, configfiles)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}"
                         for p in (workdir / "results").rglob("logs/**/*.log"))
        raise AssertionError(f"snakemake failed ({r.returncode}):\n{r.stdout[-4000:]}\n"
                             f"{r.stderr[-6000:]}\n{logs}")
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
