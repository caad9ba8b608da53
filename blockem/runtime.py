"""Run-time switches: how a job runs, never what it writes (a leaf module).

`compute.checkpoint_every` and `faults.fail_cells` are in no stage's settings (no hash, no
Snakemake params: editing them reruns nothing). The workflow exports them to every job as
environment variables (`runtime_env`, called by workflow/rules/common.smk); a stage run by hand
reads the same variables (`checkpoint_every`, `check_injected_failure`).
"""

from __future__ import annotations

import os

from blockem.errors import ConfigError

CHECKPOINT_ENV = "BLOCKEM_CHECKPOINT_EVERY"
FAIL_CELLS_ENV = "BLOCKEM_FAIL_CELLS"
DEFAULT_CHECKPOINT_EVERY = 100


class InjectedFailure(ValueError):
    """The deliberate failure of a cell named in `faults.fail_cells` (a testing aid)."""


def runtime_env(cfg: dict) -> dict[str, str]:
    """Environment variables that carry the config's run-time switches to every job."""
    every = cfg.get("compute", {}).get("checkpoint_every", DEFAULT_CHECKPOINT_EVERY)
    cells = (cfg.get("faults") or {}).get("fail_cells") or []
    return {CHECKPOINT_ENV: str(every), FAIL_CELLS_ENV: ",".join(cells)}


def checkpoint_every() -> int:
    """Optimizer steps between resumable training checkpoints (0: none; a SIGTERM still writes
    one): `$BLOCKEM_CHECKPOINT_EVERY`, default 100."""
    raw = os.environ.get(CHECKPOINT_ENV, "").strip()
    if not raw:
        return DEFAULT_CHECKPOINT_EVERY
    try:
        every = int(raw)
    except ValueError:
        every = -1
    if every < 0:
        raise ConfigError(f"environment variable {CHECKPOINT_ENV}={raw!r}: expected an integer "
                          f">= 0 (compute.checkpoint_every)")
    return every


def check_injected_failure(cell: str) -> None:
    """Raise InjectedFailure if `cell` is named in `faults.fail_cells` (`$BLOCKEM_FAIL_CELLS`)."""
    cells = {c.strip() for c in os.environ.get(FAIL_CELLS_ENV, "").split(",") if c.strip()}
    if cell in cells:
        raise InjectedFailure(f"injected failure for cell {cell} (faults.fail_cells)")
