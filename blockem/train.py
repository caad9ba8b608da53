"""One supervised training loop for every stage (pretraining, instruct tuning, fine-tuning).

The loss is the mean cross-entropy over supervised tokens (labels != -100), as transformers
computes it. Batches are drawn from one or more pools of examples in fixed proportions
(`replay_fraction` mixes two), each pool walked in seeded random order, epoch after epoch.
Every step is logged (step, loss, lr) and progress is printed to stderr.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, fields

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

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in {**d, **overrides}.items() if k in names})


def pool_batches(pools: list[tuple[list[Example], float]], batch_size: int, seed: int):
    """Endless batches; pool i contributes round(batch_size * fraction_i) examples to each."""
    rng = random.Random(seed)
    sizes = [round(batch_size * f) for _, f in pools]
    sizes[0] += batch_size - sum(sizes)
    orders = [[] for _ in pools]
    while True:
        batch = []
        for i, ((examples, _), k) in enumerate(zip(pools, sizes)):
            for _ in range(k):
                if not orders[i]:
                    orders[i] = list(range(len(examples)))
                    rng.shuffle(orders[i])
                batch.append(examples[orders[i].pop()])
        yield batch


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, pools, cfg: TrainConfig, *, pad_id: int, device: str = "cpu", name: str = "train",
          log_every: int = 50) -> list[dict]:
    """Train `model` in place on its trainable parameters; returns the per-step log rows."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    batches = pool_batches(pools, cfg.batch_size, cfg.seed)
    model.train()
    log, t0 = [], time.time()
    for step in range(cfg.steps):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = {k: v.to(device) for k, v in collate(next(batches), pad_id).items()}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.append({"step": step + 1, "loss": float(loss.detach()), "lr": lr})
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            recent = sum(r["loss"] for r in log[-log_every:]) / len(log[-log_every:])
            rate = (step + 1) / (time.time() - t0)
            print(f"[{name}] step {step + 1}/{cfg.steps} loss {recent:.4f} lr {lr:.2e} "
                  f"({rate:.1f} steps/s)", file=sys.stderr, flush=True)
    model.eval()
    return log
