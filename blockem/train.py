"""One supervised training loop for every stage (pretraining, instruct tuning, fine-tuning).

The loss is the mean cross-entropy over supervised tokens (labels != -100), as transformers
computes it. Batches are drawn from one or more pools of examples in fixed proportions
(`replay_fraction` mixes two), each pool walked in seeded random order, epoch after epoch.

An `objective` (default: plain SFT) turns a micro-batch into a loss and named terms; BLOCK-EM
(`blockem.objectives.BlockObjective`) adds its penalty this way. With `grad_accum` > 1 a step's
batch is split into micro-batches and every term is normalised by the token count of the *whole*
batch, so accumulated gradients equal the full-batch gradient. Every step is logged (step, each term, lr);
progress goes to stderr as a `blockem.progress` bar whose postfix holds each term averaged over the
last `log_every` steps and the lr (a log file gets a line every BLOCKEM_PROGRESS_INTERVAL s and a
final line with the totals).

Preemption: with a `Checkpoint`, training writes its whole state (trainable parameters or adapter,
optimizer, the batch sampler's order and RNG, every RNG, the step, the log rows so far and the
caller's `extra`, e.g. the epochs saved) to `<output>.ckpt/state.pt` every `every` optimizer steps,
atomically, and resumes from it when a later run of the same stage finds it ("resuming from step
k"). The LR schedule is a function of the step, so it needs no state of its own. A checkpoint is
tied to a key (the hash of the stage's settings, seed and inputs); one made under another key is
ignored with a message and removed. SIGTERM (a preemption, SLURM's warning before SIGKILL) makes
the loop write a checkpoint at the next step boundary and exit with status 143. A resumed run
takes the same steps on the same batches from the same state, so on CPU it ends bitwise equal to
an uninterrupted one (tests/test_train.py).
"""

from __future__ import annotations

import math
import random
import signal
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from blockem import progress, usage
from blockem.chat import Example, collate


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (config keys `pretrain`, `base`, `finetune.default`)."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    seed: int = 0
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size must divide evenly)

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in {**d, **overrides}.items() if k in names})


class PoolBatches:
    """Endless batches; pool i contributes round(batch_size * fraction_i) examples to each, each
    pool walked in a seeded random order, epoch after epoch. Its position (`state_dict`) is part
    of a training checkpoint."""

    def __init__(self, pools: list[tuple[list[Example], float]], batch_size: int, seed: int):
        self.pools = pools
        self.rng = random.Random(seed)
        self.sizes = [round(batch_size * f) for _, f in pools]
        self.sizes[0] += batch_size - sum(self.sizes)
        self.orders: list[list[int]] = [[] for _ in pools]

    def __iter__(self):
        return self

    def __next__(self) -> list[Example]:
        batch = []
        for i, ((examples, _), k) in enumerate(zip(self.pools, self.sizes)):
            for _ in range(k):
                if not self.orders[i]:
                    self.orders[i] = list(range(len(examples)))
                    self.rng.shuffle(self.orders[i])
                batch.append(examples[self.orders[i].pop()])
        return batch

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "orders": [list(o) for o in self.orders],
                "pool_sizes": [len(e) for e, _ in self.pools]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["pool_sizes"]) != [len(e) for e, _ in self.pools]:
            raise ValueError(f"batch sampler state is for pools of {list(state['pool_sizes'])} "
                             f"examples, not {[len(e) for e, _ in self.pools]}")
        version, internal, gauss = state["rng"]
        self.rng.setstate((int(version), tuple(int(x) for x in internal), gauss))
        self.orders = [[int(x) for x in o] for o in state["orders"]]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def supervised_counts(labels) -> dict:
    """Token counts that normalise each loss over a whole (accumulated) batch: `predicting` =
    positions whose next token is supervised (what the shifted SFT loss averages over), `response`
    = the supervised tokens themselves."""
    sup = labels != -100
    return {"predicting": int(sup[:, 1:].sum()), "response": int(sup.sum())}


def sft_loss(logits, labels, n_items):
    """Summed next-token cross-entropy over supervised tokens / n_items (transformers' rule)."""
    import torch.nn.functional as F

    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                         ignore_index=-100, reduction="sum")
    return ce / max(1, n_items)


