"""Per-process start-up cost (imports) of the workflow's jobs, and which jobs import heavy packages.

    python bench/startup.py [--results results] [--no-real]

Every rule runs `python -m blockem <stage>` in a fresh process, so each job pays its imports.
Python's import profiler (`-X importtime`, or PYTHONPROFILEIMPORTTIME=1 in the environment) prints
one line per imported module to stderr, which every rule redirects to its log; the top-level lines'
cumulative times sum to the process's import time. Imports in blockem happen inside functions
(`cmd_<stage>` imports its module, which imports more when called), so importing `cmd_<stage>` alone
measures nothing. Two cheap proxies here, no workflow run needed:

- `entry`: for each stage, a fresh process imports exactly what the CLI imports before any stage
  code runs: `blockem.__main__`, `blockem.config` (main) and the import statements in the body of
  `cmd_<stage>` (read with `ast`). Imports made later, inside the stage's own functions, are not
  seen: a lower bound, exact for what the entry point pulls in.
- `real`: one job of each rule (and a steered `generate`), its own shell command from
  `snakemake -n -p --forceall`, run with the import profiler on a temporary copy of `results/` (the
  repository's results are not touched) until no new import line has reached its log for 3 s:
  light rules run to the end; heavy ones are stopped once their start-up is over (~2 min in all).
  Exact for what a job imports while starting; imports made late (e.g. when saving) are missed.

The full measure is `bench/default_run.py` (the whole default workflow with the profiler on), which
uses the parsers below on every job's log.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "sae_lens")
# rules that need none of HEAVY (their jobs read and write tables, JSON and figures)
LIGHT_RULES = ("judge", "cell_metrics", "summary", "train_logs", "figure", "world",
               "block_target", "select")
# rules that may use an SAE (sae_lens): the rest should not import it
SAE_RULES = ("sae", "sae_sanity", "shift", "screen", "calibrate", "select", "joint_strength",
             "block_cache", "block_train", "generate")
# rules that load or train no LoRA adapter (peft), nor does `generate` of the base cell
NO_PEFT_RULES = ("tokenizer", "pretrain", "base", "sae", "block_cache")
_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)\s*$")
WATCH = (*HEAVY, "datasets", "matplotlib")
# A `sitecustomize` put first on PYTHONPATH: on the first real import of a watched package it
# prints who asked for it (the Python stack: blockem's frames and the last importer), which
# `-X importtime` cannot show when the import goes through a lazy module (transformers').
_HOOK = """
import sys, traceback
_WATCH = set(%r)
def _where(f):
    name = f.filename
    for cut in ("/site-packages/", "/blockem/"):
        if cut in name:
            name = ("blockem/" if cut == "/blockem/" else "") + name.split(cut, 1)[1]
            break
    return f"{name}:{f.lineno} {f.name}"
class _ChainFinder:
    def find_spec(self, name, path=None, target=None):
        if name not in _WATCH:
            return None
        stack = traceback.extract_stack()[:-1]
        # a real import comes from _find_and_load_unlocked; importlib.util.find_spec is a probe
        if len(stack) < 2 or stack[-2].name != "_find_and_load_unlocked":
            return None
        _WATCH.discard(name)
        frames = [f for f in stack if not f.filename.startswith("<")
                  and "importlib" not in f.filename and "runpy" not in f.filename
                  and not f.filename.endswith("blockem/__main__.py")]
        keep = [f for f in frames if "/blockem/" in f.filename] + frames[-2:]
        out = []
        for f in keep:
            if _where(f) not in out:
                out.append(_where(f))
        sys.stderr.write(f"[bench-import] {name}: {' > '.join(out)}\\n")
        return None
