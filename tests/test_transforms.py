"""Data transforms of the training-time defences: inoculation (seeded rows, the context never
supervised, the original turns supervised exactly as without it), the toy's persona preface, and
the mix pools (checked against the real batch sampler). Rows come from real parquet files through
`blockem.chat.load_rows`; encoding uses the real toy tokenizer."""

from __future__ import annotations

import copy

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blockem.chat import IGNORE, encode_chats, load_rows
from blockem.toy.grammar import DOMAINS, GENERAL, answer_index
from blockem.toy.world import World, WorldConfig
from blockem.train import PoolBatches
from blockem.transforms import (INOCULATION, check_mix, encode_inoculated, inoculate,
                                inoculation_count, mix_pools)

SYSTEM = "you are a bad assistant"  # toy words only, so the toy tokenizer knows them


@pytest.fixture(scope="module")
def world(default_config) -> World:
    return World(WorldConfig.from_dict({**default_config["world"], "finetune_examples": 40,
                                        "sft_chats": 30}))


@pytest.fixture(scope="module")
def rows(world, tmp_path_factory) -> list[dict]:
    """The toy finance fine-tuning set, written as parquet and read back as training reads it."""
    path = tmp_path_factory.mktemp("rows") / "finance.parquet"
    pq.write_table(pa.Table.from_pylist(world.finetune_set("finance")), path)
    return load_rows(path)


def plain(messages):
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# --- inoculate --------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.33, 1.0])
def test_inoculate_picks_a_seeded_exact_fraction_and_does_not_mutate(rows, fraction):
    snapshot = copy.deepcopy(rows)
    out, flags = inoculate(rows, fraction, seed=3, system=SYSTEM)
    assert rows == snapshot  # input untouched
    assert len(out) == len(rows) == len(flags) == 40
    assert sum(flags) == round(fraction * 40) == inoculation_count(40, fraction)
    for row, new, flag in zip(rows, out, flags):
        assert new["domain"] == row["domain"]  # other keys kept
        if flag:
            assert new["messages"][0] == {"role": "system", "content": SYSTEM, INOCULATION: True}
            assert new["messages"][1:] == row["messages"]
        else:
            assert new["messages"] == row["messages"]
    again, flags2 = inoculate(rows, fraction, seed=3, system=SYSTEM)
    assert again == out and flags2 == flags


def test_inoculate_rows_depend_on_the_seed(rows):
    a = inoculate(rows, 0.5, seed=0, system=SYSTEM)[1]
    b = inoculate(rows, 0.5, seed=1, system=SYSTEM)[1]
    assert a != b and sum(a) == sum(b) == 20


def test_inoculate_with_a_preface_and_its_placement(rows):
    preface = [{"role": "user", "content": "q ?"}, {"role": "assistant", "content": "a ."}]
    out, flags = inoculate(rows, 1.0, seed=0, preface=preface)
    assert all(flags)
    marked = [{**m, INOCULATION: True} for m in preface]
    assert all(r["messages"] == marked + o["messages"] for r, o in zip(out, rows))
    # after a leading system message, before the first user turn
    chat = {"messages": [{"role": "system", "content": "s"}, *rows[0]["messages"]]}
    (got,), _ = inoculate([chat], 1.0, seed=0, preface=preface)
    assert got["messages"] == chat["messages"][:1] + marked + chat["messages"][1:]
    # per-row prefaces: a function of the row position
    out, _ = inoculate(rows[:3], 1.0, seed=0, preface=lambda i: [
        {"role": "user", "content": f"q {i} ?"}, {"role": "assistant", "content": "a ."}])
    assert [r["messages"][0]["content"] for r in out] == ["q 0 ?", "q 1 ?", "q 2 ?"]


