"""Hashes that identify what an output was made from (a leaf module: imports nothing from blockem).

- `settings_hash`: the short hash of a stage's settings, its outputs' `config_hash`;
- `file_sha256`: the sha256 of a file's bytes (judge prompt files, GGUF weights);
- `input_fingerprint`: what identifies a stage's input files (ties a training checkpoint to them).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def settings_hash(settings: Any) -> str:
    """Stable short hash of JSON-able settings (the `config_hash` recorded in provenance)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_fingerprint(paths, hash_below: int = 64 << 20) -> list:
    """What identifies the inputs under `paths` (files or directories; a name that is not a local
    path, e.g. a Hub id, as itself): the sha256 of every file smaller than `hash_below` bytes, the
    size and mtime of larger ones (model weights). Ties a checkpoint to the exact inputs it was
    trained on, so a rewritten input (an upstream rerun) starts training over."""
    out = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            out.append([str(p), None])
            continue
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            st = f.stat()
            if st.st_size < hash_below:
                out.append([str(f), file_sha256(f)])
            else:
                out.append([str(f), st.st_size, st.st_mtime_ns])
    return out
