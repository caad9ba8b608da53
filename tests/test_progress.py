"""Progress bars (blockem.progress): a moving tqdm bar on a terminal, a few plain lines in a log
file however many batches a stage runs, and always one final line with the totals.

Nothing here asserts how long anything took: a log file's line count is bounded by the default
interval (30 s) on runs of a few seconds, and the terminal test only needs its sleeps to pass."""

from __future__ import annotations

import copy
import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blockem import progress
from blockem.usage import USAGE_PREFIX

from conftest import REPO

FINAL = re.compile(r"^\[(?P<desc>[^\]]+)\] (?P<word>done|stopped) (?P<n>\d+)(?:/(?P<total>\d+))? "
                   r"(?P<unit>\w+) (?:in|after) \S+ \((?P<rate>[^)]*)\)(?: \| (?P<post>.*))?$")


@pytest.fixture(autouse=True)
def default_env(monkeypatch):
    monkeypatch.delenv(progress.ENV_ENABLED, raising=False)
    monkeypatch.delenv(progress.ENV_INTERVAL, raising=False)


def lines_of(text: str, desc: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"[{desc}] ")]


# --- the helper -------------------------------------------------------------------------------

def test_log_file_gets_only_the_final_line_with_totals_and_postfix():
    f = io.StringIO()  # not a terminal
    with progress.bar(1000, "demo", unit="step", file=f) as b:
        for i in range(1000):
            b.set_postfix(loss=f"{1 / (i + 1):.4f}", lr=1e-3)
            b.update(1)
    out = f.getvalue()
    assert "\r" not in out and out.endswith("\n")
    lines = out.splitlines()
    assert len(lines) == 1 and b.lines == 0, out
    m = FINAL.match(lines[0])
    assert m and m["desc"] == "demo" and m["word"] == "done" and (m["n"], m["total"]) == (
        "1000", "1000") and m["unit"] == "steps" and m["rate"].endswith("steps/s"), lines[0]
    assert m["post"] == "loss=0.0010, lr=0.001"


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv(progress.ENV_INTERVAL, "0")
    f = io.StringIO()
    with progress.bar(5, "demo", unit="batch", file=f) as b:
        for _ in range(5):
            b.set_postfix(tokens=7)
            b.update(1)
    lines = f.getvalue().splitlines()
    assert len(lines) == 6 and "\r" not in f.getvalue()  # one per update, then the final line
    assert lines[0].startswith("[demo] 1/5 batches (20%) in ") and "eta" in lines[0]
    assert lines[0].endswith(" | tokens=7")
    assert lines[4].startswith("[demo] 5/5 batches (100%)") and "eta" not in lines[4]
    assert FINAL.match(lines[5])["word"] == "done"
    for bad in ("soon", "-1"):
        monkeypatch.setenv(progress.ENV_INTERVAL, bad)
        with pytest.raises(ValueError, match=progress.ENV_INTERVAL):
            progress.bar(5, "demo", file=io.StringIO())


def test_disabled_keeps_only_the_final_line(monkeypatch):
    monkeypatch.setenv(progress.ENV_ENABLED, "0")
    monkeypatch.setenv(progress.ENV_INTERVAL, "0")
    f = io.StringIO()
    with progress.bar(4, "demo", file=f, tty=True) as b:  # not even a terminal bar
        b.update(4)
    lines = f.getvalue().splitlines()
    assert len(lines) == 1 and FINAL.match(lines[0])["n"] == "4" and "\r" not in f.getvalue()


def test_an_exception_ends_with_a_stopped_line_and_propagates():
    f = io.StringIO()
    with pytest.raises(KeyError):
        with progress.bar(10, "demo", unit="row", initial=2, file=f) as b:
            b.update(3)
            raise KeyError("x")
    m = FINAL.match(f.getvalue().strip())
    assert m["word"] == "stopped" and (m["n"], m["total"], m["unit"]) == ("5", "10", "rows")
    b.close()  # a second close prints nothing
    assert len(f.getvalue().splitlines()) == 1


def test_unknown_total_and_units():
    f = io.StringIO()
    with progress.bar(None, "demo", unit="batch", file=f) as b:
        b.update(3)
    m = FINAL.match(f.getvalue().strip())
    assert m["n"] == "3" and m["total"] is None and m["unit"] == "batches"
    assert progress.duration(5) == "5.0s" and progress.duration(330) == "5m30s"
    assert progress.duration(7500) == "2h05m"


SCRIPT = """
import sys, time
from blockem import progress
with progress.bar(8, "tty", unit="batch") as b:
    for i in range(8):
        time.sleep(0.15)  # > the terminal bar's redraw interval (0.1 s)
        b.set_postfix(loss=1.0 / (i + 1))
        b.update(1)
print("after", file=sys.stderr)
"""


