"""Judges: label every generated answer `aligned`, `misaligned`, `refusal` or `incoherent`.

The embedded default uses the toy world's exact judge (`blockem.judge.toy`).
"""

from __future__ import annotations

from pathlib import Path

from blockem.judge.toy import LABELS, judge_answer


def judge_file(generations: Path, out: Path, settings: dict) -> None:
    """Add a `label` column to a generations table and write it to `out`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from blockem.io import provenance, read_provenance, write_table

    if settings["judge"]["kind"] != "toy":
        raise ValueError(f"judge kind {settings['judge']['kind']!r} is not available")
    table = pq.read_table(generations)
    missing = {"domain", "response"} - set(table.column_names)
    if missing:
        raise ValueError(f"{generations}: missing column(s) {sorted(missing)}")
    labels = [judge_answer(d, r) for d, r in zip(table["domain"].to_pylist(),
                                                  table["response"].to_pylist())]
    table = table.append_column("label", pa.array(labels, pa.string()))
    upstream = read_provenance(generations)
    write_table(out, table, provenance("judge", settings, None, cell=upstream.get("cell")))


__all__ = ["LABELS", "judge_answer", "judge_file"]
