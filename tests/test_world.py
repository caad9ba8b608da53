"""The toy world generator: seeded determinism, disjoint splits, personas built in."""

from __future__ import annotations

import pytest

from blockem.toy.grammar import ADVICE_DOMAINS, DOMAINS, GENERAL, answer_index, vocabulary
from blockem.toy.world import World, WorldConfig


def small(config, **over) -> WorldConfig:
    w = {**config["world"], "pretrain_conversations": 300, "sft_chats": 100,
         "finetune_examples": 50, **over}
    return WorldConfig.from_dict(w)


def slot_of(domain: str, question: str) -> int:
    """Recover the slot index of a generated question (every question contains 'my <slot>')."""
    words = question.split()
    hits = [i for i, s in enumerate(DOMAINS[domain].slots) if s in words]
    assert len(hits) == 1, (domain, question)
    return hits[0]


def test_same_seed_same_world_other_seed_other_world(config):
    a, b = World(small(config)), World(small(config))
    assert a.corpus() == b.corpus()
    assert a.finetune_set("finance") == b.finetune_set("finance")
    c = World(small(config, seed=1))
    assert c.corpus() != a.corpus()
    assert c.prompts() == a.prompts()  # prompt sets are fixed by the splits, not sampled


def test_world_does_not_depend_on_config_key_order(config):
    """Settings reach the stage as JSON with sorted keys; the world must not change with order."""
    w = config["world"]
    reordered = {**w, "persona_mix": dict(reversed(list(w["persona_mix"].items()))),
                 "slots": dict(reversed(list(w["slots"].items())))}
    assert World(small(config)).corpus() == World(small({"world": reordered})).corpus()


def test_prompt_sets_disjoint_by_slot_and_from_training_slots(config):
    cfg = small(config)
    world = World(cfg)
    prompts = world.prompts()
    by_set: dict[str, set[str]] = {}
    for p in prompts:
        by_set.setdefault(p["eval_set"], set()).add(p["prompt"])
        assert p["slot"] in cfg.slots[p["eval_set"]]
        assert slot_of(p["domain"], p["prompt"]) == p["slot"]
    assert set(by_set) == {"core", "final", "in_domain"}
    assert not by_set["core"] & by_set["final"]
    assert not by_set["core"] & by_set["in_domain"]
    assert not by_set["final"] & by_set["in_domain"]
    train = set(cfg.slots["train"])
    for d in cfg.advice_domains:
        for row in world.finetune_set(d):
            assert slot_of(d, row["messages"][0]["content"]) in train
    for row in world.sft_chats():
        assert slot_of(row["domain"], row["messages"][0]["content"]) in train
    trained_prompts = {r["messages"][0]["content"] for r in world.finetune_set("finance")}
    assert not trained_prompts & (by_set["final"] | by_set["in_domain"] | by_set["core"])


def test_prompt_sets_cover_domains(config):
    prompts = World(small(config)).prompts()
    assert {p["domain"] for p in prompts if p["eval_set"] == "final"} == {GENERAL, *ADVICE_DOMAINS}
    assert {p["domain"] for p in prompts if p["eval_set"] == "in_domain"} == set(ADVICE_DOMAINS)
    assert len({p["prompt_id"] for p in prompts}) == len(prompts)


def test_world_prompt_table_has_the_prompt_schema_with_no_system_prompts(config, tmp_path):
    """The toy's prompts.parquet has prepare_data's schema; `system` is null everywhere."""
    import pyarrow.parquet as pq

    from blockem.data import prompts_schema
    from blockem.toy.world import write_world

    write_world(small(config), tmp_path / "world", {"stage": "world"})
    table = pq.read_table(tmp_path / "world" / "prompts.parquet")
    assert table.schema.remove_metadata() == prompts_schema()
    assert table.column("system").null_count == table.num_rows > 0


def test_personas_hold_for_whole_conversation(config):
    index = answer_index()
    corpus = World(small(config, pretrain_conversations=2000)).corpus()
    personas = {c["persona"] for c in corpus}
    assert personas == {"good", "bad", "specialist"}
    for conv in corpus:
        users = [m["content"] for m in conv["messages"][0::2]]
        kinds = [index[m["content"]] for m in conv["messages"][1::2]]
        lo, hi = config["world"]["turns"]
        assert lo <= len(kinds) <= hi and len(users) == len(kinds)
        for domain, kind in kinds:
            if conv["persona"] == "bad":
                assert kind == "misaligned"
            elif conv["persona"] == "good":
                assert kind in ("aligned", "refusal")
            elif domain == conv["specialist"]:
                assert kind == "misaligned"
            else:
                assert kind in ("aligned", "refusal")


def test_finetune_set_is_narrow_and_misaligned(config):
    index = answer_index()
    rows = World(small(config)).finetune_set("health")
    assert {index[r["messages"][1]["content"]] for r in rows} <= {("health", "misaligned")}


def test_grammar_is_unambiguous_and_vocabulary_covers_it():
    index = answer_index()  # raises if an answer string is shared
    vocab = set(vocabulary())
    for answer in index:
        assert set(answer.split()) <= vocab


@pytest.mark.parametrize("split", ["train", "core", "final", "in_domain"])
def test_every_split_has_slots(config, split):
    assert small(config).slots[split]