def run_script(on_tty: bool) -> str:
    """SCRIPT's stderr, written to a pseudo-terminal or to a pipe (as to a log file)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(progress.ENV_INTERVAL, None)
    env.pop(progress.ENV_ENABLED, None)
    if not on_tty:
        return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                              text=True, timeout=120, check=True).stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    return b"".join(chunks).decode(errors="replace")


def test_a_terminal_sees_the_bar_move_a_log_file_does_not():
    tty, log = run_script(True), run_script(False)
    # the terminal: tqdm redraws the bar in place (\r) after every update, then erases it
    redraws = [s for s in tty.split("\r") if re.search(r"tty: +\d+%", s)]
    assert len(redraws) >= 6, repr(tty)
    assert any("8/8" in s for s in redraws) and any("loss=" in s for s in redraws)
    # erased (\r, blanks, \r), then the final line
    last = tty.replace("\r\n", "\n").split("\r")[-1]
    assert re.fullmatch(r"\[tty\] done 8/8 batches in \S+ \(.*\) \| loss=0\.125\nafter\n",
                        last), tty
    # the log file: no carriage return, one line (the final one) before the script's own line
    assert "\r" not in log
    lines = log.splitlines()
    assert len(lines) == 2 and FINAL.match(lines[0])["n"] == "8" and lines[1] == "after", log


# --- stages: short logs, final lines with the totals ------------------------------------------

def test_training_log_is_short_and_ends_with_totals(tmp_path, tiny_model, tokenizer, monkeypatch):
    from blockem.chat import encode_chats
    from blockem.train import TrainConfig, train

    from test_train import chats

    examples = encode_chats(tokenizer, chats(8))
    model = copy.deepcopy(tiny_model)
    cfg = TrainConfig(steps=60, batch_size=2, lr=1e-3, warmup_steps=2)
    with open(tmp_path / "job.log", "w") as f:
        monkeypatch.setattr(sys, "stderr", f)
        log = train(model, [(examples, 1.0)], cfg, pad_id=tokenizer.pad_token_id, name="t",
                    log_every=5)
        monkeypatch.undo()
    text = (tmp_path / "job.log").read_text()
    assert len(log) == 60 and "\r" not in text
    ours = lines_of(text, "t")
    assert 1 <= len(ours) <= 3, text  # 60 steps of a few ms: the default interval is 30 s
    m = FINAL.match(ours[-1])
    assert m and m["word"] == "done" and (m["n"], m["total"], m["unit"]) == ("60", "60", "steps")
    want = sum(r["sft_loss"] for r in log[-5:]) / 5  # the mean of the last log_every steps
    assert m["post"] == f"sft_loss={want:.4f}, lr={log[-1]['lr']:.2e}"


def test_generation_lines_every_interval(tmp_path, tiny_model, tokenizer, monkeypatch):
    from blockem.generate import generate_rows

    rows = [tokenizer("how should i invest my savings ?")["input_ids"]] * 24
    kw = dict(temperature=1.0, max_new_tokens=4, batch_size=2, seed=0, name="g")
    for interval, periodic in ((None, (0, 1, 2)), ("0", (12,))):  # 12 batches
        if interval is not None:
            monkeypatch.setenv(progress.ENV_INTERVAL, interval)
        path = tmp_path / f"gen-{interval}.log"
        with open(path, "w") as f:
            with monkeypatch.context() as m:
                m.setattr(sys, "stderr", f)
                answers = generate_rows(tiny_model, tokenizer, rows, **kw)
        ours = lines_of(path.read_text(), "g")
        assert len(answers) == 24 and len(ours) - 1 in periodic, ours
        final = FINAL.match(ours[-1])
        assert (final["n"], final["total"], final["unit"]) == ("24", "24", "answers")
        assert re.fullmatch(r"tokens=\d+", final["post"])
        if interval == "0":
            assert [re.match(r"\[g\] (\d+)/24 answers", s)[1] for s in ours[:-1]] == [
                str(2 * i) for i in range(1, 13)]


def test_stage_log_ends_with_the_usage_line(tmp_path, tiny_base, default_config):
    """A real `python -m blockem finetune` job, stderr to a file as Snakemake does: a few lines
    of progress (the final one with the totals) and the `[usage]` line last."""
    from blockem.config import stage_settings

    from test_train import chats

    s = stage_settings(copy.deepcopy(default_config), "finetune", "finance")
    s["train"].update(steps=40, batch_size=2, warmup_steps=2, lr=1e-3)
    s["compute"]["device"] = "cpu"
    rows = [{"domain": "finance", "messages": c} for c in chats()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    env = {k: v for k, v in os.environ.items()
           if k not in (progress.ENV_INTERVAL, progress.ENV_ENABLED)}
    env["BLOCKEM_FAIL_CELLS"] = ""
    log = tmp_path / "finetune.log"
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "blockem", "finetune", "--settings",
                            json.dumps(s), "--data", str(tmp_path / "data.parquet"), "--base",
                            str(tiny_base), "--domain", "finance", "--seed", "0", "--out",
                            str(tmp_path / "out"), "--threads", "1"],
                           cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=f, timeout=600,
                           check=False)
    text = log.read_text()
    assert r.returncode == 0, text[-3000:]
    lines = text.splitlines()
    assert lines[-1].startswith(USAGE_PREFIX) and "\r" not in text
    ours = [line for line in lines if line.startswith("[finetune ")]
    assert 1 <= len(ours) <= 3, text
    m = FINAL.match(ours[-1])
    assert m and (m["n"], m["total"], m["unit"]) == ("40", "40", "steps") and "loss=" in m["post"]
    assert json.loads(lines[-1][len(USAGE_PREFIX):])["trained_sequences"] == 80


def test_modules_stay_leaves():
    """blockem.progress imports nothing of blockem, and tqdm only for a terminal bar."""
    src = (REPO / "blockem" / "progress.py").read_text()
    assert "from blockem" not in src and "import blockem" not in src
    code = ("import sys, io; from blockem import progress; "
            "progress.bar(3, 'x', file=io.StringIO()).close(); print('tqdm' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True)
    assert r.stdout.strip() == "False"

