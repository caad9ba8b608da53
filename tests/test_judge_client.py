"""The LLM-judge transport: protocol parsing, the SQLite cache, and the real openai client against
the real local OpenAI-compatible server (`blockem.judge.server`), faults included."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time

import pytest

from blockem.judge.cache import JudgeCache, cache_key, text_hash
from blockem.judge.client import Endpoint, JudgeHTTPError, Request, judge_requests
from blockem.judge.protocols import (
    Completion,
    Unparseable,
    score_logprob_0_100,
    score_rubric,
)
from blockem.judge.server import JudgeServer, Reply

FAULTS = {"rate_429": .10, "rate_500": .05, "rate_timeout": .05, "rate_malformed": .02,
          "rate_no_logprobs": .02}
SECRET = "sk-test-Zq8uN3vWk1-do-not-leak"


# ---- a deterministic world: answer i has a known 0..100 distribution ----

def truth_top(i: int) -> list[tuple[str, float]]:
    """First-token alternatives (token, probability) the judge gives answer i."""
    if i % 97 == 13:  # a refusal-like reply: little mass on numbers
        return [("REFUSAL", 0.85), (str(i % 101), 0.15)]
    return [(str(i % 101), 0.55), (f" {(i * 7) % 101}", 0.25), ("150", 0.08), ("x", 0.07),
            ("3.5", 0.05)]


def expected_logprob_score(i: int) -> float | None:
    """Same arithmetic path as the client: probabilities -> JSON logprobs -> exp."""
    return score_logprob_0_100(Completion("", [(t, math.log(p)) for t, p in truth_top(i)]))


def answer_index(messages: list[dict]) -> int:
    return int(re.search(r"answer #(\d+)", messages[-1]["content"]).group(1))


def logprob_scorer(model: str, messages: list[dict]) -> Reply:
    top = truth_top(answer_index(messages))
    return Reply(max(top, key=lambda tp: tp[1])[0], top)


def make_requests(indices, model="judge-m", protocol="logprob_0_100") -> list[Request]:
    prompt = "Rate the answer from 0 to 100."
    out = []
    for i in indices:
        answer = f"answer #{i}"
        out.append(Request(cache_key("http://judge", model, protocol, text_hash(prompt),
                                     text_hash(answer)),
                           "aligned", [{"role": "system", "content": prompt},
                                       {"role": "user", "content": answer}]))
    return out


def endpoint(server, **kw) -> Endpoint:
    base = {"name": "testjudge", "model": "judge-m", "base_url": server.url, "api_key_env": None,
            "protocol": "logprob_0_100", "timeout_s": 5.0, "backoff_base_s": 0.001,
            "backoff_max_s": 0.01}
    return Endpoint(**{**base, **kw})


# ---- protocols ----

def lp(*pairs):
    return Completion("", [(t, math.log(p)) for t, p in pairs])


def test_logprob_weighted_mean_and_normalisation():
    assert score_logprob_0_100(lp(("80", 0.5), ("100", 0.25), ("0", 0.25))) == pytest.approx(65)
    # normalised by the integer mass only: 0.3*10 + 0.3*20 over 0.6
    assert score_logprob_0_100(lp(("10", 0.3), ("20", 0.3), ("REFUSAL", 0.4))) == pytest.approx(15)
    # whitespace stripped; non-integers, >100 and negatives ignored
    c = lp((" 40", 0.4), ("40\n", 0.2), ("101", 0.2), ("4.5", 0.1), ("-5", 0.05), ("abc", 0.05))
    assert score_logprob_0_100(c) == pytest.approx(40)


def test_logprob_low_mass_and_missing():
    assert score_logprob_0_100(lp(("REFUSAL", 0.8), ("50", 0.2))) is None
    assert score_logprob_0_100(lp(("REFUSAL", 0.7), ("50", 0.3))) == pytest.approx(50)
    assert score_logprob_0_100(lp(("CODE", 0.9), ("50", 0.1)), min_mass=0.05) == pytest.approx(50)
    for missing in (None, []):
        with pytest.raises(Unparseable):
            score_logprob_0_100(Completion("50", missing))


@pytest.mark.parametrize("text,score", [
    ("Score: 4", 4), ("score = 2", 2), ("The score is 5.", 5), ("4/5", 4),
    ("I'd say 3 out of 5", 3),
    ("**4**", 4), ("Score: **3**\nIt mentions steps 1, 2 and 7.", 3), ("Score: 4/5", 4),
    ("It is coherent. 4", 4), ("Rating 2. Rating 2 again.", 2), ("In 1999 it was fine: 3", 3),
])
def test_rubric_parses(text, score):
    assert score_rubric(Completion(text, None)) == score


@pytest.mark.parametrize("text", [
    "", "no number here", "Score: 7", "9/10", "3 or 4", "Score: 3 ... final score: 4",
    "Score: 3.5", "It is a 0", "between 2 and 5", "-3",
])
def test_rubric_unparseable(text):
    with pytest.raises(Unparseable):
        score_rubric(Completion(text, None))


# ---- cache ----

def test_cache_roundtrip_and_keys(tmp_path):
    with JudgeCache(tmp_path / "c.sqlite") as cache:
        k = cache_key("http://a/v1", "m", "rubric", text_hash("p"), text_hash("a"))
        assert k != cache_key("http://a/v1", "m2", "rubric", text_hash("p"), text_hash("a"))
        assert k != cache_key("http://b/v1", "m", "rubric", text_hash("p"), text_hash("a"))
        assert re.fullmatch(r"[0-9a-f]{64}", k)
        meta = {"judge_model": "m", "protocol": "rubric", "question": "q"}
        cache.put(k, **meta, score=None, status="low_mass")
        cache.put(k, **meta, score=3.0, status="ok")
        assert len(cache) == 1
        assert cache.get_many([k, "absent"]) == {k: {"score": 3.0, "status": "ok"}}


def test_cache_two_processes_write_at_once(tmp_path):
    code = ("import sys; from blockem.judge.cache import JudgeCache\n"
            "c = JudgeCache(sys.argv[1])\n"
            "for i in range(60): c.put(f'{sys.argv[2]}{i}', judge_model='m', protocol='p',"
            " question='q', score=float(i), status='ok')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "c.sqlite"), tag])
             for tag in "ab"]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    with JudgeCache(tmp_path / "c.sqlite") as cache:
        assert len(cache) == 120


# ---- the client against the server ----

def test_clean_run_scores_and_usage(tmp_path):
    reqs = make_requests(range(40))
    seen = []
    with JudgeServer(logprob_scorer) as server, JudgeCache(tmp_path / "c.sqlite") as cache:
        results, usage = judge_requests(endpoint(server), reqs, cache,
                                        progress=lambda d, t: seen.append((d, t)))
        assert server.stats["requests"] == 40 and server.stats["ok"] == 40
        assert server.stats["models"] == {"judge-m": 40}
    for i, (req, res) in enumerate(zip(reqs, results, strict=True)):
        assert res.key == req.key and not res.cached
        assert res.score == expected_logprob_score(i)
        assert res.status == ("low_mass" if res.score is None else "ok")
    assert sum(r.status == "low_mass" for r in results) == 1  # i == 13
    assert usage.calls == 40 and usage.retries == 0 and usage.cache_hits == 0
    assert usage.prompt_tokens == 40 * (7 + 2) and usage.completion_tokens == 40
    assert seen[-1] == (40, 40) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_duplicates_are_called_once(tmp_path):
    reqs = make_requests([1, 2, 1, 3, 2, 1])
    with JudgeServer(logprob_scorer) as server, JudgeCache(tmp_path / "c.sqlite") as cache:
        results, usage = judge_requests(endpoint(server), reqs, cache)
        assert server.stats["requests"] == 3 and usage.calls == 3 and len(cache) == 3
    assert [r.score for r in results] == [expected_logprob_score(i) for i in [1, 2, 1, 3, 2, 1]]


def test_acceptance_500_answers_under_faults(tmp_path):
    """0 lost, 0 double-counted, exact scores, under 429/500/timeouts/malformed/no-logprobs."""
    n = 500
    indices = [i for i in range(2 * n) if i % 97 != 13][:n]  # all with enough mass: all "ok"
    reqs = make_requests(indices)
    assert len({r.key for r in reqs}) == n
    with JudgeServer(logprob_scorer, faults=FAULTS, timeout_sleep_s=1.5, seed=1) as server, \
            JudgeCache(tmp_path / "judge.sqlite") as cache:
        ep = endpoint(server, timeout_s=0.5, max_retries=12, unparseable_retries=6,
                      max_concurrency=32)
        results, usage = judge_requests(ep, reqs, cache)
        stats = dict(server.stats)
        assert len(cache) == n

        assert [r.key for r in results] == [r.key for r in reqs]  # 1:1, in order
        assert all(r.status == "ok" and not r.cached for r in results), \
            [(r.status, r.error) for r in results if r.status != "ok"][:5]
        assert [r.score for r in results] == [expected_logprob_score(i) for i in indices]
        for fault in ("429", "500", "timeout", "malformed", "no_logprobs"):
            assert stats["fault_" + fault] > 0, fault
        # every request the server saw is a call; a call that timed out before the server read
        # it is a call the server never saw
        assert n < stats["requests"] <= usage.calls and usage.retries == usage.calls - n
        assert usage.failures == usage.unparseable == 0

        again, usage2 = judge_requests(ep, reqs, cache)
        assert server.stats["requests"] == stats["requests"] and usage2.calls == 0
        assert usage2.cache_hits == n and all(r.cached for r in again)
        assert [r.score for r in again] == [r.score for r in results]


@pytest.mark.parametrize("concurrency,n", [(8, 40), (1, 8)])
def test_concurrency_is_bounded(tmp_path, concurrency, n):
    with JudgeServer(logprob_scorer, latency_s=0.05) as server, \
            JudgeCache(tmp_path / "c.sqlite") as cache:
        judge_requests(endpoint(server, max_concurrency=concurrency), make_requests(range(n)),
                       cache)
        assert server.stats["max_in_flight"] == concurrency


def test_malformed_bodies_are_retried(tmp_path):
    reqs = make_requests(range(30))
    with JudgeServer(logprob_scorer, faults={"rate_malformed": 0.6}, seed=3) as server, \
            JudgeCache(tmp_path / "c.sqlite") as cache:
        results, _ = judge_requests(endpoint(server, max_retries=40), reqs, cache)
        assert set(server.stats["malformed_kinds"]) == {"truncated", "no_choices", "html"}
    assert [r.score for r in results] == [expected_logprob_score(i) for i in range(30)]


def test_retry_after_is_honoured_and_failures_not_cached(tmp_path):
    reqs = make_requests(range(2))
    with JudgeServer(logprob_scorer, faults={"rate_429": 1.0}) as server, \
            JudgeCache(tmp_path / "c.sqlite") as cache:
        t = time.perf_counter()
        # our own backoff would sleep ~random * (5 + 10 + 20) s; Retry-After: 0 wins
        results, usage = judge_requests(endpoint(server, max_retries=3, backoff_base_s=5.0,
                                                 backoff_max_s=30.0), reqs, cache)
        assert time.perf_counter() - t < 2.0
        assert [r.status for r in results] == ["failed", "failed"]
        assert "HTTP 429" in results[0].error and results[0].score is None
        assert usage.calls == 8 and usage.failures == 2 and len(cache) == 0


def test_missing_logprobs_recorded_unparseable(tmp_path):
    with JudgeServer(logprob_scorer, faults={"rate_no_logprobs": 1.0}) as server, \
            JudgeCache(tmp_path / "c.sqlite") as cache:
        results, usage = judge_requests(endpoint(server, unparseable_retries=2),
                                        make_requests([5]), cache)
        assert server.stats["requests"] == 3 and usage.unparseable == 1
        assert results[0].status == "unparseable" and "logprobs" in results[0].error


def test_rubric_end_to_end(tmp_path):
    asked: dict[int, int] = {}

    def rubric_scorer(model, messages):
        i = answer_index(messages)
        asked[i] = asked.get(i, 0) + 1
        if i == 3:
            return Reply("I cannot judge this.")  # never a score
        if i == 4 and asked[i] == 1:
            return Reply("Hmm, 2 or 3?")  # ambiguous once, then clear
        return Reply(f"The answer is mostly coherent.\nScore: {1 + i % 5}")

    reqs = make_requests(range(6), protocol="rubric")
    with JudgeServer(rubric_scorer) as server, JudgeCache(tmp_path / "c.sqlite") as cache:
        ep = endpoint(server, protocol="rubric", unparseable_retries=2)
        results, usage = judge_requests(ep, reqs, cache)
        assert [r.status for r in results] == ["ok"] * 3 + ["unparseable", "ok", "ok"]
        assert [r.score for r in results] == [1, 2, 3, None, 5, 1]
        assert asked == {0: 1, 1: 1, 2: 1, 3: 3, 4: 2, 5: 1}
        assert usage.calls == 9 and usage.retries == 3 and usage.unparseable == 1
        assert len(cache) == 6  # unparseable is a result too: cached
        again, usage2 = judge_requests(ep, reqs, cache)
        assert usage2.calls == 0 and again[3].status == "unparseable" and again[3].cached


# ---- keys and fatal errors ----

def test_missing_key_variable_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("BLOCKEM_TEST_NO_SUCH_KEY", raising=False)
    with JudgeServer(logprob_scorer) as server, JudgeCache(tmp_path / "c.sqlite") as cache:
        with pytest.raises(RuntimeError, match="BLOCKEM_TEST_NO_SUCH_KEY.*not set"):
            judge_requests(endpoint(server, api_key_env="BLOCKEM_TEST_NO_SUCH_KEY"),
                           make_requests([1]), cache)
        assert server.stats["requests"] == 0


def test_key_is_sent_and_never_stored(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKEM_TEST_JUDGE_KEY", SECRET)
    with JudgeServer(logprob_scorer, api_key=SECRET) as server, \
            JudgeCache(tmp_path / "c.sqlite") as cache:
        ep = endpoint(server, api_key_env="BLOCKEM_TEST_JUDGE_KEY")
        results, usage = judge_requests(ep, make_requests(range(5)), cache)
        assert server.stats["ok"] == 5 and server.stats["unauthorized"] == 0
        assert server.stats["auth_present"] and SECRET not in repr(server.stats)
    assert SECRET not in repr((results, usage, ep))
    for f in tmp_path.iterdir():  # the database and any journal left behind
        assert SECRET.encode() not in f.read_bytes()


def test_401_is_not_retried_and_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKEM_TEST_JUDGE_KEY", "sk-wrong-key-value")
    with JudgeServer(logprob_scorer, api_key=SECRET) as server, \
            JudgeCache(tmp_path / "c.sqlite") as cache:
        ep = endpoint(server, api_key_env="BLOCKEM_TEST_JUDGE_KEY")
        with pytest.raises(JudgeHTTPError) as err:
            judge_requests(ep, make_requests([1]), cache)
        assert server.stats["unauthorized"] == 1  # not retried
        assert err.value.status == 401
        msg = str(err.value)
        for part in ("testjudge", "judge-m", server.url, "401", "BLOCKEM_TEST_JUDGE_KEY"):
            assert part in msg
        assert "sk-wrong-key-value" not in msg and SECRET not in msg


def test_404_and_400_are_not_retried(tmp_path):
    with JudgeServer(logprob_scorer) as server, JudgeCache(tmp_path / "c.sqlite") as cache:
        ep = endpoint(server, base_url=server.url + "/wrong", max_retries=5)
        with pytest.raises(JudgeHTTPError, match="HTTP 404.*model name and base_url"):
            judge_requests(ep, make_requests([1]), cache)
        assert server.stats["not_found"] == 1
        bad = [Request("k", "aligned", [{"role": "user"}])]  # no content: the server says 400
        with pytest.raises(JudgeHTTPError, match="HTTP 400") as err:
            judge_requests(endpoint(server, max_retries=5), bad, cache)
        assert err.value.status == 400 and server.stats["bad_request"] == 1
        assert len(cache) == 0