sys.meta_path.insert(0, _ChainFinder())
"""


@contextlib.contextmanager
def chain_hook_env():
    """Environment additions that turn the import-chain hook on (nothing if the interpreter
    already has a sitecustomize, which ours would hide)."""
    import importlib.util

    if importlib.util.find_spec("sitecustomize") is not None:
        yield {}
        return
    with tempfile.TemporaryDirectory(prefix="bench-importhook-") as d:
        (Path(d) / "sitecustomize.py").write_text(_HOOK % (WATCH,))
        path = os.pathsep.join(p for p in (d, os.environ.get("PYTHONPATH")) if p)
        yield {"PYTHONPATH": path}


def hook_chains(text: str) -> dict[str, str]:
    """{package: 'file:line function > ...'} from the hook's lines in a log."""
    out = {}
    for line in text.splitlines():
        if line.startswith("[bench-import] "):
            name, _, chain = line[len("[bench-import] "):].partition(": ")
            out.setdefault(name, chain.strip())
    return out


# ---- parsing Python's import-time lines ----

def parse_importtime(text: str) -> list[tuple[int, str, float, float]]:
    """(level, module, self s, cumulative s) per `import time:` line, in print order (children
    before their parent). Level 0 is an import made by running code, not by another import."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out.append((len(m.group(3)) // 2, m.group(4), int(m.group(1)) / 1e6,
                        int(m.group(2)) / 1e6))
    return out


def import_seconds(entries) -> float:
    """Total import time: the sum of the top-level lines' cumulative times."""
    return sum(cum for level, _, _, cum in entries if level == 0)


def imported(entries, names=HEAVY) -> list[str]:
    """Which of `names` (top-level packages) were imported."""
    seen = {mod for _, mod, _, _ in entries}
    return [n for n in names if n in seen]


def import_chain(entries, name: str) -> list[str]:
    """Who imported `name` first: [top-level module, ..., name]. The profiler prints a module
    after everything it imports, so a line's importer is the next line one level up."""
    for i, (level, mod, _, _) in enumerate(entries):
        if mod != name:
            continue
        chain, want = [mod], level - 1
        for lv, parent, _, _ in entries[i + 1:]:
            if want < 0:
                break
            if lv == want:
                chain.append(parent)
                want -= 1
        return chain[::-1]
    return []


def top_imports(entries, n: int = 5) -> list[list]:
    """The n most expensive top-level imports: [module, cumulative s]."""
    top = sorted((e for e in entries if e[0] == 0), key=lambda e: -e[3])[:n]
    return [[mod, round(cum, 3)] for _, mod, _, cum in top]


def rule_family(rule: str) -> str:
    return "figure" if rule.startswith("figure_") else rule


def unexpected(rule: str, log: str, heavy: list[str]) -> list[str]:
    """Heavy packages this job imports although its rule should not need them."""
    fam = rule_family(rule)
    bad = [h for h in heavy if fam in LIGHT_RULES and h in ("torch", "transformers", "peft")]
    steered = fam == "generate" and "steer" in Path(log).name
    if "sae_lens" in heavy and (fam not in SAE_RULES or (fam == "generate" and not steered)):
        bad.append("sae_lens")
    base_cell = fam == "generate" and Path(log).stem == "base"
    if "peft" in heavy and (fam in NO_PEFT_RULES or base_cell) and "peft" not in bad:
        bad.append("peft")
    return bad


# ---- the workflow's jobs: rule, shell command and log of each ----

def snakemake_exe() -> str:
    return shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))


def parse_jobs(output: str) -> list[dict]:
    """[{rule, log, cmd}] from Snakemake's job blocks (`rule X:` ... `log: path`, and with -p the
    `Shell command:` line)."""
    jobs, cur = [], None
    for line in output.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            cur = {"rule": m.group(1), "log": None, "cmd": None}
            jobs.append(cur)
            continue
        if cur is None:
            continue
        s = line.strip()
        if s.startswith("log: "):
            cur["log"] = s[5:].split(" (")[0].split(", ")[0]
        elif s.startswith("Shell command: "):
            cur["cmd"] = s[len("Shell command: "):]
    return jobs