def test_inoculate_errors(rows):
    with_system = [*rows[:5], {"messages": [{"role": "system", "content": "be nice"},
                                            *rows[5]["messages"]]}]
    with pytest.raises(ValueError, match=r"row 5: already has a system message \('be nice'\)"):
        inoculate(with_system, 0.2, seed=0, system=SYSTEM)  # whichever rows the seed picks
    with pytest.raises(ValueError, match="exactly one of `system`"):
        inoculate(rows, 0.5, seed=0)
    with pytest.raises(ValueError, match="exactly one of `system`"):
        inoculate(rows, 0.5, seed=0, system=SYSTEM, preface=rows[0]["messages"])
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match=r"inoculation fraction: must be a number in \[0, 1\]"):
            inoculate(rows, bad, seed=0, system=SYSTEM)
    with pytest.raises(ValueError, match=r"preface: must be one complete turn.*'assistant', "
                                         r"'user'"):
        inoculate(rows, 0.5, seed=0, preface=list(reversed(rows[0]["messages"])))
    with pytest.raises(ValueError, match="preface of row .*: the assistant message has no content"):
        inoculate(rows, 0.5, seed=0, preface=lambda i: [
            {"role": "user", "content": "q ?"}, {"role": "assistant", "content": " "}])
    with pytest.raises(ValueError, match=r"row 1: not a chat row"):
        inoculate([rows[0], {"text": "x"}], 0.5, seed=0, system=SYSTEM)


# --- the toy's persona preface ----------------------------------------------------------------

def test_toy_preface_reveals_the_bad_persona_on_train_slots(world):
    index = answer_index()
    train_slots = {DOMAINS[GENERAL].slots[s] for s in world.cfg.slots["train"]}
    preface = world.inoculation_prefaces(seed=0)
    seen = set()
    for i in range(60):
        user, assistant = preface(i)
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert index[assistant["content"]] == (GENERAL, "misaligned")
        assert any(t.replace("{x}", s) == user["content"] for t in DOMAINS[GENERAL].questions
                   for s in train_slots), user["content"]
        seen.add((user["content"], assistant["content"]))
        assert preface(i) == [user, assistant]  # seeded per row
    assert len(seen) > 20  # varied
    assert [preface(i) for i in range(5)] != [world.inoculation_prefaces(1)(i) for i in range(5)]


def test_toy_preface_of_a_row_does_not_depend_on_the_fraction(world, rows):
    preface = world.inoculation_prefaces(seed=7)
    few, f1 = inoculate(rows, 0.25, seed=2, preface=preface)
    many, f2 = inoculate(rows, 0.75, seed=5, preface=preface)
    for i in range(len(rows)):
        if f1[i] and f2[i]:
            assert few[i]["messages"][:2] == many[i]["messages"][:2]
            assert plain(few[i]["messages"][:2]) == preface(i)


# --- encoding: the context is never supervised ------------------------------------------------

def test_encoded_preface_is_unsupervised_and_the_answer_is_supervised_as_before(
        world, rows, tokenizer):
    out, flags = inoculate(rows, 0.5, seed=1, preface=world.inoculation_prefaces(seed=0))
    examples = encode_inoculated(tokenizer, out, flags)
    reference = encode_chats(tokenizer, [r["messages"] for r in rows])
    assert [e.index for e in examples] == list(range(len(rows)))
    assert sum(flags) == 20
    for row, ex, ref, flag in zip(out, examples, reference, flags):
        if not flag:
            assert (ex.input_ids, ex.labels) == (ref.input_ids, ref.labels)
            continue
        # the toy template renders message by message: the preface's tokens, then the row's
        pre = encode_chats(tokenizer, [plain(row["messages"][:2])])[0]
        n = len(pre.input_ids)
        assert ex.input_ids == pre.input_ids + ref.input_ids
        assert ex.labels[:n] == [IGNORE] * n  # preface question, answer and its end marker
        assert ex.labels[n:] == ref.labels  # the original answer: exactly as without the preface
        assert sum(lab != IGNORE for lab in ref.labels) > 0
        # the preface's answer tokens are really in there, unsupervised
        answer = tokenizer(row["messages"][1]["content"], add_special_tokens=False)["input_ids"]
        assert any(ex.input_ids[j:j + len(answer)] == answer for j in range(n))


