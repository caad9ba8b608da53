"""A persistent cache of judge scores: one SQLite file per judge job (a *shard*).

Judging costs money and time, so every score is written down as soon as it arrives and never
asked for twice. A row is keyed by

    cache_key(endpoint, judge_model, protocol, prompt_hash, answer_hash)

(a sha256), where `endpoint` is the normalised base URL the client actually calls
(`client.normalise_url`: never the API key). A different endpoint, judge model, protocol, judge
prompt or answer is a different row, so scores of two endpoints never mix: a demo server that
echoes `gpt-4o` is not `gpt-4o` at api.openai.com. The endpoint is also stored with each row.

One shard per job. The workflow gives every job that judges its own file,
`<judge.cache>/<rule>/<job wildcards>.sqlite` (default `judge.cache`: `<results>/judge/cache`;
see `JUDGE_CACHE` in workflow/rules/common.smk): the job writes only that file and reads only that
file, so a rerun of a killed job resumes from what it had written. Why not one shared file: on a
cluster the jobs run on several hosts over NFS, where SQLite's file locks (POSIX fcntl) are not
reliable, so two writers, or a reader next to a writer, can corrupt the file or read a torn
page. Reading the other jobs' shards read-only would be safe only for shards whose writer has
finished, which a job cannot know; and it would rarely help, since each job judges its own
answers (one cell's generations, one screen shard's steered answers). With a single writer per
file, the default rollback journal (never WAL: it needs shared memory, which NFS lacks) keeps a
shard consistent across a SIGKILL.

Within a job, every write is one short transaction: `put` commits one row, `put_many` a batch of
rows (`INSERT OR REPLACE`, committed together or not at all). A commit costs an fsync (2 to 20 ms,
more than a judge reply takes the client), so the judge client batches what arrives within ~50 ms
into one `put_many` on a writer thread; a killed process loses at most the batch it had not yet
committed (see `blockem.judge.client`). Several processes on one file stay safe on a local disk
(a 60 s busy timeout serialises the writers), which the tests use; the workflow never does it.

One `JudgeCache` may be used from several threads (the client's writer thread and its caller): its
connection is shared under a lock.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    key         TEXT PRIMARY KEY,
    judge_model TEXT NOT NULL,
    endpoint    TEXT NULL,
    protocol    TEXT NOT NULL,
    question    TEXT NOT NULL,
    score       REAL NULL,
    status      TEXT NOT NULL,
    created     TEXT NOT NULL
)
"""
_CHUNK = 500  # keys per SELECT, under SQLite's bound-parameter limit
_INSERT = ("INSERT OR REPLACE INTO scores (key, judge_model, endpoint, protocol, question, score,"
           " status, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


def text_hash(s: str) -> str:
    """sha256 hex of a string (UTF-8)."""
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def cache_key(endpoint: str, judge_model: str, protocol: str, prompt_hash: str,
              answer_hash: str) -> str:
    """The cache key of one judgement: sha256 hex over its five parts (`endpoint`: the normalised
    base URL, `client.normalise_url`)."""
    return text_hash("\x1f".join((endpoint, judge_model, protocol, prompt_hash, answer_hash)))


class JudgeCache:
    """Scores by key, persisted in an SQLite file shared safely between processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, each statement is its own short transaction (put_many
        # opens one explicitly). check_same_thread=False: the client's writer thread shares the
        # connection, every use under self._lock.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                                   check_same_thread=False)
        with self._lock:
            self._db.execute(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(scores)")}
            if "endpoint" not in columns:  # a file of the older schema: its keys never match
                try:
                    self._db.execute("ALTER TABLE scores ADD COLUMN endpoint TEXT NULL")
                except sqlite3.OperationalError:  # another process added it first
                    pass

    def get_many(self, keys) -> dict[str, dict]:
        """{key: {"score", "status"}} for the keys that are cached (others are absent)."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, dict] = {}
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i:i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            with self._lock:
                rows = self._db.execute(
                    f"SELECT key, score, status FROM scores WHERE key IN ({marks})",
                    chunk).fetchall()
            for key, score, status in rows:
                out[key] = {"score": score, "status": status}
        return out

    def put(self, key: str, *, judge_model: str, protocol: str, question: str,
            score: float | None, status: str, endpoint: str | None = None) -> None:
        """Write one score now (one committed transaction)."""
        created = datetime.now(UTC).isoformat(timespec="seconds")
        with self._lock:
            self._db.execute(_INSERT, (key, judge_model, endpoint, protocol, question, score,
                                       status, created))

    def put_many(self, rows: Iterable[dict]) -> int:
        """Write many scores in one committed transaction (all or none); returns how many.
        Each row is a dict of `put`'s arguments (key, judge_model, protocol, question, score,
        status, optional endpoint)."""
        created = datetime.now(UTC).isoformat(timespec="seconds")
        values = [(r["key"], r["judge_model"], r.get("endpoint"), r["protocol"], r["question"],
                   r["score"], r["status"], created) for r in rows]
        if not values:
            return 0
        with self._lock:
            # IMMEDIATE: take the write lock up front (waiting up to the busy timeout), so the
            # transaction cannot fail half-way on a lock upgrade.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(_INSERT, values)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return len(values)

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