class SFTObjective:
    """Plain supervised fine-tuning: (loss, {"sft_loss": loss})."""

    def __call__(self, model, batch, examples, counts):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = sft_loss(out.logits, batch["labels"], counts["predicting"])
        return loss, {"sft_loss": loss}


def _plain(model, batch, examples, counts):
    loss = model(**batch).loss  # transformers' own mean: bitwise what earlier runs trained with
    return loss, {"sft_loss": loss}


# --- checkpoints ------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 1
PREEMPTED_STATUS = 143  # 128 + SIGTERM, what a process killed by SIGTERM reports


class TrainingPreempted(SystemExit):
    """SIGTERM during training: a checkpoint was written; rerun the stage to resume."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_STATUS)
        self.message = message

    def __str__(self) -> str:
        return self.message


def checkpoint_key(stage: str, settings, seed, inputs=()) -> str:
    """What a checkpoint is valid for: the stage, its settings, seed and input files."""
    from blockem.hashing import input_fingerprint, settings_hash

    return settings_hash({"stage": stage, "settings": settings, "seed": seed,
                          "inputs": input_fingerprint(inputs)})


class Checkpoint:
    """The resumable state of one training output, in `<out>.ckpt/state.pt`.

    `every`: optimizer steps between checkpoints (0: only on SIGTERM; None: compute.checkpoint_every
    from `$BLOCKEM_CHECKPOINT_EVERY`). `extra`: JSON-able state of the caller saved with it (the
    block `epochs` method records the epochs whose adapters it saved); `accept(extra)` may refuse
    a checkpoint whose side files are missing (it is then ignored like one of other settings)."""

    def __init__(self, out: str | Path, key: str, every: int | None = None, accept=None):
        from blockem.io import checkpoint_dir
        from blockem.runtime import checkpoint_every

        self.dir = checkpoint_dir(out)
        self.file = self.dir / "state.pt"
        self.key = key
        self.every = checkpoint_every() if every is None else int(every)
        self.accept = accept
        self.extra: dict = {}

    def load(self, name: str = "train"):
        """The saved state if it matches this run's key, else None (a mismatch is reported and
        the stale directory removed)."""
        import torch

        if not self.file.exists():
            if self.dir.exists():  # side files without a state (killed before the first one)
                self.discard()
            return None
        try:
            state = torch.load(self.file, map_location="cpu", weights_only=True)
            ok = state.get("format") == CHECKPOINT_FORMAT
        except Exception as e:  # noqa: BLE001 - any unreadable file is ignored, not trusted
            state, ok = None, False
            why = f"unreadable ({type(e).__name__})"
        else:
            why = "of another format"
        if ok and state["key"] != self.key:
            ok = False
            why = (f"made with other settings or inputs (key {state['key']}, this run "
                   f"{self.key})")
        if ok and self.accept is not None and not self.accept(state.get("extra", {})):
            ok, why = False, "incomplete (its side files are missing)"
        if not ok:
            print(f"[{name}] ignoring checkpoint {self.file}: {why}; starting from step 0",
                  file=sys.stderr, flush=True)
            self.discard()
            return None
        return state

    def save(self, state: dict) -> None:
        import torch

        from blockem.io import atomic_path

        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.file) as tmp:
            torch.save({"format": CHECKPOINT_FORMAT, "key": self.key, **state}, tmp)

    def discard(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def rng_state() -> dict:
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    out = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state(),
           "numpy": {"key": [int(x) for x in np_state["state"]["key"]],
                     "pos": int(np_state["state"]["pos"]),
                     "has_gauss": int(np_state["has_gauss"]),
                     "gauss": float(np_state["gauss"])}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np.array(n["key"], dtype=np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _SigtermFlag:
    """While active, SIGTERM sets a flag (checked at each step boundary) instead of killing."""

    def __init__(self, active: bool = True):
        self.active, self.raised, self._previous = active, False, None

    def __enter__(self):
        if not self.active:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: SIGTERM keeps its default action
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def train(model, pools, cfg: TrainConfig, *, pad_id: int, device: str = "cpu", name: str = "train",
          log_every: int = 50, objective=None, on_step=None,
          checkpoint: Checkpoint | None = None) -> list[dict]:
    """Train `model` in place on its trainable parameters; returns the per-step log rows.

    `objective(model, batch, examples, counts) -> (loss, terms)`; `on_step(step)` runs after each
    optimizer step (per-epoch adapters), before that step's checkpoint. With `checkpoint` the run
    resumes from a matching checkpoint, writes one every `checkpoint.every` steps and on SIGTERM
    (then raises TrainingPreempted)."""
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    batches = PoolBatches(pools, cfg.batch_size, cfg.seed)
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of grad_accum "
                         f"{cfg.grad_accum}")
    if objective is None:
        objective = _plain if cfg.grad_accum == 1 else SFTObjective()
    micro = cfg.batch_size // cfg.grad_accum
    log: list[dict] = []
    start = 0
    state = checkpoint.load(name) if checkpoint is not None else None
    if state is not None:
        saved = state["params"]
        if sorted(saved) != sorted(n for n, _ in named) or any(
                saved[n].shape != p.shape for n, p in named):
            print(f"[{name}] ignoring checkpoint {checkpoint.file}: its parameters do not match "
                  f"the model; starting from step 0", file=sys.stderr, flush=True)
            checkpoint.discard()
        else:
            with torch.no_grad():
                for n, p in named:
                    p.copy_(saved[n])
            opt.load_state_dict(state["optimizer"])
            batches.load_state_dict(state["sampler"])
            set_rng_state(state["rng"])
            log, start = list(state["log"]), int(state["step"])
            checkpoint.extra = dict(state.get("extra", {}))
            print(f"[{name}] resuming from step {start}/{cfg.steps} ({checkpoint.file})",
                  file=sys.stderr, flush=True)

    def save(step: int) -> None:
        checkpoint.save({
            "step": step, "params": {n: p.detach().cpu() for n, p in named},
            "optimizer": opt.state_dict(), "sampler": batches.state_dict(), "rng": rng_state(),
            "log": log, "extra": checkpoint.extra})
        bar.write(f"[{name}] checkpoint at step {step}/{cfg.steps} -> {checkpoint.file}")

    model.train()
    # the bar's postfix: each logged term averaged over the last `log_every` steps, and the lr
    with _SigtermFlag(active=checkpoint is not None) as sigterm, \
            progress.bar(cfg.steps, name, unit="step", initial=start) as bar:
        for step in range(start, cfg.steps):
            _step(model, opt, params, batches, objective, cfg, step, micro, pad_id, device, log)
            done = step + 1
            recent = log[-log_every:]
            bar.set_postfix({k: f"{sum(r[k] for r in recent) / len(recent):.4f}"
                             for k in log[-1] if k not in ("step", "lr")},
                            lr=f"{log[-1]['lr']:.2e}")
            bar.update(1)
            if on_step is not None:
                on_step(done)
            if checkpoint is None:
                continue
            if sigterm.raised:
                save(done)
                msg = (f"[{name}] SIGTERM: stopped at step {done}/{cfg.steps}, checkpoint "
                       f"{checkpoint.file}; run the stage again to resume")
                bar.write(msg)
                raise TrainingPreempted(msg)
            if checkpoint.every and done % checkpoint.every == 0 and done < cfg.steps:
                save(done)
    model.eval()
    return log


def _step(model, opt, params, batches, objective, cfg, step, micro, pad_id, device, log) -> None:
    """One optimizer step (its log row appended to `log`)."""
    import torch

    lr = lr_at(step, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    examples = next(batches)
    chunks = [examples[i:i + micro] for i in range(0, len(examples), micro)]
    tensors = [{k: v.to(device) for k, v in collate(c, pad_id).items()} for c in chunks]
    counts = {k: sum(supervised_counts(t["labels"])[k] for t in tensors)
              for k in ("predicting", "response")}
    usage.add(trained_sequences=len(examples),
              trained_tokens=sum(int(t["attention_mask"].sum()) for t in tensors))
    opt.zero_grad(set_to_none=True)
    terms: dict[str, float] = {}
    for chunk, batch in zip(chunks, tensors):
        loss, parts = objective(model, batch, chunk, counts)
        loss.backward()
        for k, v in parts.items():
            terms[k] = terms.get(k, 0.0) + float(v.detach())
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    log.append({"step": step + 1, **terms, "lr": lr})
