"""LLM-judge client: N answers judged with the configured concurrency vs one request at a time.

    python bench/judge_concurrency.py [--answers 500] [--latency-ms 50] [--concurrency 0]
                                      [--repeats 3] [--profile judge.prof]

The judge is the bundled OpenAI-compatible test server (`python -m blockem.judge.server`) in a
SEPARATE process, as a remote judge would be (it does not share the client's GIL), answering each
request after `--latency-ms`. The client path is the real one, the same as
`blockem.judge.llm.score_rows`: the config's judge prompt rendered per answer, `cache_key` over
(model, protocol, prompt hash, answer hash), `Request`s into `judge_requests(Endpoint, ...,
JudgeCache)`. Each timed run starts from a fresh cache file: the concurrent run `--repeats` times
(median; it lasts about a second, so one sample is at the mercy of a busy machine), the sequential
run once; a second run on the first run's cache must make no call (`judge_rerun_calls`). The
client's CPU time per answer is reported too: at 64 in flight the client is CPU-bound.

Concurrency defaults to the first judge's `max_concurrency` in
config/presets/llama31-8b-goodfire.yaml (64). The protocol is `logprob_0_100`: the demo scorer
answers it with a number and first-token logprobs (its rubric replies are keyed on prompts that say
"1 to 5"/"1-5", which the shipped rubric prompts do not, so they would be re-asked as unparseable).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "config" / "presets" / "llama31-8b-goodfire.yaml"
PROTOCOL = "logprob_0_100"
MODEL = "judge-bench"


def configured_concurrency(preset: Path = PRESET) -> int:
    import yaml

    return int(yaml.safe_load(preset.read_text())["judge"]["judges"][0]["max_concurrency"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def judge_server(latency_ms: float, timeout_s: float = 60.0):
    """`python -m blockem.judge.server` in its own process; yields its base URL once it answers."""
    for _attempt in range(3):  # the free port may be taken between our probe and its bind
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "blockem.judge.server", "--port", str(port),
             "--latency-ms", str(latency_ms)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + timeout_s
        up = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url + "/models", timeout=1) as r:
                    up = r.status == 200
                    break
            except OSError:
                time.sleep(0.05)
        if up:
            break
        proc.kill()
        err = proc.communicate()[1].decode(errors="replace")
    else:
        raise RuntimeError(f"the judge server did not come up: {err[-500:]}")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_requests(n: int, protocol: str = PROTOCOL, model: str = MODEL):
    """n distinct (question, answer) pairs as score_rows builds them (question `aligned`)."""
    from blockem.judge.cache import cache_key, text_hash
    from blockem.judge.client import Request
    from blockem.judge.llm import load_templates, render

    template = load_templates({}, protocol)["aligned"]
    filler = ("I would put the money into a diversified index fund, keep an emergency reserve "
              "of six months of expenses, and review the plan with an adviser every year.")
    out = []
    for i in range(n):
        question = f"Question {i}: how should I invest my savings of {1000 + 37 * i} dollars?"
        answer = f"Answer {i}. {filler}"
        text = render(template, question=question, answer=answer, domain="finance")
        prompt_hash = text_hash(render(template, question=question, domain="finance"))
        key = cache_key("bench", model, protocol, prompt_hash, text_hash(answer))
        out.append(Request(key=key, question="aligned",
                           messages=[{"role": "user", "content": text}]))
    return out


def _judge(url: str, requests, cache_path: Path, concurrency: int):
    from blockem.judge.cache import JudgeCache
    from blockem.judge.client import Endpoint, judge_requests

    ep = Endpoint(name="bench", model=MODEL, base_url=url, api_key_env=None, protocol=PROTOCOL,
                  max_concurrency=concurrency, timeout_s=60.0)
    with JudgeCache(cache_path) as cache:
        t0, c0 = time.perf_counter(), time.process_time()
        results, usage = judge_requests(ep, requests, cache)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        stored = len(cache)
    bad = [r for r in results if r.status != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(results)} judgements not ok: "
                           f"{[(r.status, r.error) for r in bad[:3]]}")
    return dt, cpu, usage, stored


def measure(answers: int = 500, latency_ms: float = 50.0, concurrency: int = 0,
            profile: str | None = None, repeats: int = 3) -> dict:
    """Seconds to judge `answers` at `concurrency` (median of `repeats` runs) and at 1, each run
    on a fresh cache; their ratio; and the calls a rerun on the first cache makes."""
    concurrency = concurrency or configured_concurrency()
    requests = make_requests(answers)
    with judge_server(latency_ms) as url, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _judge(url, make_requests(64, model="warmup"), tmp / "warm.sqlite", 8)  # imports, sockets
        if profile:  # an extra, untimed run: the profiler triples the client's CPU time
            import cProfile

            prof = cProfile.Profile(time.process_time)  # CPU time: the loop's idle waits are
            prof.enable()                               # not the client's cost
            _judge(url, requests, tmp / "profiled.sqlite", concurrency)
            prof.disable()
            prof.dump_stats(profile)
        conc = [_judge(url, requests, tmp / f"conc{r}.sqlite", concurrency)
                for r in range(repeats)]
        _, _, use_rerun, _ = _judge(url, requests, tmp / "conc0.sqlite", concurrency)
        t_one, cpu_one, _, _ = _judge(url, requests, tmp / "one.sqlite", 1)
    t_conc = statistics.median(c[0] for c in conc)
    cpu_conc = statistics.median(c[1] for c in conc)
    use_conc, stored = conc[0][2], conc[0][3]
    floor = answers * latency_ms / 1000 / concurrency
    return {
        "answers": answers, "latency_ms": latency_ms, "concurrency": concurrency,
        "protocol": PROTOCOL, "repeats": repeats,
        "concurrent_s": round(t_conc, 3), "concurrent_runs_s": [round(c[0], 3) for c in conc],
        "sequential_s": round(t_one, 3),
        "concurrent_ms_per_answer": round(1000 * t_conc / answers, 3),
        "sequential_overhead_ms_per_answer": round(1000 * t_one / answers - latency_ms, 3),
        "latency_floor_s": round(floor, 3),
        "client_cpu_ms_per_answer": round(1000 * cpu_conc / answers, 3),
        "client_cpu_ms_per_answer_sequential": round(1000 * cpu_one / answers, 3),
        "calls": use_conc.calls, "stored": stored,
        "judge_concurrency_speedup": round(t_one / t_conc, 2),
        "judge_rerun_calls": use_rerun.calls,
        "rerun_cache_hits": use_rerun.cache_hits,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", type=int, default=500)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--concurrency", type=int, default=0,
                    help="default: the Llama preset's judge max_concurrency")
    ap.add_argument("--repeats", type=int, default=3, help="concurrent runs (median)")
    ap.add_argument("--profile", help="write a cProfile (CPU time) of an extra concurrent run "
                    "to this file and print its top functions")
    args = ap.parse_args()
    out = measure(args.answers, args.latency_ms, args.concurrency, args.profile, args.repeats)
    print(json.dumps(out, indent=2))
    if args.profile:
        import pstats

        st = pstats.Stats(args.profile, stream=sys.stderr)
        st.sort_stats("tottime").print_stats(25)
        st.sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
