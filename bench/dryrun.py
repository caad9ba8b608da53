"""Seconds for `snakemake -n` (DAG building, no job run) on the paper-scale Llama preset.

    python bench/dryrun.py [--preset config/presets/llama31-8b-goodfire.yaml] [--repeats 3]

The preset's data files are created as empty placeholders in a temporary directory, passed as an
override config `data: {root: <tmp>}`; Snakemake runs in a temporary `--directory`, so nothing in
the repository is touched. The figure is the median wall time of `--repeats` dry runs (each a
fresh process: parsing the Snakefile, validating the config and building the ~1000-job DAG);
`cpu_s` is the median CPU time (user + system) of those processes, which a busy machine inflates
less than the wall time. `scontrol_show_config_s` times `scontrol show config`: the SLURM executor
plugin, when installed, runs it (timeout 10 s) as Snakemake starts, whatever the executor, so a
slow or unreachable slurmctld adds up to 10 s of waiting to every `snakemake` command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "config" / "presets" / "llama31-8b-goodfire.yaml"


def snakemake_exe() -> str:
    return shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))


def placeholder_data(preset: Path, root: Path) -> list[Path]:
    """Create every local data file the preset reads, empty, under `root`."""
    from blockem.config import data_settings, load_config

    cfg = load_config(REPO / "config" / "config.yaml", preset)
    cfg["data"]["root"] = str(root)
    d = data_settings(cfg)
    srcs = [*d["finetune"].values(), *d["prompts"]["core"], *d["prompts"]["final"],
            *(s for v in d["prompts"]["in_domain"].values() for s in v), *d["corpus"]]
    paths = sorted({Path(s["path"]) for s in srcs if "path" in s})
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    return paths


def total_jobs(output: str) -> int | None:
    m = re.search(r"^total\s+(\d+)\s*$", output, re.MULTILINE)
    return int(m.group(1)) if m else None


def scontrol_seconds() -> float | None:
    """Seconds of `scontrol show config`, which snakemake-executor-plugin-slurm runs when it is
    imported (every `snakemake` start, whatever the executor), if SLURM's tools are installed."""
    exe = shutil.which("scontrol")
    if exe is None:
        return None
    t0 = time.perf_counter()
    try:
        subprocess.run([exe, "show", "config"], capture_output=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        pass
    return round(time.perf_counter() - t0, 2)


def measure(preset: Path = PRESET, repeats: int = 3) -> dict:
    times, cpus, jobs = [], [], None
    with tempfile.TemporaryDirectory(prefix="bench-dryrun-") as tmp:
        tmp = Path(tmp)
        files = placeholder_data(preset, tmp / "data")
        override = tmp / "data-root.yaml"
        override.write_text(json.dumps({"data": {"root": str(tmp / "data")}}))  # JSON is YAML
        for i in range(repeats):
            work = tmp / f"work{i}"
            work.mkdir()
            cmd = [snakemake_exe(), "--snakefile", str(REPO / "Snakefile"), "--directory",
                   str(work), "--cores", "2", "-n", "--configfile", str(preset), str(override)]
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPROFILEIMPORTTIME"}
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900,
                               check=False)
            times.append(time.perf_counter() - t0)
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime)
            if r.returncode != 0:
                raise RuntimeError(f"snakemake -n failed ({r.returncode}):\n"
                                   f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
            jobs = total_jobs(r.stdout + r.stderr)
    return {"preset": str(preset.relative_to(REPO)) if preset.is_relative_to(REPO) else str(preset),
            "placeholder_files": len(files), "jobs": jobs, "repeats": repeats,
            "runs_s": [round(t, 2) for t in times],
            "cpu_s": round(statistics.median(cpus), 2),
            "scontrol_show_config_s": scontrol_seconds(),
            "paper_grid_dryrun_s": round(statistics.median(times), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", type=Path, default=PRESET)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(json.dumps(measure(args.preset.resolve(), args.repeats), indent=2))


if __name__ == "__main__":
    main()
