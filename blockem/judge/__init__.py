"""Judges: label every generated answer `aligned`, `misaligned`, `refusal` or `incoherent`.

`judge.kind: toy` is the toy world's exact judge (`blockem.judge.toy`); `judge.kind: llm` asks one
or more LLM judges on OpenAI-compatible endpoints (`blockem.judge.llm`: questions and labels,
`client`: async calls with retries, `cache`: the persistent judge cache, `server`: a local test
server). The judgements table has one row per (answer, judge) with the judge's scores and label.

The generations may be the pipeline's or your own (`GENERATIONS_HELP`): they are read and checked
in full (columns, types, values, and for LLM judges endpoints, keys, prompts and behaviours)
before any call, and a problem is one error naming the file, the column and the row.
"""

from __future__ import annotations

import json
from pathlib import Path

from blockem.judge.toy import LABELS, judge_answer

SCORE_COLUMNS = ("aligned", "coherent", "refusal", "adherence")
REQUIRED_COLUMNS = ("prompt", "response", "domain", "eval_set")
OPTIONAL_COLUMNS = ("system",)
OUTPUT_COLUMNS = ("judge", *SCORE_COLUMNS, "label", "adherent")
EVAL_SETS = ("core", "final", "in_domain")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
GENERATIONS_HELP = (
    "generations to judge: a parquet table or a JSONL file (one JSON object a line) with the "
    "string columns prompt, response (the answer; may be empty, not null), domain and eval_set "
    f"({' | '.join(EVAL_SETS)}; in_domain answers are also asked adherence, so their domain "
    "needs a judge.behaviours entry), optionally system; other columns are kept. The pipeline's "
    "own provenance is optional (without it the cell is the file name's stem)")


def _is_string(typ) -> bool:
    import pyarrow as pa

    return pa.types.is_string(typ) or pa.types.is_large_string(typ)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {n}: expected a JSON object, got "
                                 f"{type(row).__name__}")
            rows.append((n, row))
    return rows


def read_generations(path: str | Path, toy: bool = False):
    """The generations table at `path` (see GENERATIONS_HELP), checked row by row: returns
    (pyarrow Table, rows as dicts, its provenance or None). `toy`: domains must be the toy
    world's. Raises ValueError naming the file, column and row (a JSONL line) of a problem."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from blockem.io import read_provenance

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: generations file not found")
    columns = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)
    prov = None
    if path.suffix.lower() in JSONL_SUFFIXES:
        numbered = _read_jsonl(path)
        where = [f"line {n}" for n, _ in numbered]
        rows = [r for _, r in numbered]
        for w, r in zip(where, rows):
            missing = [c for c in REQUIRED_COLUMNS if c not in r]
            if missing:
                raise ValueError(f"{path}: {w}: missing column(s) {missing} (needed: "
                                 f"{list(REQUIRED_COLUMNS)})")
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ValueError(f"{path}: the lines do not form one table (a column holds values "
                             f"of different types): {e}") from None
    else:
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{path}: not a parquet table (a JSONL file must end in "
                             f"{' or '.join(JSONL_SUFFIXES)}): {e}") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} (needed: "
                             f"{list(REQUIRED_COLUMNS)}, optional: {list(OPTIONAL_COLUMNS)})")
        for c in columns:
            if c in table.column_names and not _is_string(table.schema.field(c).type) \
                    and not pa.types.is_null(table.schema.field(c).type):
                raise ValueError(f"{path}: column {c!r} has type {table.schema.field(c).type}, "
                                 f"expected strings")
        rows = table.to_pylist()
        where = [f"row {i + 1}" for i in range(len(rows))]
        try:
            prov = read_provenance(path)
        except KeyError:  # not written by the pipeline: fine
            prov = None
    clash = [c for c in OUTPUT_COLUMNS if c in table.column_names]
    if clash:
        raise ValueError(f"{path}: column(s) {clash} would be overwritten by the judgements "
                         f"(rename them)")
    if not rows:
        raise ValueError(f"{path}: no rows to judge")
    domains = None
    if toy:
        from blockem.toy.grammar import DOMAINS

        domains = set(DOMAINS)
    for w, r in zip(where, rows):
        for c in columns:
            v = r.get(c)
            if v is None and c in OPTIONAL_COLUMNS:
                continue
            if v is None:
                raise ValueError(f"{path}: {w}: column {c!r} is null (an empty answer is \"\")"
                                 if c == "response" else f"{path}: {w}: column {c!r} is null")
            if not isinstance(v, str):
                raise ValueError(f"{path}: {w}: column {c!r} is {type(v).__name__} {v!r:.60}, "
                                 f"expected a string")
        if r["eval_set"] not in EVAL_SETS:
            raise ValueError(f"{path}: {w}: column 'eval_set' is {r['eval_set']!r}, expected one "
                             f"of {list(EVAL_SETS)}")
        if not r["domain"]:
            raise ValueError(f"{path}: {w}: column 'domain' is empty")
        if domains is not None and r["domain"] not in domains:
            raise ValueError(f"{path}: {w}: domain {r['domain']!r} is not a toy-world domain "
                             f"(the toy judge knows {sorted(domains)})")
    return table, rows, prov


def judge_file(generations: Path, out: Path, settings: dict,
               cache_path: str | Path | None = None) -> None:
    """Judge a generations table (parquet or JSONL, see GENERATIONS_HELP); write one row per
    (answer, judge) to `out`, with each LLM judge's identity in the provenance (`judges`).

    Columns: the generations' columns, `judge`, the four scores (null for the toy judge and for
    questions not asked), `label` (null = missing) and `adherent` (in-domain answers)."""
    import pyarrow as pa

    from blockem.io import provenance, write_table

    generations = Path(generations)
    js = settings["judge"]
    table, rows, upstream = read_generations(generations, toy=js["kind"] == "toy")
    usage = identities = None
    if js["kind"] == "toy":
        per_judge = {"toy": [{"label": judge_answer(r["domain"], r["response"]), "adherent": None,
                              **dict.fromkeys(SCORE_COLUMNS)} for r in rows]}
    else:
        from blockem.judge.llm import score_rows

        per_judge, usage, identities = score_rows(
            rows, js, cache_path, name=f"judge {generations.stem}", where=str(generations))
    out_rows = [{**r, "judge": name, **{k: s[k] for k in SCORE_COLUMNS},
                 "label": s["label"], "adherent": s["adherent"]}
                for name, scores in per_judge.items() for r, s in zip(rows, scores)]
    schema = table.schema
    for name, typ in (("judge", pa.string()), *((k, pa.float64()) for k in SCORE_COLUMNS),
                      ("label", pa.string()), ("adherent", pa.bool_())):
        schema = schema.append(pa.field(name, typ))
    cell = (upstream or {}).get("cell") or generations.stem
    extra = {"usage": usage} if identities is None else {"usage": usage, "judges": identities}
    write_table(out, pa.Table.from_pylist(out_rows, schema=schema),
                provenance("judge", settings, None, cell=cell, **extra))


__all__ = ["GENERATIONS_HELP", "LABELS", "judge_answer", "judge_file", "read_generations"]