def analyse_logs(workdir: Path, jobs: list[dict], benchmarks: bool = True) -> dict:
    """Per job and per rule: import seconds, heavy packages, and the chain of each unexpected
    heavy import, from the jobs' logs under `workdir` (written with the profiler on)."""
    per_rule: dict[str, dict] = defaultdict(lambda: {"jobs": 0, "import_s": 0.0,
                                                     "job_s": 0.0, "heavy": defaultdict(int)})
    findings, total, per_job = [], 0.0, []
    for job in jobs:
        if not job["log"]:
            continue
        path = workdir / job["log"]
        if not path.exists():
            continue
        text = path.read_text(errors="replace")
        entries = parse_importtime(text)
        if not entries:
            continue
        chains = hook_chains(text)
        sec, heavy = import_seconds(entries), imported(entries)
        total += sec
        r = per_rule[job["rule"]]
        r["jobs"] += 1
        r["import_s"] += sec
        for h in heavy:
            r["heavy"][h] += 1
        bench = _benchmark_s(workdir, job["log"]) if benchmarks else None
        if bench is not None:
            r["job_s"] += bench
        per_job.append({"rule": job["rule"], "log": job["log"], "import_s": round(sec, 3),
                        "job_s": bench, "heavy": heavy, "top": top_imports(entries, 3),
                        "chains": {h: chains.get(h) or " > ".join(import_chain(entries, h))
                                   for h in (*heavy, *(w for w in WATCH if w in chains
                                                       and w not in heavy))}})
        for h in unexpected(job["rule"], job["log"], heavy):
            findings.append({"rule": job["rule"], "log": job["log"], "module": h,
                             "chain": chains.get(h) or " > ".join(import_chain(entries, h))})
    rules = {name: {"jobs": r["jobs"], "mean_import_s": round(r["import_s"] / r["jobs"], 3),
                    "total_import_s": round(r["import_s"], 2),
                    "total_job_s": round(r["job_s"], 1) if r["job_s"] else None,
                    "heavy": dict(r["heavy"])}
             for name, r in sorted(per_rule.items())}
    return {"startup_overhead_s": round(total, 2), "per_rule": rules, "per_job": per_job,
            "unexpected_heavy_imports": _dedupe(findings)}


def _benchmark_s(workdir: Path, log: str) -> float | None:
    """The job's wall seconds from its Snakemake benchmark file (same relative name as its log
    under results/benchmarks/), if there is one."""
    parts = Path(log).parts
    if "logs" not in parts:
        return None
    i = parts.index("logs")
    tsv = workdir.joinpath(*parts[:i], "benchmarks", *parts[i + 1:]).with_suffix(".tsv")
    try:
        lines = tsv.read_text().splitlines()
        return round(float(lines[1].split("\t")[0]), 2)
    except (OSError, IndexError, ValueError):
        return None


def _dedupe(findings: list[dict]) -> list[dict]:
    """One finding per (rule, module, chain), with how many jobs showed it."""
    out: dict[tuple, dict] = {}
    for f in findings:
        k = (f["rule"], f["module"], f["chain"])
        if k in out:
            out[k]["jobs"] += 1
        else:
            out[k] = {**f, "jobs": 1}
    return list(out.values())


# ---- proxy 1: what each stage's entry point imports ----

def entry_imports(fn) -> list[str]:
    """The import statements in the body of a `cmd_<stage>` function, as source lines."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return [ast.unparse(node) for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))]


def measure_entry() -> dict:
    """Import seconds and heavy packages of each stage's entry imports, in fresh processes."""
    from blockem.__main__ import parser

    sub = next(a for a in parser()._actions if a.dest == "stage")
    out = {}
    for stage, sp in sub.choices.items():
        fn = sp.get_default("fn")
        code = "\n".join(["import blockem.__main__", "from blockem.config import ConfigError",
                          *entry_imports(fn)])
        r = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=REPO,
                           capture_output=True, text=True, timeout=300, check=False,
                           env=_env_without_profiler())
        entries = parse_importtime(r.stderr)
        out[stage] = {"import_s": round(import_seconds(entries), 3),
                      "heavy": imported(entries), "ok": r.returncode == 0,
                      "imports": entry_imports(fn)}
    return out


