"""Atomic file writes and provenance.

Every table and JSON file is written to a temporary name in the same directory and renamed, so a
crash never leaves a file a later rule would accept; the temporary files a killed writer left behind
(`.<name>.<random>.tmp`) are removed by the next write of the same output. Every output records
`provenance`: the hash of the settings it was made from (`blockem.hashing.settings_hash`), its
seed and the versions of the packages that made it.

A training stage keeps its resumable checkpoint beside its output, in `<output>.ckpt/`
(`checkpoint_dir`); it is removed once the output is complete.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from blockem.hashing import settings_hash

PACKAGES = ("blockem", "torch", "transformers", "peft", "tokenizers", "datasets", "pyarrow",
            "snakemake")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def provenance(stage: str, settings: Any, seed: int | None = None, **extra) -> dict:
    return {"stage": stage, "config_hash": settings_hash(settings), "seed": seed,
            "versions": versions(), "settings": settings, **extra}


def _remove_stale_temps(path: Path) -> None:
    """Remove `.<name>.<8 random chars>.tmp` siblings of `path`: what `atomic_path` /
    `atomic_dir` of this same output leave behind when their process is killed mid-write (the
    pattern is exact, so another output's temporaries never match)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp")
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if not pattern.fullmatch(stale.name):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def checkpoint_dir(out: str | Path) -> Path:
    """Where the resumable training checkpoint of output `out` lives: the sibling `<out>.ckpt/`
    (not an output of any rule, so Snakemake neither deletes it before a rerun nor tracks it)."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds (stale
    temporaries of the same output, left by a killed writer, are removed first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)  # left by a killed run of this same output
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_table(path: str | Path, table, prov: dict | None = None) -> None:
    """Write a pyarrow Table (or pandas DataFrame) as parquet, provenance in the file metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    if prov is not None:
        meta = dict(table.schema.metadata or {})
        meta[b"blockem.provenance"] = json.dumps(prov, sort_keys=True, default=str).encode()
        table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_provenance(path: str | Path) -> dict:
    """Provenance of a parquet file or an output directory."""
    path = Path(path)
    if path.is_dir():
        return read_json(path / "provenance.json")
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[b"blockem.provenance"])


PROMPT_COLUMNS = ("prompt_id", "eval_set", "domain", "prompt")
PROMPT_TABLE = "a prompt table (world/prompts.parquet, written by `world` or `prepare_data`)"


def read_checked(path: str | Path, columns, what: str, columns_only: bool = False):
    """A parquet table that must have `columns` (names, or {name: pyarrow type check such as
    `pa.types.is_string`}); one ValueError naming the file, the missing or mistyped column and
    what the table should be (`what`, e.g. "a prompt table (world/prompts.parquet)").
    `columns_only`: read only those columns."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected {what})")
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # not parquet at all
        raise ValueError(f"{path}: not a parquet file ({type(e).__name__}: {e}); expected {what}")
    checks = columns if isinstance(columns, dict) else dict.fromkeys(columns)
    missing = [c for c in checks if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (has {schema.names}); expected "
                         f"{what}")
    for name, check in checks.items():
        if check is not None and not check(schema.field(name).type):
            raise ValueError(f"{path}: column {name!r} has type {schema.field(name).type}, "
                             f"expected {check.__name__.removeprefix('is_')}; expected {what}")
    return pq.read_table(path, columns=list(checks) if columns_only else None)
