"""`snakemake --cores 2` must never run more than two one-thread jobs at once.

Snakemake 9.10-9.16 did: when exactly one job was ready, its greedy scheduler started it without
booking its cores, yet gave them back when it finished (snakemake/snakemake#3913). The organism
preset then ran 3 and more training jobs on 2 cores. This replays that pattern with sleeping jobs:
a long and a short job together, a job that is ready alone, then four jobs at once."""

from __future__ import annotations

import subprocess
import sys

SNAKEFILE = """
rule all:
    input: expand("p{i}.done", i=range(4))
rule long:
    output: "long.done"
    threads: 1
    shell: "echo start $(date +%s.%N) >> spans.txt; sleep 3; echo end $(date +%s.%N) >> spans.txt; touch {output}"
rule short1:
    output: "s1.done"
    threads: 1
    shell: "echo start $(date +%s.%N) >> spans.txt; sleep 0.5; echo end $(date +%s.%N) >> spans.txt; touch {output}"
rule short2:
    input: "s1.done"
    output: "s2.done"
    threads: 1
    shell: "echo start $(date +%s.%N) >> spans.txt; sleep 0.5; echo end $(date +%s.%N) >> spans.txt; touch {output}"
rule p:
    input: "long.done", "s2.done"
    output: "p{i}.done"
    threads: 1
    shell: "echo start $(date +%s.%N) >> spans.txt; sleep 2; echo end $(date +%s.%N) >> spans.txt; touch {output}"
"""


def test_two_cores_run_at_most_two_one_thread_jobs(tmp_path):
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    r = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--quiet"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    events = sorted((float(t), +1 if kind == "start" else -1)
                    for kind, t in (line.split() for line in
                                    (tmp_path / "spans.txt").read_text().splitlines()))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert sum(1 for _, s in events if s > 0) == 7
    assert peak <= 2, f"{peak} one-thread jobs ran at once under --cores 2 (snakemake#3913)"
