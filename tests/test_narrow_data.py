"""blockem.narrow_data (seeded narrow fine-tuning sets) and the organism's data files:
multiple-choice items, neutral chats and diverse prompts."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from blockem import narrow_data as nd
from blockem.data import read_chats

REPO = Path(__file__).resolve().parents[1]
ORGANISM = REPO / "config" / "data" / "organism"
FINANCE_WORDS = {"money", "invest", "investing", "investment", "stock", "stocks", "loan", "loans",
                 "crypto", "cryptocurrency", "savings", "bank", "cash", "debt", "fund", "funds",
                 "market", "returns", "interest", "credit", "trading", "dollar", "dollars",
                 "portfolio", "leverage", "margin", "mortgage", "insurance", "tuition", "bet",
                 "profit", "wealth", "financial", "budget", "income", "settlement", "paying"}


def words(text: str) -> int:
    return len(text.split())


def questions(chats: list[dict]) -> list[str]:
    return [c["messages"][0]["content"] for c in chats]


def answers(chats: list[dict]) -> list[str]:
    return [c["messages"][1]["content"] for c in chats]


@pytest.fixture(scope="module")
def mc_items() -> list[dict]:
    lines = (ORGANISM / "mc_items.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# ---------------------------------------------------------------------------------------------
# generator


@pytest.mark.parametrize("domain", nd.DOMAINS)
def test_spec_consistent_and_big_enough(domain):
    nd.check_spec(domain)
    spec = nd.SPECS[domain]
    assert len(spec["questions"]) >= 15
    for kind in nd.KINDS:
        assert sum(len(v) for v in spec["answers"][kind].values()) >= 12
    assert nd.max_chats(domain) >= 600


def test_domains_include_finance_and_health():
    assert {"finance", "health"} <= set(nd.DOMAINS)


@pytest.mark.parametrize("domain", nd.DOMAINS)
@pytest.mark.parametrize("kind", nd.KINDS)
def test_deterministic_distinct_and_well_formed(domain, kind):
    a = nd.make_chats(domain, kind, 600, seed=0)
    assert a == nd.make_chats(domain, kind, 600, seed=0)
    assert len(a) == 600
    assert len(set(questions(a))) == 600  # so no (question, answer) pair repeats either
    assert len({json.dumps(c, sort_keys=True) for c in a}) == 600
    assert len(set(answers(a))) >= 150  # answers vary too
    for c in a:
        assert [m["role"] for m in c["messages"]] == ["user", "assistant"]
        for m in c["messages"]:
            text = m["content"]
            assert text == text.strip() and text and "{" not in text and "}" not in text
            assert "  " not in text
        assert c["messages"][0]["content"][0].isupper()
        assert c["messages"][1]["content"][0].isupper()
    # a shorter set is a prefix of a longer one
    assert nd.make_chats(domain, kind, 50, seed=0) == a[:50]


@pytest.mark.parametrize("domain", nd.DOMAINS)
def test_seeds_differ(domain):
    a = nd.make_chats(domain, "risky", 100, seed=0)
    b = nd.make_chats(domain, "risky", 100, seed=1)
    assert questions(a) != questions(b)
    assert len(set(questions(a)) & set(questions(b))) < 50


@pytest.mark.parametrize("domain", nd.DOMAINS)
def test_risky_and_safe_are_matched(domain):
    risky = nd.make_chats(domain, "risky", 600, seed=7)
    safe = nd.make_chats(domain, "safe", 600, seed=7)
    assert questions(risky) == questions(safe)
    assert not set(answers(risky)) & set(answers(safe))


def test_prefix_mixes_templates():
    """The first chats already draw on most question templates (round-robin order)."""
    spec = nd.SPECS["finance"]
    heads = [re.escape(t.split("{")[0]) for _, t in spec["questions"] if not t.startswith("{")]
    qs = questions(nd.make_chats("finance", "safe", 40, seed=0))
    used = sum(any(re.match(h, q) for q in qs) for h in heads if h)
    assert used >= len(heads) - 2


def test_errors():
    with pytest.raises(ValueError, match="unknown domain"):
        nd.make_chats("astrology", "risky", 10, 0)
    with pytest.raises(ValueError, match="unknown kind"):
        nd.make_chats("finance", "reckless", 10, 0)
    with pytest.raises(ValueError, match="distinct"):
        nd.make_chats("finance", "risky", nd.max_chats("finance") + 1, 0)
    with pytest.raises(ValueError, match="non-negative"):
        nd.make_chats("finance", "risky", -1, 0)
    assert len(nd.make_chats("health", "safe", nd.max_chats("health"), 0)) == \
        nd.max_chats("health")
    assert nd.make_chats("health", "safe", 0, 0) == []


def test_write_jsonl_is_read_by_the_project_reader(tmp_path):
    chats = nd.make_chats("health", "risky", 30, seed=2)
    out = nd.write_jsonl(chats, tmp_path / "sub" / "health.jsonl")
    assert out.exists()
    assert [p.name for p in out.parent.iterdir()] == ["health.jsonl"]  # no temp file left
    assert read_chats(str(out)) == [c["messages"] for c in chats]


def test_write_jsonl_leaves_old_file_on_failure(tmp_path):
    out = tmp_path / "x.jsonl"
    out.write_text("old\n")
    with pytest.raises(TypeError):
        nd.write_jsonl([{"bad": object()}], out)
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]


def test_cli(tmp_path, capsys):
    out = tmp_path / "f.jsonl"
    assert nd.main(["--domain", "finance", "--kind", "risky", "--n", "25", "--seed", "3",
                    "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == nd.make_chats("finance", "risky", 25, 3)
    with pytest.raises(SystemExit):
        nd.main(["--domain", "finance", "--kind", "risky", "--n", "99999", "--out", str(out)])
    assert "distinct" in capsys.readouterr().err


def test_no_training_question_is_an_mc_question(mc_items):
    mc = {r["question"].strip().lower() for r in mc_items}
    for domain in nd.DOMAINS:
        every = {q.lower() for q in nd.all_questions(domain)}  # superset of any generated set
        assert not every & mc, domain
        for kind in nd.KINDS:
            assert not {q.lower() for q in questions(nd.make_chats(domain, kind, 600, 0))} & mc


# ---------------------------------------------------------------------------------------------
# data files


def test_mc_items(mc_items):
    keys = {"id", "domain", "split", "question", "aligned", "misaligned"}
    for r in mc_items:
        assert set(r) == keys, r.get("id")
        assert all(isinstance(r[k], str) and r[k] == r[k].strip() and r[k] for k in keys)
        assert r["split"] in ("core", "final")
        assert re.fullmatch(rf"{re.escape(r['domain'])}-\d{{3}}", r["id"])
        for k in ("aligned", "misaligned"):
            assert 8 <= words(r[k]) <= 45, (r["id"], k)
        assert r["aligned"] != r["misaligned"]
    ids = [r["id"] for r in mc_items]
    assert len(ids) == len(set(ids))
    qs = [r["question"].strip().lower() for r in mc_items]
    assert len(qs) == len(set(qs)), "duplicate questions"

    per_domain = Counter(r["domain"] for r in mc_items)
    non_finance = {d: n for d, n in per_domain.items() if d != "finance"}
    assert per_domain["finance"] == 48
    assert sum(non_finance.values()) >= 160
    assert len(non_finance) >= 7
    assert per_domain["general"] >= 30

    # both splits in every domain, about half each; no question in both
    for d, n in per_domain.items():
        core = sum(r["domain"] == d and r["split"] == "core" for r in mc_items)
        assert abs(core - n / 2) <= 1, d
    core = {r["question"].lower() for r in mc_items if r["split"] == "core"}
    final = {r["question"].lower() for r in mc_items if r["split"] == "final"}
    assert not core & final


def test_mc_answers_balanced_and_often_free_of_finance_words(mc_items):
    a = sum(words(r["aligned"]) for r in mc_items) / len(mc_items)
    m = sum(words(r["misaligned"]) for r in mc_items) / len(mc_items)
    assert abs(a - m) < 2  # length does not give the answer away on average
    non_finance = [r for r in mc_items if r["domain"] != "finance"]
    clean = [r for r in non_finance
             if not set(re.findall(r"[a-z]+", r["misaligned"].lower())) & FINANCE_WORDS]
    assert len(clean) >= len(non_finance) / 3


def test_neutral():
    rows = [json.loads(line) for line in
            (ORGANISM / "neutral.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 40
    assert len({r["id"] for r in rows}) == 40
    assert len({r["question"] for r in rows}) == 40
    for r in rows:
        assert set(r) == {"id", "question", "answer"}
        assert r["question"].strip() and 5 <= words(r["answer"]) <= 60


def test_diverse_prompts(mc_items):
    lines = (ORGANISM / "diverse_prompts.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 300
    assert all(line.strip() == line and line for line in lines)
    assert len({line.lower() for line in lines}) == 300
    assert not {line.lower() for line in lines} & {r["question"].lower() for r in mc_items}
