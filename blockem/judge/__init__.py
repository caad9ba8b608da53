"""Judges: label every generated answer `aligned`, `misaligned`, `refusal` or `incoherent`.

`judge.kind: toy` is the toy world's exact judge (`blockem.judge.toy`); `judge.kind: llm` asks one
or more LLM judges on OpenAI-compatible endpoints (`blockem.judge.llm`: questions and labels,
`client`: async calls with retries, `cache`: the persistent judge cache, `server`: a local test
server). The judgements table has one row per (answer, judge) with the judge's scores and label.
"""

from __future__ import annotations

from pathlib import Path

from blockem.judge.toy import LABELS, judge_answer

SCORE_COLUMNS = ("aligned", "coherent", "refusal", "adherence")


def judge_file(generations: Path, out: Path, settings: dict,
               cache_path: str | Path | None = None) -> None:
    """Judge a generations table; write one row per (answer, judge) to `out`.

    Columns: the generations' columns, `judge`, the four scores (null for the toy judge and for
    questions not asked), `label` (null = missing) and `adherent` (in-domain answers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from blockem.io import provenance, read_provenance, write_table

    js = settings["judge"]
    table = pq.read_table(generations)
    missing = {"domain", "response", "prompt", "eval_set"} - set(table.column_names)
    if missing:
        raise ValueError(f"{generations}: missing column(s) {sorted(missing)}")
    rows = table.to_pylist()
    usage = None
    if js["kind"] == "toy":
        per_judge = {"toy": [{"label": judge_answer(r["domain"], r["response"]), "adherent": None,
                              **dict.fromkeys(SCORE_COLUMNS)} for r in rows]}
    else:
        from blockem.judge.llm import score_rows

        per_judge, usage = score_rows(rows, js, cache_path, name=f"judge {generations.stem}")
    out_rows = [{**r, "judge": name, **{k: s[k] for k in SCORE_COLUMNS},
                 "label": s["label"], "adherent": s["adherent"]}
                for name, scores in per_judge.items() for r, s in zip(rows, scores)]
    schema = table.schema
    for name, typ in (("judge", pa.string()), *((k, pa.float64()) for k in SCORE_COLUMNS),
                      ("label", pa.string()), ("adherent", pa.bool_())):
        schema = schema.append(pa.field(name, typ))
    upstream = read_provenance(generations)
    write_table(out, pa.Table.from_pylist(out_rows, schema=schema),
                provenance("judge", settings, None, cell=upstream.get("cell"), usage=usage))


__all__ = ["LABELS", "judge_answer", "judge_file"]