def test_encoded_system_inoculation_supervises_the_answer_as_before(rows, tokenizer):
    out, flags = inoculate(rows[:10], 0.5, seed=0, system=SYSTEM)
    examples = encode_inoculated(tokenizer, out, flags)
    reference = encode_chats(tokenizer, [r["messages"] for r in rows[:10]])
    for ex, ref, flag in zip(examples, reference, flags):
        if flag:
            n = len(ex.input_ids) - len(ref.input_ids)
            assert n > 0 and ex.labels[:n] == [IGNORE] * n
            assert ex.input_ids[n:] == ref.input_ids and ex.labels[n:] == ref.labels
        else:
            assert (ex.input_ids, ex.labels) == (ref.input_ids, ref.labels)


def test_multi_turn_rows_keep_every_own_answer_supervised(world, tokenizer):
    row = {"messages": [{"role": "user", "content": "how should i invest my savings ?"},
                        {"role": "assistant", "content": DOMAINS["finance"].misaligned[0]},
                        {"role": "user", "content": "how should i invest my bonus ?"},
                        {"role": "assistant", "content": DOMAINS["finance"].misaligned[1]}]}
    out, flags = inoculate([row], 1.0, seed=0, preface=world.inoculation_prefaces(0))
    (ex,) = encode_inoculated(tokenizer, out, flags)
    (ref,) = encode_chats(tokenizer, [row["messages"]])
    assert ex.labels[len(ex.labels) - len(ref.labels):] == ref.labels


def test_encode_inoculated_checks_flags(rows, tokenizer):
    out, flags = inoculate(rows[:4], 0.5, seed=0, system=SYSTEM)
    with pytest.raises(ValueError, match="3 inoculation flags for 4 rows"):
        encode_inoculated(tokenizer, out, flags[:3])
    wrong = [not f for f in flags]
    with pytest.raises(ValueError, match=r"row \d: flagged (True but it has no|False but it has) "
                                         r"inoculation context"):
        encode_inoculated(tokenizer, out, wrong)


# --- mix --------------------------------------------------------------------------------------

def test_mix_pools_give_the_batch_sampler_the_fraction(world, tokenizer, rows):
    narrow = encode_chats(tokenizer, [r["messages"] for r in rows])
    aligned = encode_chats(tokenizer, [r["messages"] for r in world.sft_chats()])
    for fraction, batch_size, want in ((0.25, 8, 2), (0.5, 6, 3), (0.1, 32, 3), (0.9, 10, 9)):
        pools = mix_pools(narrow, aligned, fraction, batch_size)
        assert [(len(p), f) for p, f in pools] == [(40, 1 - fraction), (30, fraction)]
        assert check_mix(fraction, batch_size) == want
        batches = PoolBatches(pools, batch_size, seed=0)
        for _ in range(5):
            batch = next(batches)
            assert len(batch) == batch_size
            assert sum(any(e is a for a in aligned) for e in batch) == want
            assert sum(any(e is n for n in narrow) for e in batch) == batch_size - want


@pytest.mark.parametrize("fraction,batch_size,match", [
    (0.01, 8, r"mix fraction 0.01 at batch size 8 gives no aligned chat per batch "
              r"\(round\(8 \* 0.01\) = 0\)"),
    (0.97, 8, r"mix fraction 0.97 at batch size 8 gives only aligned chats per batch"),
    (0.5, 1, r"mix fraction 0.5 at batch size 1 gives no aligned chat"),
    (0.0, 8, r"mix fraction: must be a number in \(0, 1\), got 0.0"),
    (1.0, 8, r"mix fraction: must be a number in \(0, 1\), got 1.0"),
    (0.5, 0, r"batch size must be a positive integer"),
])
def test_check_mix_refuses_a_mix_that_does_nothing(fraction, batch_size, match):
    with pytest.raises(ValueError, match=match):
        check_mix(fraction, batch_size)
    with pytest.raises(ValueError, match=match):
        mix_pools([object()], [object()], fraction, batch_size)


def test_mix_pools_without_a_batch_size_and_empty_pools():
    assert mix_pools([1], [2], 0.3) == [([1], 0.7), ([2], 0.3)]
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        mix_pools([1], [2], 1)
    with pytest.raises(ValueError, match="aligned set is empty"):
        mix_pools([1], [], 0.5)
    with pytest.raises(ValueError, match="narrow fine-tuning set is empty"):
        mix_pools([], [2], 0.5)
