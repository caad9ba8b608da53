"""Real data: read fine-tuning chats and evaluation prompt sets, validate, de-duplicate, split.

`prepare_data` is the real-model counterpart of the toy `world` stage: it writes the same files, so
every later stage runs unchanged:

- `<out>/finetune/<domain>.parquet`: `domain: string`, `messages: list<struct<role, content>>`,
  the training split of that domain's chats;
- `<out>/prompts.parquet`: `prompt_id, eval_set ('core' | 'final' | 'in_domain'), domain,
  template: int64, slot: int64, system: string (null = no system prompt), prompt`;
  domain-agnostic prompts have domain `general`; a prompt is the system prompt (if any) and the
  user message `prompt`, rendered together through the model's chat template;
- `<out>/corpus.parquet`: `messages`, the chats whose activations train the SAE;
- `<out>/control/<domain>.parquet` (when `control` is configured): as `finetune/`, the matched
  control chats of a domain;
- `<out>/aligned.parquet` (when `aligned` is configured): `messages`, aligned chats that the
  `mix` defence interleaves into fine-tuning batches (the real-model counterpart of the toy's
  `sft.parquet`). The workflow writes world/ without `aligned` (`prepare_data`) and runs the
  stage again with it into aligned/ (`prepare_aligned`), so configuring the defence changes no
  world/ table and reruns nothing but the mix;
- `<out>/provenance.json` (as the toy world), and the same provenance in every parquet's metadata:
  settings hash, seed, package versions and `counts` per source (rows read, duplicates dropped,
  kept, capped, held out, ...).

Everything is read and validated before anything is written; the output directory is then
replaced atomically (an existing one holding anything but these outputs is refused). A bad row stops the stage with one error naming the file, the line (JSONL,
YAML, CSV, text: 1-based `file:LINE:`) or the row (JSON, parquet, Hugging Face: 0-based
`file: row N:`) and the problem.

Config (`settings = {"data": <below>, "seed": int}`)::

    data:
      finetune:                  # domain -> source (or list of sources) of chats, required
        finance: {path: data/risky_financial_advice.jsonl}
        health: {hf: some-org/some-dataset, split: train, name: null, revision: null}
      heldout_fraction: 0.1      # per domain, in [0, 1): held-out chats; their first user turns
                                 # are the domain's `in_domain` prompts (unless given below)
      prompts:
        core: [{path: prompts/core.yaml}]     # list of prompt sources, required
        final: [{path: prompts/final.yaml}]   # optional; if empty, core is split by final_fraction
        in_domain: {finance: [{path: ...}]}   # optional, per fine-tuning domain
      final_fraction: 0.5        # in (0, 1), used only when `final` is empty
      control: {finance: ...}    # optional, per fine-tuning domain: matched control chats
      aligned: {generate: {domain: finance, kind: safe, n: 600}}
                                 # optional, ONE chat source (or a list): aligned chats for
                                 # the `mix` defence -> aligned.parquet
      corpus: []                 # extra chat sources for the SAE corpus (finetune formats)
      max_examples: null         # cap on chats per domain after de-duplication

A source is a path string, `{path: ...}` or `{hf: <dataset id or local dataset directory>,
split: train, name: null, revision: null}`; either may add `column` (the messages column of a chat
source, the prompt text column of a prompt source) and a prompt source may add `domain` (default
domain of its prompts, else `general`). Relative paths resolve against the working directory.

Chat sources (`.jsonl`, `.json`, `.parquet`, Hugging Face): rows of `{"messages": [{role,
content}, ...]}` with roles system/user/assistant, non-empty string contents, at least one
assistant turn and none before the first user turn. Also accepted and converted: `{"prompt": str,
"completion": str}` (or both lists of messages) and ShareGPT `{"conversations": [{"from":
"human"|"gpt"|"system", "value": str}]}`. Contents are stripped of surrounding whitespace (some
chat templates trim them, and `blockem.chat` needs contents verbatim); other keys are ignored.

Prompt sources: YAML/JSON lists of strings, of mappings with `question` or `prompt` (optional `id`,
`domain`, `system`), or of emergent-misalignment eval entries `{id, paraphrases: [...], system}`
(one prompt per paraphrase, id `<id>/<k>`, each with the entry's `system` prompt; `type`,
`judge_prompts`... ignored); JSONL / parquet / Hugging Face rows of the same mappings, or chat rows
(`messages` / `conversations`: an optional system message, one user turn, optionally the answer,
which is ignored); CSV with a `question` or `prompt` column (optional `id`, `domain`, `system`);
`.txt`, one prompt per non-empty line. A `system` that is null, absent or blank means no system
prompt (the chat template's default, if it has one, applies). `template` is the 0-based index of
the entry in its source and `slot` the paraphrase index (0 otherwise). `prompt_id` is
`<eval_set>/<domain>/<id>`, where `id` is the explicit id or `<source name>:<template>[/<slot>]`.

Rules:
- chats are de-duplicated per domain by their exact (stripped) message list, prompts by (system
  prompt, text) within an eval set (within a domain for `in_domain`), keeping the first occurrence
  (so a question asked with and without a system prompt is two prompts); a prompt in both `core`
  and `final` stays in `core` only (counted as `in_core`). A duplicate prompt id in a set is an
  error.
- Splits order items by sha256 of their canonical JSON and the seed and take a prefix, so they do
  not depend on file order and change only with the seed. A fraction f of n items is
  round-half-up(f n), at least 1 when f > 0 and at most n - 1. `max_examples` keeps the first
  ones in that order; the held-out chats are the first `heldout_fraction` of those kept.
  When `final` is empty, `final_fraction` of each domain's core entries move to `final`, whole
  (an entry is one question with all its paraphrases, so none straddles core and final).
- A held-out chat's `in_domain` prompt is its first user turn with the system message before it
  (if any). Held-out first user turns that are also a user turn of a training chat of the domain
  (under any system prompt) are dropped from `in_domain` (counted as `in_training`). Chats are
  held out even when in_domain files are given, so the training split never depends on the
  prompt config. Each fine-tuning domain must end up with `in_domain` prompts, and `final` must
  not be empty.
- `aligned` chats are de-duplicated and lose every chat whose first user turn is an evaluation
  prompt (core, final or in_domain, any domain, under any system prompt; counted as
  `eval_question`), so the mix never trains on an evaluation question; they are kept in source
  order, and are not part of the SAE corpus (configuring the defence leaves the corpus as it was).
- The corpus is the union of every domain's training chats, one prompt-only chat (system
  message, if any, and user turn) per `core` and `in_domain` prompt (`final` stays unseen) and
  the `corpus` sources, de-duplicated and ordered by the seeded hash (the SAE stage reads a
  prefix of it, which is thus a mix of all of them).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from blockem.errors import ConfigError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
EVAL_SETS = ("core", "final", "in_domain")
GENERAL = "general"
CHAT_SUFFIXES = (".jsonl", ".json", ".parquet")
PROMPT_SUFFIXES = (".yaml", ".yml", ".csv", ".jsonl", ".json", ".parquet", ".txt")
CHAT_SOURCE_KEYS = ("path", "hf", "generate", "split", "name", "revision", "column")
PROMPT_SOURCE_KEYS = ("path", "hf", "split", "name", "revision", "column", "domain")
GENERATE_KEYS = ("domain", "kind", "n", "seed")
DATA_KEYS = ("finetune", "control", "aligned", "heldout_fraction", "prompts", "final_fraction",
             "corpus", "max_examples")
PROMPT_KEYS = ("core", "final", "in_domain")
OUTPUT_NAMES = {"finetune", "control", "aligned.parquet", "prompts.parquet", "corpus.parquet",
                "provenance.json", "sft.parquet"}
DOMAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _schemas():
    import pyarrow as pa

    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return {
        "finetune": pa.schema([("domain", pa.string()), ("messages", messages)]),
        "prompts": pa.schema([("prompt_id", pa.string()), ("eval_set", pa.string()),
                              ("domain", pa.string()), ("template", pa.int64()),
                              ("slot", pa.int64()), ("system", pa.string()),
                              ("prompt", pa.string())]),
        "corpus": pa.schema([("messages", messages)]),
    }


def prompts_schema():
    """The schema of every prompts.parquet (prepare_data's and the toy world's)."""
    return _schemas()["prompts"]


class _Bad(Exception):
    """A problem with one row; the reader prefixes where it is (`slot`: which paraphrase)."""

    def __init__(self, msg: str, slot: int | None = None):
        super().__init__(msg)
        self.slot = slot


# ---------------------------------------------------------------------------------------------
# sources


def _source(spec: Any, key: str, allowed: tuple[str, ...]) -> dict:
    """Normalise a source spec (a path string or a mapping) and check its keys."""
    if isinstance(spec, (str, Path)):
        spec = {"path": str(spec)}
    if not isinstance(spec, dict):
        raise ConfigError(f"{key}: a source is a path or a mapping with `path` or `hf`, "
                          f"got {spec!r}")
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ConfigError(f"{key}: unknown key {unknown[0]!r} (allowed here: {', '.join(allowed)})")
    kinds = [k for k in ("path", "hf", "generate") if k in spec]
    if len(kinds) != 1:
        also = " (or `generate`)" if "generate" in allowed else ""
        raise ConfigError(f"{key}: a source needs exactly one of `path` or `hf`{also}")
    if "generate" in spec:
        g = spec["generate"]
        if not isinstance(g, dict) or sorted(set(g) - set(GENERATE_KEYS)) or \
                not {"domain", "kind", "n"} <= set(g):
            raise ConfigError(f"{key}.generate: a mapping of domain, kind, n (and seed), e.g. "
                              f"{{domain: finance, kind: risky, n: 600}} (blockem/narrow_data.py)")
        return {"generate": dict(g)}
    for k in ("path", "hf"):
        if k in spec and (not isinstance(spec[k], str) or not spec[k].strip()):
            raise ConfigError(f"{key}.{k}: must be a non-empty string")
    for k in ("split", "name", "revision", "column", "domain"):
        if spec.get(k) is not None and not isinstance(spec[k], str):
            raise ConfigError(f"{key}.{k}: must be a string")
    if spec.get("domain") is not None and not DOMAIN_RE.match(spec["domain"]):
        raise ConfigError(f"{key}.domain: {spec['domain']!r} is not a valid domain name")
    return dict(spec)


def _sources(spec: Any, key: str, allowed: tuple[str, ...]) -> list[tuple[str, dict]]:
    """A source or a list of sources -> [(key path, normalised source)]."""
    if spec is None:
        return []
    if isinstance(spec, list):
        return [(f"{key}[{i}]", _source(s, f"{key}[{i}]", allowed)) for i, s in enumerate(spec)]
    return [(key, _source(spec, key, allowed))]


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return Path(os.path.abspath(p if p.is_absolute() else base / p))


def _hf_target(src: dict, base: Path) -> str:
    """The `hf` value as `load_dataset` takes it: a local directory resolved against `base`."""
    local = _resolve(src["hf"], base)
    return str(local) if local.is_dir() else src["hf"]


def source_label(src: dict, base: Path | None = None) -> str:
    """How errors and provenance name a source: its resolved path, or `hf:<id>` and its options,
    or `generate:<domain>/<kind>` and its size and seed."""
    base = Path.cwd() if base is None else base
    if "generate" in src:
        g = src["generate"]
        return f"generate:{g['domain']}/{g['kind']} (n={g['n']}, seed={g.get('seed', 0)})"
    if "path" in src:
        return str(_resolve(src["path"], base))
    opts = [f"{k}={src[k]}" for k in ("name", "split", "revision") if src.get(k) is not None]
    if src.get("split") is None:
        opts.append("split=train")
    return f"hf:{_hf_target(src, base)} ({', '.join(opts)})"


def source_name(src: dict) -> str:
    """Short name of a source in implicit prompt ids: the file stem or the dataset's last part."""
    if "generate" in src:
        return f"{src['generate']['domain']}-{src['generate']['kind']}"
    if "path" in src:
        return Path(src["path"]).stem
    return Path(src["hf"].rstrip("/")).name


