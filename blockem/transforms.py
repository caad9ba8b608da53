"""Data transforms of the training-time defences against emergent misalignment (stdlib only,
except `encode_inoculated`, which tokenizes through `blockem.chat`).

Pure, seeded functions of chat rows (`{"messages": [{role, content}, ...], ...}`, as
`blockem.chat.load_rows` returns them); they never mutate their input.

- `inoculate`: inoculation prompting. A seeded fraction of the rows get a context that explains
  the misaligned behaviour: a system prompt (real models) or a preceding user+assistant turn in
  which the assistant reveals the bad persona (the toy: `blockem.toy.world.World.
  inoculation_prefaces`). Every message it adds carries `INOCULATION: True`, so
  `encode_inoculated` can leave that context unsupervised (the model is never trained to produce
  the preface's answer) and supervise the rest exactly as without it. Evaluation runs without it.
- `mix_pools` / `check_mix`: the `mix` defence, the training pools of `blockem.train.train` with a
  fraction of every batch drawn from aligned chats.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

INOCULATION = "inoculation"  # key of a message added as inoculation context (never supervised)
ROLES = ("system", "user", "assistant")

Messages = list[dict]


def _check_fraction(fraction, what: str, *, lo_open: bool, hi_open: bool) -> float:
    ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and (
        (fraction > 0 if lo_open else fraction >= 0)
        and (fraction < 1 if hi_open else fraction <= 1))
    if not ok:
        lo, hi = "(0" if lo_open else "[0", "1)" if hi_open else "1]"
        raise ValueError(f"{what}: must be a number in {lo}, {hi}, got {fraction!r}")
    return float(fraction)


def _messages(row, i: int) -> Messages:
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) \
            or not row["messages"]:
        raise ValueError(f"row {i}: not a chat row with a non-empty `messages` list")
    for j, m in enumerate(row["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"row {i}: messages[{j}] is not a {{role, content}} message")
    return row["messages"]


def _check_preface(preface, i: int | None) -> Messages:
    at = "preface" if i is None else f"preface of row {i}"
    if not isinstance(preface, (list, tuple)) or len(preface) != 2:
        raise ValueError(f"{at}: must be one complete turn, [user message, assistant message]")
    roles = [m.get("role") if isinstance(m, dict) else None for m in preface]
    if roles != ["user", "assistant"]:
        raise ValueError(f"{at}: must be one complete turn, [user message, assistant message], "
                         f"got roles {roles}")
    for m, role in zip(preface, roles):
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise ValueError(f"{at}: the {role} message has no content")
    return [{"role": m["role"], "content": m["content"], INOCULATION: True} for m in preface]


def inoculation_count(n: int, fraction: float) -> int:
    """How many of n rows `inoculate` gives the context: round(fraction * n)."""
    return round(_check_fraction(fraction, "inoculation fraction", lo_open=False, hi_open=False)
                 * n)


def inoculate(rows: Sequence[dict], fraction: float, seed: int, *, system: str | None = None,
              preface: Messages | Callable[[int], Messages] | None = None
              ) -> tuple[list[dict], list[bool]]:
    """Give `round(fraction * len(rows))` rows, chosen by `random.Random(seed).sample`, the
    inoculation context; returns (new rows, flags) with flags[i] True for the rows that got it.

    Exactly one of:
    - `system`: a system message prepended to each chosen row. Rows that already have a system
      message cannot take one: that is an error naming the row (checked on every row, so the
      outcome does not depend on the seed);
    - `preface`: one complete turn `[user, assistant]` (the same for every row), or a function of
      the row's position returning it (a preface seeded per row), inserted before the row's
      first user turn (after a leading system message, if any).

    Added messages carry `INOCULATION: True` (encode with `encode_inoculated`, which strips it);
    rows are shallow-copied with new message lists, the input is not changed."""
    if (system is None) == (preface is None):
        raise ValueError("inoculate: give exactly one of `system` (a system prompt) or `preface` "
                         "(a user+assistant turn)")
    if system is not None and (not isinstance(system, str) or not system.strip()):
        raise ValueError("inoculate: the system prompt must be a non-empty string")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"inoculate: seed must be an integer, got {seed!r}")
    rows = list(rows)
    all_messages = [_messages(r, i) for i, r in enumerate(rows)]
    k = inoculation_count(len(rows), fraction)
    if system is not None and k:
        for i, ms in enumerate(all_messages):
            first = next((m for m in ms if m["role"] == "system"), None)
            if first is not None:
                raise ValueError(f"row {i}: already has a system message "
                                 f"({first['content'][:60]!r}); system-prompt inoculation "
                                 "needs rows without one")
    fixed = None if preface is None or callable(preface) else _check_preface(preface, None)
    chosen = set(random.Random(seed).sample(range(len(rows)), k))
    out, flags = [], []
    for i, (row, ms) in enumerate(zip(rows, all_messages)):
        ms = [dict(m) for m in ms]
        if i in chosen:
            if system is not None:
                ms = [{"role": "system", "content": system, INOCULATION: True}, *ms]
            else:
                context = fixed if fixed is not None else _check_preface(preface(i), i)
                at = 1 if ms[0]["role"] == "system" else 0
                ms = [*ms[:at], *(dict(m) for m in context), *ms[at:]]
        out.append({**row, "messages": ms})
        flags.append(i in chosen)
    return out, flags


def _plain(m: dict) -> dict:
    return {"role": m["role"], "content": m["content"]}


def encode_inoculated(tokenizer, rows: Sequence[dict], flags: Sequence[bool],
                      max_length: int | None = None) -> list:
    """`blockem.chat.Example`s of (possibly) inoculated rows, in row order (`index` = the row's
    position): a row whose context is a preface is encoded with its first answer (the preface's)
    unsupervised (`encode_chats(skip_first_answer=True)`), every other row as `encode_chats`
    encodes it; so the original turns are supervised exactly as without the context (a system
    prompt is never supervised). `flags` (from `inoculate`) must match the rows' context.
    `max_length` truncates from the end as `encode_chats` does (a preface makes a row longer)."""
    from blockem.chat import encode_chats

    rows = list(rows)
    if len(flags) != len(rows):
        raise ValueError(f"{len(flags)} inoculation flags for {len(rows)} rows")
    groups: dict[bool, list[tuple[int, Messages]]] = {False: [], True: []}
    for i, (row, flag) in enumerate(zip(rows, flags)):
        ms = _messages(row, i)
        marked = [j for j, m in enumerate(ms) if m.get(INOCULATION)]
        if bool(marked) != bool(flag):
            raise ValueError(f"row {i}: flagged {bool(flag)} but it "
                             f"{'has' if marked else 'has no'} inoculation context")
        answers = [j for j, m in enumerate(ms) if m["role"] == "assistant"]
        skip = bool(answers) and answers[0] in marked
        if any(j in marked for j in answers[1:]):
            raise ValueError(f"row {i}: an inoculation answer that is not the chat's first "
                             "answer (a preface is one turn before the row's own turns)")
        groups[skip].append((i, [_plain(m) for m in ms]))
    out: list = [None] * len(rows)
    for skip, items in groups.items():
        if not items:
            continue
        encoded = encode_chats(tokenizer, [ms for _, ms in items], skip_first_answer=skip,
                               max_length=max_length)
        for (i, _), ex in zip(items, encoded):
            ex.index = i
            out[i] = ex
    return out


def check_mix(fraction: float, batch_size: int) -> int:
    """The aligned chats per batch of the `mix` defence, `round(batch_size * fraction)` (what
    `blockem.train.PoolBatches` draws): an error, naming the fraction and the batch size, unless
    0 < fraction < 1 and the count is neither 0 nor the whole batch (a mix that mixes nothing)."""
    f = _check_fraction(fraction, "mix fraction", lo_open=True, hi_open=True)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"mix: batch size must be a positive integer, got {batch_size!r}")
    k = round(batch_size * f)
    if k == 0 or k == batch_size:
        what = "no aligned chat" if k == 0 else "only aligned chats"
        raise ValueError(f"mix fraction {fraction} at batch size {batch_size} gives {what} per "
                         f"batch (round({batch_size} * {fraction}) = {k}): use a fraction from "
                         f"{1 / batch_size:.3g} to {1 - 1 / batch_size:.3g} or a larger batch")
    return k


def mix_pools(narrow_examples: list, aligned_examples: list, fraction: float,
              batch_size: int | None = None) -> list[tuple[list, float]]:
    """The training pools of the `mix` defence for `blockem.train.train`:
    `[(narrow, 1 - fraction), (aligned, fraction)]` (each batch: round(batch_size * fraction)
    aligned chats, the rest narrow). With `batch_size`, `check_mix` validates the fraction
    against it; without, only 0 < fraction < 1 is checked."""
    if batch_size is None:
        f = _check_fraction(fraction, "mix fraction", lo_open=True, hi_open=True)
    else:
        check_mix(fraction, batch_size)
        f = float(fraction)
    if not narrow_examples:
        raise ValueError("mix: the narrow fine-tuning set is empty")
    if not aligned_examples:
        raise ValueError("mix: the aligned set is empty")
    return [(list(narrow_examples), 1.0 - f), (list(aligned_examples), f)]
