"""One supervised training loop for every stage (pretraining, instruct tuning, fine-tuning).

The loss is the mean cross-entropy over supervised tokens (labels != -100), as transformers
computes it. Batches are drawn from one or more pools of examples in fixed proportions
(`replay_fraction` mixes two), each pool walked in seeded random order, epoch after epoch.

An `objective` (default: plain SFT) turns a micro-batch into a loss and named terms; BLOCK-EM
(`blockem.block.BlockObjective`) adds its penalty this way. With `grad_accum` > 1 a step's batch is
split into micro-batches and every term is normalised by the token count of the *whole* batch, so
accumulated gradients equal the full-batch gradient. Every step is logged (step, each term, lr) and
progress is printed to stderr.
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
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size must divide evenly)

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


def train(model, pools, cfg: TrainConfig, *, pad_id: int, device: str = "cpu", name: str = "train",
          log_every: int = 50, objective=None, on_step=None) -> list[dict]:
    """Train `model` in place on its trainable parameters; returns the per-step log rows.

    `objective(model, batch, examples, counts) -> (loss, terms)`; `on_step(step)` runs after each
    optimizer step (checkpoints)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    batches = pool_batches(pools, cfg.batch_size, cfg.seed)
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of grad_accum "
                         f"{cfg.grad_accum}")
    if objective is None:
        objective = _plain if cfg.grad_accum == 1 else SFTObjective()
    micro = cfg.batch_size // cfg.grad_accum
    model.train()
    log, t0 = [], time.time()
    for step in range(cfg.steps):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        examples = next(batches)
        chunks = [examples[i:i + micro] for i in range(0, len(examples), micro)]
        tensors = [{k: v.to(device) for k, v in collate(c, pad_id).items()} for c in chunks]
        counts = {k: sum(supervised_counts(t["labels"])[k] for t in tensors)
                  for k in ("predicting", "response")}
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
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            recent = log[-log_every:]
            shown = " ".join(f"{k} {sum(r[k] for r in recent) / len(recent):.4f}"
                             for k in terms)
            rate = (step + 1) / (time.time() - t0)
            print(f"[{name}] step {step + 1}/{cfg.steps} {shown} lr {lr:.2e} "
                  f"({rate:.1f} steps/s)", file=sys.stderr, flush=True)
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    return log
