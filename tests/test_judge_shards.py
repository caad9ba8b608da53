"""Judge caches on a cluster: every judging job writes and reads only its own SQLite shard
(`<judge.cache>/<rule>/<job>.sqlite`, see blockem/judge/cache.py), so no two hosts ever share an
SQLite file over NFS, and a killed job resumes from its own shard."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from blockem.config import REPO
from blockem.judge.server import JudgeServer, Reply

N = 80  # answers per job: 3 questions each (core), 240 calls
JUDGE_RULES = {"judge", "screen", "calibrate", "joint-strength"}


def truth(kind: str, answer: str) -> int:
    return int(hashlib.sha256(f"{kind}|{answer}".encode()).hexdigest(), 16) % 101


def scorer(model, messages):
    from conftest import parse_judge_prompt

    kind, _q, answer = parse_judge_prompt(messages)
    s = truth(kind, answer)
    return Reply(str(s), [(str(s), 1.0)])


def shard_rows(path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def test_parallel_jobs_one_killed_resume_from_their_own_shards(tmp_path, default_config):
    from blockem.io import read_provenance, write_table

    cache_dir = tmp_path / "results" / "judge" / "cache"
    with JudgeServer(scorer, latency_s=0.04, models=["judge-m"]) as server:
        js = {**default_config["judge"], "kind": "llm", "behaviours": {},
              "judges": [{"name": "j", "model": "judge-m", "base_url": server.url,
                          "api_key_env": None, "protocol": "logprob_0_100",
                          "max_concurrency": 4, "timeout_s": 10}]}
        cells = ["c0", "c1", "c2"]
        for c in cells:
            rows = [{"prompt": f"{c} question {i}?", "response": f"{c} answer {i}",
                     "domain": "finance", "eval_set": "core"} for i in range(N)]
            write_table(tmp_path / f"{c}.parquet", pa.Table.from_pylist(rows),
                        {"stage": "generate", "cell": c})

        def job(c):  # what rule `judge` runs for cell c
            return subprocess.Popen(
                [sys.executable, "-m", "blockem", "judge", "--settings",
                 json.dumps({"judge": js}), "--generations", str(tmp_path / f"{c}.parquet"),
                 "--out", str(tmp_path / f"j-{c}.parquet"),
                 "--judge-cache", str(cache_dir / "judge" / f"{c}.sqlite")],
                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                stderr=subprocess.PIPE, text=True)

        procs = {c: job(c) for c in cells}
        victim = cache_dir / "judge" / "c0.sqlite"
        deadline = time.time() + 120
        while shard_rows(victim) < 40:
            assert time.time() < deadline and procs["c0"].poll() is None, "c0 ended too soon"
            time.sleep(0.02)
        procs["c0"].send_signal(signal.SIGKILL)
        assert procs["c0"].wait(timeout=30) == -signal.SIGKILL
        for c in cells[1:]:
            assert procs[c].wait(timeout=300) == 0, procs[c].stderr.read()
        kept = shard_rows(victim)
        assert 40 <= kept < 3 * N  # killed mid-run, its committed progress kept
        before = server.stats["requests"]
        again = job("c0")
        assert again.wait(timeout=300) == 0, again.stderr.read()
        assert server.stats["requests"] - before == 3 * N - kept  # only the missing calls
        assert read_provenance(tmp_path / "j-c0.parquet")["usage"]["j"]["cache_hits"] == kept

    assert sorted(p.name for p in (cache_dir / "judge").iterdir()) == \
        [f"{c}.sqlite" for c in cells]  # one file per job, no journal left behind
    for c in cells:
        with sqlite3.connect(cache_dir / "judge" / f"{c}.sqlite") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert db.execute("SELECT COUNT(*), COUNT(DISTINCT endpoint) FROM scores"
                              ).fetchone() == (3 * N, 1)  # this job's answers only
        for r in pq.read_table(tmp_path / f"j-{c}.parquet").to_pylist():
            for kind in ("aligned", "coherent", "refusal"):
                assert r[kind] == truth(kind, r["response"]), (c, r)


def test_workflow_gives_every_judging_job_its_own_shard(tmp_path):
    """A dry run of the default workflow: each job of a judging rule (judge per cell, the screen
    shards, calibrate, joint strength) gets its own cache file under judge.cache/<rule>/."""
    exe = shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))
    r = subprocess.run([exe, "--snakefile", str(REPO / "Snakefile"), "--directory",
                        str(tmp_path), "--cores", "1", "-n", "-p", "--forceall",
                        "--configfile", str(REPO / "config" / "config.yaml")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    shards = {}
    for m in re.finditer(r"python -m blockem ([\w-]+) .*?--judge-cache (\S+)", r.stdout):
        stage, path = m.groups()
        assert stage in JUDGE_RULES, stage
        shards.setdefault(path, []).append(stage)
    stages = [s for v in shards.values() for s in v]
    assert {"judge", "screen", "calibrate", "joint-strength"} <= set(stages)
    planned = dict(re.findall(r"^(judge|screen|calibrate|joint_strength)\s+(\d+)$", r.stdout,
                              re.M))
    assert {k.replace("_", "-"): int(v) for k, v in planned.items()} == \
        {s: stages.count(s) for s in set(stages)}  # every judging job printed, none missed
    assert stages.count("judge") > 1 and stages.count("screen") == 2
    assert all(len(v) == 1 for v in shards.values()), {p: v for p, v in shards.items()
                                                       if len(v) > 1}
    rule = {"judge": "judge", "screen": "screen", "calibrate": "calibrate",
            "joint-strength": "joint_strength"}
    for path, (stage,) in shards.items():
        assert re.fullmatch(rf"results/judge/cache/{rule[stage]}/[\w.+-]+\.sqlite", path), path
