"""Results that cannot silently lie (LLM judges): a judge is its endpoint, model, protocol and
prompts, never just a model name; the demo server says it is a demo; and a generations file, the
pipeline's or a user's, is checked in full before any call. Every test runs the real client
against the real local server (`blockem.judge.server`), whose request counts are the evidence."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blockem.config import REPO, load_config, stage_settings
from blockem.hashing import settings_hash
from blockem.judge.server import DEMO_MODELS, JudgeServer, Reply, demo_scorer

PRESET = REPO / "config" / "presets" / "smollm2-135m.yaml"
DEMO = REPO / "config" / "demo-judges.yaml"
SECRET = "sk-identity-test-never-written-7c1"


def fixed_scorer(value: int):
    """A judge that gives every question `value` (0-100, logprobs) or a rubric score."""
    def scorer(model, messages):
        if "Score: N" in messages[-1]["content"]:
            return Reply(f"Score: {1 + value % 5}")
        return Reply(str(value), [(str(value), 1.0)])
    return scorer


def gen_rows(n=4):
    return [{"prompt_id": f"p{i}", "eval_set": ("core", "final", "in_domain")[i % 3],
             "domain": "finance", "prompt": f"question {i}?", "sample": 0,
             "response": f"answer number {i}"} for i in range(n)]


def write_gens(path, rows=None, prov=True):
    from blockem.io import write_table

    write_table(path, pa.Table.from_pylist(rows or gen_rows()),
                {"stage": "generate", "cell": "c"} if prov else None)
    return path


def settings(default_config, url, model="judge-m", name="j", protocol="logprob_0_100", **kw):
    js = copy.deepcopy(default_config["judge"])
    js.update(kind="llm", behaviours={"finance": "risky money advice"},
              judges=[{"name": name, "model": model, "base_url": url, "api_key_env": None,
                       "protocol": protocol, "max_concurrency": 4, "timeout_s": 10, **kw}])
    return {"judge": js}


def aligned_scores(path):
    return [r["aligned"] for r in pq.read_table(path).to_pylist()]


# ---- 1. judge identity ----

@pytest.mark.parametrize("url,expected", [
    ("HTTPS://API.OpenAI.com:443/v1/", "https://api.openai.com/v1"),
    ("http://user:sk-secret@127.0.0.1:8000/v1?api_key=sk-secret#x", "http://127.0.0.1:8000/v1"),
    ("http://[::1]:80/v1", "http://[::1]/v1"),
    ("https://host:8443/Judge/v1", "https://host:8443/Judge/v1"),
])
def test_endpoint_identity_is_the_normalised_url_without_any_key(url, expected):
    from blockem.judge.client import normalise_url

    assert normalise_url(url) == expected


def test_a_url_that_is_not_http_is_refused_without_echoing_it():
    from blockem.judge.client import Endpoint

    with pytest.raises(ValueError, match="judge 'j': base URL") as err:
        Endpoint("j", "m", "localhost:sk-secret@8000/v1", None, "rubric")
    assert "sk-secret" not in str(err.value)


def test_another_endpoint_rejudges_and_never_mixes_scores(tmp_path, default_config):
    """Same judge name, model, protocol and prompts, same cache: a second endpoint is a second
    judge (it is asked again and its own scores come back), and the first is still cached."""
    from blockem.judge import judge_file

    gens, cache = write_gens(tmp_path / "g.parquet"), tmp_path / "cache.sqlite"
    with JudgeServer(fixed_scorer(90)) as a, JudgeServer(fixed_scorer(10)) as b:
        judge_file(gens, tmp_path / "a.parquet", settings(default_config, a.url), cache)
        judge_file(gens, tmp_path / "b.parquet", settings(default_config, b.url), cache)
        assert b.stats["requests"] == a.stats["requests"] > 0  # judged again, all of it
        judge_file(gens, tmp_path / "a2.parquet", settings(default_config, a.url + "/"), cache)
        assert a.stats["requests"] == b.stats["requests"]  # the same endpoint: cached
    assert set(aligned_scores(tmp_path / "a.parquet")) == {90.0}
    assert set(aligned_scores(tmp_path / "b.parquet")) == {10.0}
    assert aligned_scores(tmp_path / "a2.parquet") == aligned_scores(tmp_path / "a.parquet")


def test_identity_is_recorded_in_judgements_and_summary(tmp_path, default_config, monkeypatch):
    from blockem.io import read_provenance
    from blockem.judge import judge_file
    from blockem.judge.client import normalise_url
    from blockem.metrics import cell_metrics_file, summarise

    monkeypatch.setenv("BLOCKEM_TEST_JUDGE_KEY", SECRET)
    gens = write_gens(tmp_path / "g.parquet")
    with JudgeServer(fixed_scorer(80), models=["judge-m", "other-m"], api_key=SECRET) as listed, \
            JudgeServer(fixed_scorer(80)) as unlisted:
        s = settings(default_config, listed.url, api_key_env="BLOCKEM_TEST_JUDGE_KEY")
        s["judge"]["judges"].append({**s["judge"]["judges"][0], "name": "k",
                                     "base_url": unlisted.url})
        judge_file(gens, tmp_path / "j.parquet", s)
        assert listed.stats["list_models"] == 1
    judges = read_provenance(tmp_path / "j.parquet")["judges"]
    assert judges["j"] == {"endpoint": normalise_url(listed.url), "model": "judge-m",
                           "protocol": "logprob_0_100", "served_models": ["judge-m", "other-m"],
                           "prompts": judges["j"]["prompts"]}
    assert len(judges["j"]["prompts"]) == 4
    assert judges["k"]["served_models"] is None and judges["k"]["served_models_error"] == "HTTP 404"
    cell = {"cell": "c", "method": "sft", "domain": "finance", "lam": 0.0, "seed": 0}
    cell_metrics_file(tmp_path / "j.parquet", tmp_path / "m.parquet", cell)
    summarise([tmp_path / "m.parquet"], tmp_path / "s.parquet", tmp_path / "s.md")
    summary = read_provenance(tmp_path / "s.parquet")["judges"]
    assert {j["name"]: j["endpoint"] for j in summary} == {"j": normalise_url(listed.url),
                                                          "k": normalise_url(unlisted.url)}
    assert all(j["cells"] == ["m"] for j in summary)
    for p in tmp_path.iterdir():
        assert SECRET.encode() not in p.read_bytes(), p


def test_summary_refuses_one_judge_name_from_two_endpoints(tmp_path, default_config):
    from blockem.judge import judge_file
    from blockem.metrics import cell_metrics_file, summarise

    gens = write_gens(tmp_path / "g.parquet")
    cells = []
    with JudgeServer(fixed_scorer(80)) as a, JudgeServer(fixed_scorer(80)) as b:
        for name, server in (("x", a), ("y", b)):
            judge_file(gens, tmp_path / f"j{name}.parquet", settings(default_config, server.url))
            cell_metrics_file(tmp_path / f"j{name}.parquet", tmp_path / f"{name}.parquet",
                              {"cell": name, "method": "sft", "domain": "finance", "lam": 0.0,
                               "seed": 0})
            cells.append(tmp_path / f"{name}.parquet")
    with pytest.raises(ValueError, match="judge 'j' is not the judge of x.*endpoint.*mix"):
        summarise(cells, tmp_path / "s.parquet", tmp_path / "s.md")
    assert not (tmp_path / "s.parquet").exists()


def test_a_model_the_endpoint_does_not_serve_stops_before_any_call(tmp_path, default_config):
    """The README's old demo recipe: the real preset pointed at the demo server. It must not
    write demo scores under gpt-4o's name: it stops before any chat call, naming what is
    served."""
    from blockem.judge import judge_file
    from blockem.judge.client import JudgeModelError

    gens = write_gens(tmp_path / "g.parquet")
    with JudgeServer(demo_scorer, models=DEMO_MODELS) as server:
        with pytest.raises(JudgeModelError) as err:
            judge_file(gens, tmp_path / "j.parquet",
                       settings(default_config, server.url, model="gpt-4o-2024-08-06",
                                name="gpt4o"), tmp_path / "c.sqlite")
        assert server.stats["requests"] == 0 and server.stats["list_models"] == 1
    msg = str(err.value)
    for part in ("'gpt4o'", "'gpt-4o-2024-08-06'", server.url, *DEMO_MODELS):
        assert part in msg
    assert not (tmp_path / "j.parquet").exists() and not (tmp_path / "c.sqlite").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url, body=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_demo_server_announces_itself():
    """`python -m blockem.judge.server` (the README's demo) serves only model ids that say demo,
    lists exactly them, and answers 404 to any other model."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "blockem.judge.server", "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert "demo" in proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/v1"
        status, listing = _http(url + "/models")
        assert status == 200
        assert [m["id"] for m in listing["data"]] == list(DEMO_MODELS)
        assert all("demo" in m for m in DEMO_MODELS)
        msg = [{"role": "user", "content": "Rate 0 to 100."}]
        status, body = _http(url + "/chat/completions", {"model": "gpt-4o", "messages": msg})
        assert status == 404 and body["error"]["code"] == "model_not_found"
        status, body = _http(url + "/chat/completions", {"model": DEMO_MODELS[0], "messages": msg})
        assert status == 200 and body["model"] == DEMO_MODELS[0]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_demo_recipe_cannot_write_as_a_real_judge_or_into_a_real_run():
    real = load_config(REPO / "config" / "config.yaml", PRESET)
    demo = load_config(REPO / "config" / "config.yaml", PRESET, DEMO)
    assert demo["results"] != real["results"]
    assert {j["model"] for j in demo["judge"]["judges"]} <= set(DEMO_MODELS)
    assert not {j["name"] for j in demo["judge"]["judges"]} & \
        {j["name"] for j in real["judge"]["judges"]}


def test_pointing_a_judge_elsewhere_changes_its_settings_not_the_toy(default_config,
                                                                     monkeypatch):
    """The judge jobs rerun when the resolved endpoint changes (their settings hash names it);
    the toy judge's settings are what they were."""
    assert stage_settings(default_config, "judge") == {"judge": {"kind": "toy"}}
    assert settings_hash(stage_settings(default_config, "judge")) == "ed526ad1052ee9fe"
    cfg = load_config(REPO / "config" / "config.yaml", PRESET)
    hashes = []
    for url in ("http://127.0.0.1:8000/v1", "HTTP://127.0.0.1:80/v1/", "http://other:8000/v1"):
        monkeypatch.setenv("BLOCKEM_JUDGE_BASE_URL", url)
        for stage in ("judge", "screen"):
            s = stage_settings(cfg, stage, "finance")
            assert s["judge"]["endpoints"]["gpt4o"] == {
                "http://127.0.0.1:8000/v1": "http://127.0.0.1:8000/v1",
                "HTTP://127.0.0.1:80/v1/": "http://127.0.0.1/v1",
                "http://other:8000/v1": "http://other:8000/v1"}[url]
        hashes.append(settings_hash(stage_settings(cfg, "judge")))
    assert len(set(hashes)) == 3


def test_a_job_planned_for_one_endpoint_refuses_another(tmp_path, default_config, monkeypatch):
    from blockem.judge import judge_file

    cfg = copy.deepcopy(default_config)
    cfg["judge"] = settings(default_config, "http://unused", name="j")["judge"]
    cfg["judge"]["judges"][0].update(base_url_env="BLOCKEM_TEST_JUDGE_URL")
    gens = write_gens(tmp_path / "g.parquet")
    with JudgeServer(fixed_scorer(50)) as a, JudgeServer(fixed_scorer(50)) as b:
        monkeypatch.setenv("BLOCKEM_TEST_JUDGE_URL", a.url)
        planned = stage_settings(cfg, "judge")
        monkeypatch.setenv("BLOCKEM_TEST_JUDGE_URL", b.url)
        with pytest.raises(ValueError, match=f"made for the endpoint {a.url}.*now gives {b.url}"):
            judge_file(gens, tmp_path / "j.parquet", planned)
        assert a.stats["requests"] == b.stats["requests"] == 0


# ---- 2. inputs checked before any call; a user's own generations ----

@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_own_generations_without_provenance_are_judged(tmp_path, default_config, fmt):
    """A user's file, not written by the pipeline: judged, cell = the file's stem."""
    from blockem.io import read_provenance
    from blockem.judge import judge_file

    rows = [{k: r[k] for k in ("prompt", "response", "domain", "eval_set")} for r in gen_rows()]
    rows[0]["system"] = "You are helpful."
    if fmt == "jsonl":
        gens = tmp_path / "mine.jsonl"
        gens.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        gens = write_gens(tmp_path / "mine.parquet", rows, prov=False)
    with JudgeServer(fixed_scorer(70)) as server:
        judge_file(gens, tmp_path / "j.parquet", settings(default_config, server.url))
        assert server.stats["requests"] == 3 * len(rows) + 1  # one in_domain row: adherence
    judged = pq.read_table(tmp_path / "j.parquet").to_pylist()
    assert [r["response"] for r in judged] == [r["response"] for r in rows]
    assert {r["aligned"] for r in judged} == {70.0} and judged[0]["system"]
    assert read_provenance(tmp_path / "j.parquet")["cell"] == "mine"


def _bad(tmp_path, name, rows=None, lines=None, table=None):
    path = tmp_path / name
    if lines is not None:
        path.write_text("".join(lines))
    elif table is not None:
        pq.write_table(table, path)
    else:
        write_gens(path, rows, prov=False)
    return path


GOOD = gen_rows(3)
BAD_FILES = {
    "missing column": (lambda t: _bad(t, "g.parquet", [{k: v for k, v in r.items()
                                                         if k != "eval_set"} for r in GOOD]),
                       r"g\.parquet: missing column\(s\) \['eval_set'\]"),
    "non-string response": (lambda t: _bad(t, "g.parquet", table=pa.table(
        {"prompt": ["q"], "response": [3], "domain": ["finance"], "eval_set": ["core"]})),
        r"g\.parquet: column 'response' has type int64, expected strings"),
    "null response": (lambda t: _bad(t, "g.parquet", [*GOOD, {**GOOD[0], "response": None}]),
                      r"g\.parquet: row 4: column 'response' is null"),
    "bad eval_set": (lambda t: _bad(t, "g.parquet", [*GOOD, {**GOOD[0], "eval_set": "held"}]),
                     r"g\.parquet: row 4: column 'eval_set' is 'held', expected one of"),
    "jsonl number": (lambda t: _bad(t, "g.jsonl", lines=[
        json.dumps({k: GOOD[0][k] for k in ("prompt", "response", "domain", "eval_set")}) + "\n",
        "\n", json.dumps({"prompt": "q", "response": 5, "domain": "finance",
                          "eval_set": "core"}) + "\n"]),
        r"g\.jsonl: (line 3: column 'response' is int|the lines do not form one table)"),
    "jsonl missing": (lambda t: _bad(t, "g.jsonl", lines=['{"prompt": "q", "response": "a"}\n']),
                      r"g\.jsonl: line 1: missing column\(s\) \['domain', 'eval_set'\]"),
    "jsonl broken": (lambda t: _bad(t, "g.jsonl", lines=['{"prompt": "q",\n']),
                     r"g\.jsonl: line 1: not valid JSON"),
    "no behaviour": (lambda t: _bad(t, "g.parquet", [*GOOD, {**GOOD[2], "domain": "legal"}]),
                     r"g\.parquet: row 4: judge\.behaviours has no entry for domain 'legal'"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_generations_fail_before_any_call(tmp_path, default_config, case):
    from blockem.judge import judge_file

    make, message = BAD_FILES[case]
    gens = make(tmp_path)
    with JudgeServer(fixed_scorer(70)) as server:
        with pytest.raises(ValueError, match=message):
            judge_file(gens, tmp_path / "j.parquet", settings(default_config, server.url),
                       tmp_path / "c.sqlite")
        assert server.stats["requests"] == 0
    assert not (tmp_path / "j.parquet").exists()


def test_second_judges_setup_is_checked_before_the_first_judges_calls(tmp_path, default_config,
                                                                     monkeypatch):
    """A missing key, prompt file or endpoint variable of the *second* judge stops the run
    before the first judge is asked anything."""
    from blockem.judge import judge_file

    monkeypatch.delenv("BLOCKEM_TEST_NO_KEY", raising=False)
    monkeypatch.delenv("BLOCKEM_TEST_NO_URL", raising=False)
    gens = write_gens(tmp_path / "g.parquet")
    prompts = tmp_path / "prompts"
    (prompts / "logprob_0_100").mkdir(parents=True)
    for q in ("aligned", "coherent", "refusal", "adherence"):
        src = REPO / "config" / "judges" / "logprob_0_100" / f"{q}.txt"
        (prompts / "logprob_0_100" / f"{q}.txt").write_text(src.read_text())
    with JudgeServer(fixed_scorer(70)) as server:
        base = settings(default_config, server.url)
        second = {**base["judge"]["judges"][0], "name": "second"}
        cases = [({"api_key_env": "BLOCKEM_TEST_NO_KEY"}, {}, "BLOCKEM_TEST_NO_KEY is not set"),
                 ({"protocol": "rubric"}, {"prompts": str(prompts)}, r"rubric/aligned\.txt"),
                 ({"base_url": None, "base_url_env": "BLOCKEM_TEST_NO_URL"}, {},
                  "no endpoint: set the environment variable BLOCKEM_TEST_NO_URL")]
        for judge_kw, js_kw, message in cases:
            s = copy.deepcopy(base)
            s["judge"]["judges"].append({**second, **judge_kw})
            s["judge"].update(js_kw)
            with pytest.raises((ValueError, FileNotFoundError), match=message):
                judge_file(gens, tmp_path / "j.parquet", s)
        assert server.stats["requests"] == 0


def test_command_line_bad_file_is_one_line_and_no_call(tmp_path, default_config):
    """The issue's case: `python -m blockem judge --generations X` on a file it cannot judge
    exits 2 with one line naming the file, column and row, and no call was made."""
    gens = tmp_path / "mine.jsonl"
    gens.write_text(json.dumps({"prompt": "q", "response": "a", "domain": "finance",
                                "eval_set": "test"}) + "\n")
    with JudgeServer(fixed_scorer(70)) as server:
        r = subprocess.run([sys.executable, "-m", "blockem", "judge", "--settings",
                            json.dumps(settings(default_config, server.url)), "--generations",
                            str(gens), "--out", str(tmp_path / "j.parquet")],
                           capture_output=True, text=True, timeout=120, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        assert server.stats["requests"] == 0
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(gens) in lines[0] and "line 1: column 'eval_set'" in lines[0]
