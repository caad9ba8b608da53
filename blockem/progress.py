"""Progress of long loops (a leaf module: the standard library, and tqdm imported lazily).

Every long stage (training, generation, SAE training and activation collection, judging, MC
scoring, latent contexts, the activation shift; the screen and calibration through generation,
judging and MC scoring) counts its work with one helper:

    with progress.bar(total, "finetune s0", unit="step") as b:
        for ...:
            b.set_postfix(loss=f"{loss:.4f}")
            b.update(1)

- stderr is a terminal: a tqdm bar redrawn at most every `TTY_INTERVAL` s, erased when done;
- stderr is a file (a Snakemake or SLURM log): no carriage returns, one plain line at most every
  `BLOCKEM_PROGRESS_INTERVAL` seconds (default `FILE_INTERVAL`), e.g.

      [finetune s0] 120/1000 steps (12%) in 45.0s, 2.67 steps/s, eta 5m30s | loss=2.3456

  so a log stays a few lines long however many batches a stage runs (tqdm itself is not used
  there: in a file its carriage-return redraws and padding make one ever-growing line);
- always, when the loop ends, one final line with the totals, elapsed time and last postfix:

      [finetune s0] done 1000/1000 steps in 6m10s (2.70 steps/s) | loss=2.1034

  (`stopped` instead of `done` when the loop ended by an exception). A stage prints its final
  lines before `blockem.__main__` prints the `[usage]` line, which stays the log's last.

`BLOCKEM_PROGRESS=0` turns the bars and periodic lines off; the final line is still printed (it
carries the numbers the logs have always had: losses, rates, counts). Messages printed while a bar
is open go through `Bar.write` (on a terminal, tqdm.write: above the bar, not through it).
"""

from __future__ import annotations

import os
import sys
import time

ENV_ENABLED = "BLOCKEM_PROGRESS"
ENV_INTERVAL = "BLOCKEM_PROGRESS_INTERVAL"
TTY_INTERVAL = 0.1   # seconds between redraws of a terminal bar
FILE_INTERVAL = 30.0  # seconds between progress lines in a log file (default)


def enabled() -> bool:
    """False when BLOCKEM_PROGRESS is 0/false/no/off: no bar, no periodic lines."""
    return os.environ.get(ENV_ENABLED, "1").strip().lower() not in ("0", "false", "no", "off")


def file_interval() -> float:
    """Seconds between progress lines when stderr is not a terminal (BLOCKEM_PROGRESS_INTERVAL)."""
    raw = os.environ.get(ENV_INTERVAL, "").strip()
    if not raw:
        return FILE_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_INTERVAL}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"{ENV_INTERVAL}={raw!r} is negative")
    return value


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def duration(seconds: float) -> str:
    """12.3s, 5m30s, 2h05m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def plural(unit: str) -> str:
    """step -> steps, batch -> batches."""
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def _rate(done: float, seconds: float, unit: str) -> str:
    if done <= 0 or seconds <= 0:
        return f"- {plural(unit)}/s"
    r = done / seconds
    if r >= 100:
        return f"{r:.0f} {plural(unit)}/s"
    return f"{r:.3g} {plural(unit)}/s" if r >= 1 else f"{1 / r:.3g} s/{unit}"


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Bar:
    """A tqdm-like counter: `update(n)`, `set_postfix(**values)`, `write(msg)`, `close()`, and a
    context manager (closing on exit; `stopped` when the block raised). See the module doc."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, initial: int = 0,
                 file=None, tty: bool | None = None, interval: float | None = None):
        self.total = None if total is None else int(total)
        self.desc, self.unit = desc, unit
        self.n = self.start = int(initial)
        self.file = file if file is not None else sys.stderr
        self.tty = _isatty(self.file) if tty is None else bool(tty)
        self.postfix: dict[str, str] = {}
        self.closed = False
        self.t0 = self._last = time.monotonic()
        self.lines = 0  # periodic lines written (not the final one)
        self._tqdm = None
        self._every = None  # seconds between periodic lines, None: none
        if not enabled():
            return
        if self.tty:
            from tqdm import tqdm

            self._tqdm = tqdm(total=self.total, desc=desc, unit=unit, initial=self.start,
                              file=self.file, mininterval=TTY_INTERVAL, leave=False,
                              dynamic_ncols=True)
        else:
            self._every = file_interval() if interval is None else float(interval)

    # --- counting ---

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        elif self._every is not None:
            now = time.monotonic()
            if now - self._last >= self._every:
                self._last = now
                self.lines += 1
                self._print(self._line(now))

    def set_postfix(self, values: dict | None = None, **kw) -> None:
        """Values shown after the counts (bar, periodic and final lines); replaces the last ones."""
        self.postfix = {k: _value(v) for k, v in {**(values or {}), **kw}.items()}
        if self._tqdm is not None:
            self._tqdm.set_postfix(self.postfix, refresh=False)

    def write(self, msg: str) -> None:
        """A message line that does not break the bar (tqdm.write on a terminal)."""
        if self._tqdm is not None:
            self._tqdm.write(msg, file=self.file)
            self.file.flush()
        else:
            self._print(msg)

    # --- lines ---

    def _counts(self) -> str:
        if self.total is None:
            return f"{self.n} {plural(self.unit)}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        return f"{self.n}/{self.total} {plural(self.unit)}{pct}"

    def _tail(self) -> str:
        return (" | " + ", ".join(f"{k}={v}" for k, v in self.postfix.items())
                if self.postfix else "")

    def _line(self, now: float) -> str:
        elapsed, done = now - self.t0, self.n - self.start
        eta = ""
        if self.total is not None and done > 0 and self.n < self.total:
            eta = f", eta {duration(elapsed / done * (self.total - self.n))}"
        return (f"[{self.desc}] {self._counts()} in {duration(elapsed)}, "
                f"{_rate(done, elapsed, self.unit)}{eta}{self._tail()}")

    def final_line(self, ok: bool = True) -> str:
        elapsed = time.monotonic() - self.t0
        counts = (f"{self.n} {plural(self.unit)}" if self.total is None
                  else f"{self.n}/{self.total} {plural(self.unit)}")
        word, prep = ("done", "in") if ok else ("stopped", "after")
        return (f"[{self.desc}] {word} {counts} {prep} {duration(elapsed)} "
                f"({_rate(self.n - self.start, elapsed, self.unit)}){self._tail()}")

    def _print(self, line: str) -> None:
        print(line, file=self.file, flush=True)

    def close(self, ok: bool = True) -> None:
        """Erase the bar (terminal) and print the final line; a second call does nothing."""
        if self.closed:
            return
        self.closed = True
        if self._tqdm is not None:
            self._tqdm.close()
        self._print(self.final_line(ok))

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def bar(total: int | None, desc: str, unit: str = "it", **kw) -> Bar:
    """A progress bar over `total` units (None: unknown); see `Bar` and the module doc."""
    return Bar(total, desc, unit, **kw)