def _file(src: dict, base: Path, suffixes: tuple[str, ...], where: str) -> Path:
    p = _resolve(src["path"], base)
    if p.suffix.lower() not in suffixes:
        raise ValueError(f"{p}: unsupported file type {p.suffix or '(none)'!r} for {where} "
                         f"(use {', '.join(suffixes)})")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    return p


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text: {e}") from None


def _jsonl_rows(p: Path) -> Iterator[tuple[str, int, Any]]:
    index = 0
    for n, line in enumerate(_read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not valid JSON: {e.msg} (column {e.colno})") from None
        yield f"{p}:{n}", index, row
        index += 1


def _json_rows(p: Path) -> Iterator[tuple[str, int, Any]]:
    text = _read_text(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines under a .json name
            yield from _jsonl_rows(p)
            return
        raise ValueError(f"{p}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{p}: expected a JSON list of rows, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{p}: row {i}", i, row


def _parquet_rows(p: Path) -> Iterator[tuple[str, int, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # noqa: BLE001 - any reader failure is one clear error
        raise ValueError(f"{p}: not a readable parquet file: {type(e).__name__}: {e}") from None
    for i, row in enumerate(rows):
        yield f"{p}: row {i}", i, row


def _hf_rows(src: dict, base: Path) -> Iterator[tuple[str, int, Any]]:
    """Rows of a Hugging Face dataset: `load_dataset(id, name, split=..., revision=...)`."""
    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()
    label = source_label(src, base)
    try:
        ds = load_dataset(_hf_target(src, base), src.get("name"), split=src.get("split") or "train",
                          revision=src.get("revision"))
    except Exception as e:  # noqa: BLE001 - network, missing dataset, bad split: one clear error
        raise ValueError(f"{label}: cannot load the dataset: {type(e).__name__}: {e}") from None
    for i, row in enumerate(ds):
        yield f"{label}: row {i}", i, row


def _yaml_rows(p: Path) -> Iterator[tuple[str, int, Any, list[str] | None]]:
    """Items of a YAML list with their lines (and the lines of their paraphrases)."""
    import yaml

    text = _read_text(p)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ValueError(f"{at}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return
    if not isinstance(data, list):
        raise ValueError(f"{p}: expected a YAML list of prompts, got {type(data).__name__}")
    for i, (node, row) in enumerate(zip(root.value, data)):
        sub = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == "paraphrases" and isinstance(v, yaml.SequenceNode):
                    sub = [f"{p}:{x.start_mark.line + 1}" for x in v.value]
        yield f"{p}:{node.start_mark.line + 1}", i, row, sub


def _csv_rows(p: Path) -> Iterator[tuple[str, int, Any]]:
    reader = csv.reader(io.StringIO(_read_text(p), newline=""))
    cols, index = None, 0
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ValueError(f"{p}:{line}: not valid CSV: {e}") from None
        if not any(c.strip() for c in cells):
            continue  # blank line
        if cols is None:
            cols = [c.strip() for c in cells]
            if "question" not in cols and "prompt" not in cols:
                raise ValueError(f"{p}:{line}: no `question` or `prompt` column "
                                 f"(columns: {', '.join(cols)})")
            continue
        if len(cells) > len(cols):
            raise ValueError(f"{p}:{line}: {len(cells)} cells but {len(cols)} columns")
        row = {k: v for k, v in zip(cols, cells) if v.strip()}
        if "question" not in row and "prompt" not in row:
            raise ValueError(f"{p}:{line}: empty prompt")
        yield f"{p}:{line}", index, row
        index += 1


def _txt_rows(p: Path) -> Iterator[tuple[str, int, Any]]:
    index = 0
    for n, line in enumerate(_read_text(p).splitlines(), 1):
        if line.strip():
            yield f"{p}:{n}", index, line
            index += 1


# ---------------------------------------------------------------------------------------------
# chats


def _turns(items: Any, name: str) -> list[dict]:
    """`messages`-style ({role, content}) or ShareGPT-style ({from, value}) turns -> messages."""
    if not isinstance(items, list):
        raise _Bad(f"`{name}` is not a list")
    if not items:
        raise _Bad(f"`{name}` is empty")
    out = []
    for j, m in enumerate(items):
        at = f"{name}[{j}]"
        if not isinstance(m, dict):
            raise _Bad(f"{at} is not a mapping with role and content")
        if "role" in m or "content" in m:
            role, content, ckey = m.get("role"), m.get("content"), "content"
            if role not in ROLES:
                raise _Bad(f"{at} has role {role!r} (allowed: {', '.join(ROLES)})")
        elif "from" in m or "value" in m:
            role, content, ckey = m.get("from"), m.get("value"), "value"
            if not isinstance(role, str) or role not in SHAREGPT_ROLES:
                raise _Bad(f"{at} has from {role!r} (allowed: human, gpt, system)")
            role = SHAREGPT_ROLES[role]
        else:
            raise _Bad(f"{at} has neither role/content nor from/value")
        if not isinstance(content, str):
            raise _Bad(f"{at} {ckey} is not a string")
        if not content.strip():
            raise _Bad(f"{at} {ckey} is empty")
        out.append({"role": role, "content": content.strip()})
    return out


def chat_messages(row: Any, column: str | None = None) -> list[dict]:
    """The validated message list of one chat row (any accepted layout); raises ValueError."""
    try:
        return _chat(row, column)
    except _Bad as e:
        raise ValueError(str(e)) from None


def _chat(row: Any, column: str | None) -> list[dict]:
    if not isinstance(row, dict):
        raise _Bad(f"row is not an object (got {type(row).__name__})")
    if column is not None:
        if column not in row:
            raise _Bad(f"row has no column {column!r}")
        messages = _turns(row[column], column)
    elif "messages" in row:
        messages = _turns(row["messages"], "messages")
    elif "conversations" in row:
        messages = _turns(row["conversations"], "conversations")
    elif "prompt" in row and "completion" in row:
        p, c = row["prompt"], row["completion"]
        if isinstance(p, list) and isinstance(c, list):
            messages = _turns(p, "prompt") + _turns(c, "completion")
        else:
            for k, v in (("prompt", p), ("completion", c)):
                if not isinstance(v, str):
                    raise _Bad(f"`{k}` is not a string")
                if not v.strip():
                    raise _Bad(f"`{k}` is empty")
            messages = [{"role": "user", "content": p.strip()},
                        {"role": "assistant", "content": c.strip()}]
    else:
        raise _Bad("row has no chat: none of `messages`, `conversations` (ShareGPT) or "
                   "`prompt`/`completion`")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise _Bad("row has no assistant turn")
    first_user = roles.index("user") if "user" in roles else len(roles)
    if roles.index("assistant") < first_user:
        raise _Bad("row has an assistant turn before the first user turn")
    return messages


@dataclass
class _Chat:
    where: str
    index: int
    messages: list[dict]
    canon: str = ""

    def __post_init__(self):
        self.canon = _canonical(self.messages)


def _chat_rows(src: dict, base: Path) -> list[_Chat]:
    if "generate" in src:  # the project's own seeded narrow data sets (no download)
        from blockem.narrow_data import make_chats

        g = src["generate"]
        label = source_label(src, base)
        try:
            chats = make_chats(g["domain"], g["kind"], g["n"], g.get("seed", 0))
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None
        rows = ((f"{label}: chat {i}", i, c) for i, c in enumerate(chats))
    elif "hf" in src:
        rows = _hf_rows(src, base)
    else:
        p = _file(src, base, CHAT_SUFFIXES, "chats")
        rows = {".jsonl": _jsonl_rows, ".json": _json_rows,
                ".parquet": _parquet_rows}[p.suffix.lower()](p)
    out = []
    for where, index, row in rows:
        try:
            out.append(_Chat(where, index, _chat(row, src.get("column"))))
        except _Bad as e:
            raise ValueError(f"{where}: {e}") from None
    if not out:
        raise ValueError(f"{source_label(src, base)}: no chats (the source has no rows)")
    return out


def read_chats(source: Any, base: Path | None = None) -> list[list[dict]]:
    """Validated message lists of a chat source (a path, `{path: ...}` or `{hf: ...}`)."""
    base = Path.cwd() if base is None else Path(base)
    src = _source(source, "source", CHAT_SOURCE_KEYS)
    return [c.messages for c in _chat_rows(src, base)]


# ---------------------------------------------------------------------------------------------
# prompts


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise _Bad(f"{what} is not a string (got {type(v).__name__})")
    if not v.strip():
        raise _Bad(f"empty {what}")
    return v.strip()


def _opt_id(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)) or not str(v).strip():
        raise _Bad(f"id {v!r} is not a non-empty string or integer")
    return str(v).strip()


def _opt_domain(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not DOMAIN_RE.match(v):
        raise _Bad(f"domain {v!r} is not a valid domain name")
    return v


def _opt_system(v: Any) -> str | None:
    """A system prompt: null, absent or blank = none."""
    if v is None:
        return None
    if not isinstance(v, str):
        raise _Bad(f"system prompt is not a string (got {type(v).__name__})")
    return v.strip() or None


def _leading_system(messages: list[dict]) -> str | None:
    """The system message before a chat's first user turn (None without one); raises _Bad when
    there are several (a prompt has one system prompt)."""
    before = []
    for m in messages:
        if m["role"] == "user":
            break
        before.append(m)
    if len(before) > 1:
        raise _Bad(f"{len(before)} system messages before the first user turn (a prompt has at "
                   "most one)")
    return before[0]["content"] if before else None


def _chat_prompt(turns: Any, name: str) -> tuple[str | None, str]:
    """(system, user) of a chat row used as a prompt: an optional system message, one user turn
    and optionally the answer (ignored)."""
    messages = _turns(turns, name)
    roles = [m["role"] for m in messages]
    if "user" not in roles:
        raise _Bad(f"`{name}` has no user turn")
    first = roles.index("user")
    if "assistant" in roles[:first]:
        raise _Bad(f"`{name}` has an assistant turn before the first user turn")
    if any(r != "assistant" for r in roles[first + 1:]):
        raise _Bad(f"`{name}` has turns after the user turn other than the answer: a prompt is "
                   "one system prompt and one user message")
    return _leading_system(messages), messages[first]["content"]


def _prompt_items(row: Any, column: str | None
                  ) -> list[tuple[str, str | None, str | None, int, str | None]]:
    """(prompt, explicit id, domain, slot, system prompt) of one prompt-source item."""
    if isinstance(row, str):
        return [(_text(row, "prompt"), None, None, 0, None)]
    if not isinstance(row, dict):
        raise _Bad(f"item is not a string or a mapping (got {type(row).__name__})")
    pid, domain = _opt_id(row.get("id")), _opt_domain(row.get("domain"))
    system = _opt_system(row.get("system"))
    if column is not None:
        if column not in row:
            raise _Bad(f"row has no column {column!r}")
        return [(_text(row[column], "prompt"), pid, domain, 0, system)]
    if "paraphrases" in row:
        ps = row["paraphrases"]
        if not isinstance(ps, list) or not ps:
            raise _Bad("`paraphrases` is not a non-empty list")
        out = []
        for k, p in enumerate(ps):
            try:
                out.append((_text(p, f"paraphrase {k}"), None if pid is None else f"{pid}/{k}",
                            domain, k, system))
            except _Bad as e:
                raise _Bad(str(e), k) from None
        return out
    for key in ("question", "prompt"):
        if key in row:
            return [(_text(row[key], "prompt"), pid, domain, 0, system)]
    for key in ("messages", "conversations"):
        if key in row:
            if system is not None:
                raise _Bad(f"row has both `system` and `{key}`: give the system prompt as the "
                           f"chat's system message")
            chat_system, user = _chat_prompt(row[key], key)
            return [(user, pid, domain, 0, chat_system)]
    raise _Bad("item has none of `question`, `prompt`, `paraphrases` or `messages`")


def read_prompts(source: Any, base: Path | None = None) -> list[dict]:
    """Prompts of a prompt source: dicts with prompt, system (the system prompt, or None), id
    (explicit, or None), domain (or None), template (0-based entry index), slot (paraphrase index,
    else 0), paraphrase (bool) and where (file:line or file: row N). An empty source is an
    error."""
    base = Path.cwd() if base is None else Path(base)
    return _read_prompts(_source(source, "source", PROMPT_SOURCE_KEYS), base)


def _read_prompts(src: dict, base: Path) -> list[dict]:
    if "hf" in src:
        rows = ((w, i, r, None) for w, i, r in _hf_rows(src, base))
    else:
        p = _file(src, base, PROMPT_SUFFIXES, "prompts")
        suffix = p.suffix.lower()
        if suffix in (".yaml", ".yml"):
            rows = _yaml_rows(p)
        else:
            reader = {".csv": _csv_rows, ".jsonl": _jsonl_rows, ".json": _json_rows,
                      ".parquet": _parquet_rows, ".txt": _txt_rows}[suffix]
            rows = ((w, i, r, None) for w, i, r in reader(p))
    out = []
    for where, index, row, sub in rows:
        try:
            items = _prompt_items(row, src.get("column"))
        except _Bad as e:
            ok = sub is not None and e.slot is not None and e.slot < len(sub)
            at = sub[e.slot] if ok else where
            raise ValueError(f"{at}: {e}") from None
        para = isinstance(row, dict) and src.get("column") is None and "paraphrases" in row
        for text, pid, domain, slot, system in items:
            at = sub[slot] if sub is not None and slot < len(sub) else where
            out.append({"prompt": text, "system": system, "id": pid, "domain": domain,
                        "template": index, "slot": slot, "paraphrase": para, "where": at})
    if not out:
        raise ValueError(f"{source_label(src, base)}: the prompt set is empty")
    return out


@dataclass
class _Prompt:
    domain: str
    local_id: str
    template: int
    slot: int
    prompt: str
    where: str
    stat: dict = field(repr=False)
    group: str = ""  # the source entry (a question and its paraphrases)
    system: str | None = None

    @property
    def key(self) -> tuple[str | None, str]:
        """What makes two prompts the same: (system prompt, user message)."""
        return self.system, self.prompt

    @property
    def canon(self) -> Any:
        """The prompt in split hashes: the text alone without a system prompt (as before system
        prompts were kept, so those splits are unchanged), else [system, text]."""
        return self.prompt if self.system is None else [self.system, self.prompt]

    def messages(self) -> list[dict]:
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        return system + [{"role": "user", "content": self.prompt}]

    def row(self, eval_set: str) -> dict:
        return {"prompt_id": f"{eval_set}/{self.domain}/{self.local_id}", "eval_set": eval_set,
                "domain": self.domain, "template": self.template, "slot": self.slot,
                "system": self.system, "prompt": self.prompt}


# ---------------------------------------------------------------------------------------------
# splitting


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _rank(canon: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\n{canon}".encode()).hexdigest()


def split_count(n: int, fraction: float) -> int:
    """How many of n items a fraction takes: round half up, at least 1 if fraction > 0, at most
    n - 1 (so both sides keep something whenever n >= 2)."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, int(fraction * n + 0.5)))


# ---------------------------------------------------------------------------------------------
# config


def _fraction(v: Any, key: str, lo_open: bool) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v < 1 and (
        v > 0 if lo_open else v >= 0)
    if not ok:
        raise ConfigError(f"{key}: must be a number in {'(0' if lo_open else '[0'}, 1), got {v!r}")
    return float(v)


def _data_config(settings: dict) -> dict:
    if not isinstance(settings, dict) or not isinstance(settings.get("data"), dict):
        raise ConfigError("settings: `data` must be a mapping (see blockem/data.py)")
    seed = settings.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed: must be an integer, got {seed!r}")
    d = settings["data"]
    unknown = sorted(set(d) - set(DATA_KEYS))
    if unknown:
        raise ConfigError(f"unknown key 'data.{unknown[0]}' (allowed here: {', '.join(DATA_KEYS)})")
    ft = d.get("finetune")
    if not isinstance(ft, dict) or not ft:
        raise ConfigError("data.finetune: must map at least one domain to a chat source")
    finetune = {}
    for domain, spec in ft.items():
        key = f"data.finetune.{domain}"
        if not isinstance(domain, str) or not DOMAIN_RE.match(domain):
            raise ConfigError(f"{key}: {domain!r} is not a valid domain name "
                              "(letters, digits, _.-)")
        if domain == GENERAL:
            raise ConfigError(f"{key}: '{GENERAL}' is reserved for domain-agnostic prompts")
        finetune[domain] = _sources(spec, key, CHAT_SOURCE_KEYS)
        if not finetune[domain]:
            raise ConfigError(f"{key}: no chat source")
    control = {}
    for domain, spec in (d.get("control") or {}).items():
        key = f"data.control.{domain}"
        if domain not in finetune:
            raise ConfigError(f"{key}: {domain!r} is not a fine-tuning domain "
                              f"({', '.join(finetune)}); a control is matched to one")
        control[domain] = _sources(spec, key, CHAT_SOURCE_KEYS)
        if not control[domain]:
            raise ConfigError(f"{key}: no chat source")
    if isinstance(d.get("aligned"), dict) and not {"path", "hf", "generate"} & set(d["aligned"]):
        raise ConfigError("data.aligned: one chat source (`path`, `hf` or `generate`), not a "
                          "mapping of domains (the aligned chats of the mix are shared)")
    aligned = _sources(d.get("aligned"), "data.aligned", CHAT_SOURCE_KEYS)
    pr = d.get("prompts")
    if not isinstance(pr, dict):
        raise ConfigError("data.prompts: must be a mapping with `core` (and `final`, `in_domain`)")
    unknown = sorted(set(pr) - set(PROMPT_KEYS))
    if unknown:
        raise ConfigError(f"unknown key 'data.prompts.{unknown[0]}' "
                          f"(allowed here: {', '.join(PROMPT_KEYS)})")
    core = _sources(pr.get("core"), "data.prompts.core", PROMPT_SOURCE_KEYS)
    if not core:
        raise ConfigError("data.prompts.core: needs at least one prompt source")
    final = _sources(pr.get("final"), "data.prompts.final", PROMPT_SOURCE_KEYS)
    in_domain = {}
    ind = pr.get("in_domain") or {}
    if not isinstance(ind, dict):
        raise ConfigError("data.prompts.in_domain: must map fine-tuning domains to prompt sources")
    for domain, spec in ind.items():
        key = f"data.prompts.in_domain.{domain}"
        if domain not in finetune:
            raise ConfigError(f"{key}: {domain!r} is not a fine-tuning domain "
                              f"({', '.join(finetune)})")
        in_domain[domain] = _sources(spec, key, PROMPT_SOURCE_KEYS)
    max_examples = d.get("max_examples")
    if max_examples is not None and (not isinstance(max_examples, int)
                                     or isinstance(max_examples, bool) or max_examples < 1):
        raise ConfigError(f"data.max_examples: must be null or an integer >= 1, "
                          f"got {max_examples!r}")
    corpus = d.get("corpus") or []
    if not isinstance(corpus, list):
        raise ConfigError("data.corpus: must be a list of chat sources")
    return {
        "seed": seed,
        "finetune": finetune,
        "control": control,
        "aligned": aligned,
        "heldout_fraction": _fraction(d.get("heldout_fraction", 0.1), "data.heldout_fraction",
                                      lo_open=False),
        "final_fraction": _fraction(d.get("final_fraction", 0.5), "data.final_fraction",
                                    lo_open=True),
        "core": core, "final": final, "in_domain": in_domain,
        "corpus": _sources(corpus, "data.corpus", CHAT_SOURCE_KEYS),
        "max_examples": max_examples,
    }


# ---------------------------------------------------------------------------------------------
# the stage


def _stat_key(table: dict, label: str, **init) -> str:
    """Add a fresh counter for `label` to `table` (a label met twice gets `#2`, ...); its key."""
    key, n = label, 1
    while key in table:
        n += 1
        key = f"{label}#{n}"
    table[key] = {"rows": 0, "duplicates": 0, "kept": 0, **init}
    return key


def _stat(table: dict, label: str, **init) -> dict:
    return table[_stat_key(table, label, **init)]


def _kept_chats(sources, base: Path, stats: dict, banned: set, reason: str) -> list:
    """The chats of `sources`, de-duplicated, without those whose first user turn is in `banned`
    (counted per source under `reason`)."""
    seen, rows = set(), []
    for _, src in sources:
        stat = _stat(stats, source_label(src, base), **{reason: 0})
        for c in _chat_rows(src, base):
            stat["rows"] += 1
            first = next((m["content"] for m in c.messages if m["role"] == "user"), None)
            if c.canon in seen:
                stat["duplicates"] += 1
            elif first in banned:
                stat[reason] += 1
            else:
                seen.add(c.canon)
                stat["kept"] += 1
                rows.append(c)
    return rows


def _collect_prompts(eval_set: str, sources: list[tuple[str, dict]], base: Path, stats: dict,
                     domain: str | None = None) -> list[_Prompt]:
    """Read, check and de-duplicate (by system prompt and text) one eval set; `domain` forces
    the domain."""
    out, texts, ids = [], set(), {}
    for _, src in sources:
        key = _stat_key(stats, source_label(src, base))
        stat, name = stats[key], source_name(src)
        for item in _read_prompts(src, base):
            stat["rows"] += 1
            d = item["domain"] or src.get("domain") or domain or GENERAL
            if domain is not None and d != domain:
                raise ValueError(f"{item['where']}: domain {d!r} in the in_domain prompts of "
                                 f"{domain!r}")
            if (item["system"], item["prompt"]) in texts:
                stat["duplicates"] += 1
                continue
            if item["id"] is not None:
                local = item["id"]
            else:
                local = f"{name}:{item['template']}"
                if item["paraphrase"]:
                    local += f"/{item['slot']}"
            if (d, local) in ids:
                raise ValueError(f"{item['where']}: duplicate prompt id '{eval_set}/{d}/{local}' "
                                 f"(first at {ids[(d, local)]}); give the prompts distinct ids")
            ids[(d, local)] = item["where"]
            texts.add((item["system"], item["prompt"]))
            stat["kept"] += 1
            out.append(_Prompt(d, local, item["template"], item["slot"], item["prompt"],
                               item["where"], stat, f"{key}#{item['template']}",
                               item["system"]))
    return out


def _plan(settings: dict, base: Path) -> tuple[dict, dict]:
    """Read and validate everything; return (tables as row lists, counts). Writes nothing."""
    cfg = _data_config(settings)
    seed = cfg["seed"]
    counts: dict = {"seed": seed, "finetune": {}, "prompts": {s: {} for s in EVAL_SETS},
                    "corpus": {}}

    # fine-tuning chats: de-duplicate per domain, cap, hold out
    train, heldout = {}, {}
    for domain, sources in cfg["finetune"].items():
        dstats = counts["finetune"][domain] = {}
        seen, kept = set(), []
        for _, src in sources:
            key = _stat_key(dstats, source_label(src, base), capped=0, heldout=0, train=0)
            stat, name = dstats[key], source_name(src)
            for c in _chat_rows(src, base):
                stat["rows"] += 1
                if c.canon in seen:
                    stat["duplicates"] += 1
                    continue
                seen.add(c.canon)
                stat["kept"] += 1
                kept.append((c, stat, key, name))
        order = sorted(range(len(kept)), key=lambda j: _rank(kept[j][0].canon, seed))
        n = len(kept) if cfg["max_examples"] is None else min(len(kept), cfg["max_examples"])
        n_held = split_count(n, cfg["heldout_fraction"])
        held_ix, train_ix = set(order[:n_held]), set(order[n_held:n])
        for j in order[n:]:
            kept[j][1]["capped"] += 1
        for j in held_ix:
            kept[j][1]["heldout"] += 1
        for j in train_ix:
            kept[j][1]["train"] += 1
        train[domain] = [kept[j][0] for j in sorted(train_ix)]
        heldout[domain] = [(kept[j][0], kept[j][2], kept[j][3]) for j in sorted(held_ix)]

    # matched controls (the same questions, safe answers): every chat but those whose question is
    # a held-out (in-domain evaluation) question of the domain
    control = {}
    for domain, sources in cfg["control"].items():
        cstats_d = counts.setdefault("control", {})[domain] = {}
        held = {next(m["content"] for m in c.messages if m["role"] == "user")
                for c, _, _ in heldout[domain]}
        control[domain] = _kept_chats(sources, base, cstats_d, held, "heldout_question")

    # evaluation prompts
    pstats = counts["prompts"]
    core = _collect_prompts("core", cfg["core"], base, pstats["core"])
    if cfg["final"]:
        final = []
        core_keys = {p.key for p in core}
        for p in _collect_prompts("final", cfg["final"], base, pstats["final"]):
            if p.key in core_keys:
                p.stat["kept"] -= 1
                p.stat["in_core"] = p.stat.get("in_core", 0) + 1
            else:
                final.append(p)
        if not final:
            raise ValueError("data.prompts.final: every final prompt is also a core prompt")
    else:
        # whole entries move (all paraphrases of a question stay on one side)
        by_domain: dict[str, dict[str, list[_Prompt]]] = {}
        for p in core:
            by_domain.setdefault(p.domain, {}).setdefault(p.group, []).append(p)
        moved = set()
        for domain, groups in by_domain.items():
            ranked = sorted(groups.values(), key=lambda ps: _rank(
                _canonical([domain, [p.canon for p in ps]]), seed))
            for ps in ranked[:split_count(len(ranked), cfg["final_fraction"])]:
                for p in ps:
                    moved.add(id(p))
                    p.stat["to_final"] = p.stat.get("to_final", 0) + 1
        final = [p for p in core if id(p) in moved]
        core = [p for p in core if id(p) not in moved]
        if not final:
            raise ValueError("data.prompts.final is empty and core has too few prompts per "
                             "domain to split by final_fraction: give `final` sources")

    in_domain = []
    for domain in cfg["finetune"]:
        istats = pstats["in_domain"][domain] = {}
        if domain in cfg["in_domain"]:
            ps = _collect_prompts("in_domain", cfg["in_domain"][domain], base, istats, domain)
        else:
            trained = {m["content"] for c in train[domain] for m in c.messages
                       if m["role"] == "user"}
            ps, texts = [], set()
            for c, key, name in heldout[domain]:
                stat = istats.setdefault(f"heldout:{key}", {"rows": 0, "duplicates": 0,
                                                           "kept": 0, "in_training": 0})
                first = next(m["content"] for m in c.messages if m["role"] == "user")
                try:
                    system = _leading_system(c.messages)
                except _Bad as e:
                    raise ValueError(f"{c.where}: held-out chat (an in_domain prompt): {e}") \
                        from None
                stat["rows"] += 1
                if (system, first) in texts:
                    stat["duplicates"] += 1
                elif first in trained:
                    stat["in_training"] += 1
                else:
                    texts.add((system, first))
                    stat["kept"] += 1
                    ps.append(_Prompt(domain, f"{name}:{c.index}", c.index, 0, first, c.where,
                                      stat, system=system))
        if not ps:
            raise ValueError(
                f"data.finetune.{domain}: no in_domain prompts (held out "
                f"{len(heldout[domain])} chats at heldout_fraction {cfg['heldout_fraction']}, "
                f"none usable): raise heldout_fraction or give data.prompts.in_domain.{domain}")
        in_domain.extend(ps)

    prompts = ([p.row("core") for p in core] + [p.row("final") for p in final]
               + [p.row("in_domain") for p in in_domain])
    first: dict[str, str] = {}
    for row, p in zip(prompts, core + final + in_domain):
        if row["prompt_id"] in first:
            raise ValueError(f"{p.where}: duplicate prompt id {row['prompt_id']!r} (first at "
                             f"{first[row['prompt_id']]}); give the sources distinct names or ids")
        first[row["prompt_id"]] = p.where

    # aligned chats for the mix defence: no evaluation question, ever
    aligned = None
    if cfg["aligned"]:
        astats = counts["aligned"] = {}
        asked = {p.prompt for p in core + final + in_domain}
        aligned = _kept_chats(cfg["aligned"], base, astats, asked, "eval_question")
        if not aligned:
            n = sum(st["rows"] for st in astats.values())
            raise ValueError(f"data.aligned: no chats left: the first user turn of each of its "
                             f"{n} chats is an evaluation prompt (or a duplicate)")

    # SAE corpus
    cstats = counts["corpus"]
    items = [(c.canon, c.messages, "finetune") for d in train for c in train[d]]
    items += [(c.canon, c.messages, "finetune") for d in control for c in control[d]]
    items += [(None, p.messages(), "prompts") for r, p in zip(prompts, core + final + in_domain)
              if r["eval_set"] != "final"]  # the held-out evaluation stays unseen
    extra_stats = {}
    for _, src in cfg["corpus"]:
        stat = _stat(extra_stats, source_label(src, base))
        for c in _chat_rows(src, base):
            items.append((c.canon, c.messages, stat))
    seen, corpus = set(), []
    n_from = {"finetune": 0, "prompts": 0}
    duplicates = 0
    for canon, messages, origin in items:
        canon = canon or _canonical(messages)
        if isinstance(origin, dict):
            origin["rows"] += 1
        if canon in seen:
            duplicates += 1
            if isinstance(origin, dict):
                origin["duplicates"] += 1
            continue
        seen.add(canon)
        if isinstance(origin, dict):
            origin["kept"] += 1
        else:
            n_from[origin] += 1
        corpus.append((canon, messages))
    corpus.sort(key=lambda cm: _rank(cm[0], seed))
    cstats.update({"finetune_chats": n_from["finetune"], "prompts": n_from["prompts"],
                   "sources": extra_stats, "duplicates": duplicates, "rows": len(corpus)})

    tables = {
        "finetune": {d: [{"domain": d, "messages": c.messages} for c in train[d]] for d in train},
        "control": {d: [{"domain": d, "messages": c.messages} for c in control[d]]
                    for d in control},
        "prompts": prompts,
        "corpus": [{"messages": m} for _, m in corpus],
        "aligned": None if aligned is None else [{"messages": c.messages} for c in aligned],
    }
    counts["totals"] = {
        "finetune": {d: len(rows) for d, rows in tables["finetune"].items()},
        "control": {d: len(rows) for d, rows in tables["control"].items()},
        "heldout": {d: len(h) for d, h in heldout.items()},
        "prompts": {s: sum(r["eval_set"] == s for r in prompts) for s in EVAL_SETS},
        "corpus": len(corpus),
    }
    if aligned is not None:
        counts["totals"]["aligned"] = len(aligned)
    return tables, counts


def _check_out(out: Path) -> None:
    """Refuse to replace a directory that holds anything but this stage's outputs."""
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{out}: exists and is not a directory")
        other = sorted(p.name for p in out.iterdir()
                       if p.name not in OUTPUT_NAMES and not p.name.startswith("."))
        if other:
            raise ValueError(f"{out}: holds files that are not prepare_data outputs "
                             f"({', '.join(other[:5])}); refusing to replace it")


def prepare_data(settings: dict, out: Path) -> None:
    """Read, validate, de-duplicate and split the configured data; write it under `out` (whole
    directory replaced atomically, only after everything validated)."""
    import pyarrow as pa

    from blockem.io import atomic_dir, provenance, write_json, write_table

    out = Path(out)
    _check_out(out)
    tables, counts = _plan(settings, Path.cwd())
    prov = provenance("prepare_data", settings, settings["seed"], counts=counts)
    schemas = _schemas()
    with atomic_dir(out) as tmp:
        for kind in ("finetune", "control"):
            for domain, rows in tables[kind].items():
                write_table(tmp / kind / f"{domain}.parquet",
                            pa.Table.from_pylist(rows, schema=schemas["finetune"]), prov)
        write_table(tmp / "prompts.parquet",
                    pa.Table.from_pylist(tables["prompts"], schema=schemas["prompts"]), prov)
        write_table(tmp / "corpus.parquet",
                    pa.Table.from_pylist(tables["corpus"], schema=schemas["corpus"]), prov)
        if tables["aligned"] is not None:
            write_table(tmp / "aligned.parquet",
                        pa.Table.from_pylist(tables["aligned"], schema=schemas["corpus"]), prov)
        write_json(tmp / "provenance.json", prov)