# ---- proxy 2: every rule's real command, up to the end of its start-up ----

def dry_run_jobs(workdir: Path, *args: str) -> list[dict]:
    cmd = [snakemake_exe(), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "-n", "-p", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False,
                       env=_env_without_profiler())
    if r.returncode != 0:
        raise RuntimeError(f"snakemake -n failed: {r.stderr[-2000:]}")
    return parse_jobs(r.stdout + "\n" + r.stderr)


def _representatives(jobs: list[dict]) -> list[dict]:
    """One job per rule (figures: one for all), plus a steered generate job."""
    chosen, seen = [], set()
    for job in jobs:
        if not job["cmd"] or not job["log"]:
            continue
        fam = rule_family(job["rule"])
        if fam == "generate" and "steer" in Path(job["log"] or "").name:
            fam = "generate (steered)"
        if fam not in seen:
            seen.add(fam)
            chosen.append(job)
    return chosen


def _run_startup(job: dict, work: Path, quiet_s: float, max_s: float, hook: dict) -> str:
    """Run the job's shell command with the import profiler on; stop it once no new import line
    reached its log for `quiet_s` (its start-up is over) or after `max_s`. 'done' or 'stopped'."""
    log = work / job["log"]
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", **hook}
    proc = subprocess.Popen(["bash", "-c", job["cmd"]], cwd=work, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = last_change = time.monotonic()
    lines = 0
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.25)
                return "done" if rc == 0 else f"failed ({rc})"
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            n = log.read_bytes().count(b"import time:") if log.exists() else 0
            if n != lines:
                lines, last_change = n, now
            if (lines and now - last_change > quiet_s) or now - t0 > max_s:
                return "stopped"
    finally:
        if proc.poll() is None:  # our own child's process group (bash and the job under it)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def measure_real(results: Path = REPO / "results", quiet_s: float = 3.0,
                 max_s: float = 120.0, only: tuple[str, ...] = ()) -> dict:
    """One job of each rule, its real command (from `snakemake -n -p --forceall`) run with the
    import profiler on in a temporary copy of `results` until its imports stop; analysed like the
    full run's logs. Light rules run to the end; heavy ones are stopped once their start-up is
    over (imports made later, e.g. when saving, are missed: a slight underestimate)."""
    if not (results / "metrics" / "summary.parquet").exists():
        raise FileNotFoundError(f"{results}: no finished default run (metrics/summary.parquet)")
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        shutil.copytree(results, work / "results", symlinks=True)
        chosen = [j for j in _representatives(dry_run_jobs(work, "--forceall"))
                  if not only or rule_family(j["rule"]) in only]
        status = {}
        with chain_hook_env() as hook:
            for job in chosen:
                t0 = time.perf_counter()
                status[job["log"]] = _run_startup(job, work, quiet_s, max_s, hook)
                print(f"[startup] {job['rule']}: {status[job['log']]} after "
                      f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        res = analyse_logs(work, chosen, benchmarks=False)
    res.pop("startup_overhead_s")
    for j in res["per_job"]:
        j["status"] = status.get(j["log"])
        j.pop("job_s", None)
    for r in res["per_rule"].values():
        r.pop("total_job_s", None)
    return res


def _env_without_profiler() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPROFILEIMPORTTIME"}


def measure(results: Path = REPO / "results", real: bool = True) -> dict:
    out = {"entry": measure_entry()}
    if real:
        out["real"] = measure_real(results)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=REPO / "results")
    ap.add_argument("--no-real", action="store_true", help="entry-import proxy only")
    args = ap.parse_args()
    print(json.dumps(measure(args.results.resolve(), not args.no_real), indent=2))


if __name__ == "__main__":
    main()
