"""Atomic file writes and provenance.

Every table and JSON file is written to a temporary name in the same directory and renamed, so a
crash never leaves a file a later rule would accept. Every output records `provenance`: the hash of
the settings it was made from, its seed and the versions of the packages that made it.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from blockem.config import settings_hash

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


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run of this same output
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
