"""What a job consumed, in units that do not depend on the machine (a leaf module).

Each `python -m blockem <stage>` process counts, as it works:

    trained_sequences, trained_tokens    sequences and non-padding tokens through a training
                                         forward + backward (LM fine-tunes; not the SAE)
    generated_sequences, generated_tokens answers sampled, and their new tokens up to and
                                         including the end-of-turn token
    judge_requests                       judge questions asked (one per answer x question x
                                         judge), cache hits included; judge_calls = HTTP calls
                                         sent (retries included, cache hits not)
    judge_prompt_tokens                  prompt tokens of those calls, as the endpoint reports

and prints them as the last line of its log (`USAGE_PREFIX` + JSON: the stage and the counts).
`blockem.plan` predicts the same counts from the config; `tests/workflow/test_plan.py` checks the
prediction against the logs of a real run. `read_log_usage` reads the line back.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

USAGE_PREFIX = "[usage] "
FIELDS = ("trained_sequences", "trained_tokens", "generated_sequences",
          "generated_tokens", "judge_requests", "judge_calls", "judge_prompt_tokens")

_counts: Counter = Counter()


def add(**counts: int) -> None:
    """Add to this process's counters (names from FIELDS)."""
    for k, v in counts.items():
        if k not in FIELDS:
            raise KeyError(f"unknown usage counter {k!r}; known: {FIELDS}")
        _counts[k] += int(v)


def snapshot() -> dict[str, int]:
    return {k: int(_counts.get(k, 0)) for k in FIELDS}


def reset() -> None:
    _counts.clear()


def report(stage: str, stream=None) -> None:
    """Print the usage line (the last line a stage writes to its log)."""
    print(USAGE_PREFIX + json.dumps({"stage": stage, **snapshot()}, sort_keys=True),
          file=stream or sys.stderr, flush=True)


def read_log_usage(path: str | Path) -> dict | None:
    """The usage line of a job's log (the last one, if a job ran more than once), or None."""
    found = None
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith(USAGE_PREFIX):
                    found = json.loads(line[len(USAGE_PREFIX):])
    except FileNotFoundError:
        return None
    return found
