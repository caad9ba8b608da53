"""What a blocking method is: one frozen `Method` record per method (one module each under
`blockem/methods/`), and the `TrainContext` a method's training hooks receive.

A `Method` says everything the pipeline needs to know about a method, so adding one is adding a
module: what it blocks (`needs`, `latent_set`, `derive`), what the grid's `lambdas` mean
(`strength`), whether strength 0 is the plain fine-tune (`sft_at_zero`), which extra grid-entry
keys it accepts (`grid_fields`) and how it changes training (`objective`, `freeze_above`,
`multi_epoch`, and the optional `hook` / `pools` callables), what it checks of a grid entry and
what extra settings its runs carry (`check`, `run_settings`, given a `ConfigView`). The config
schema's method enum, the config checks, the grid expansion (`blockem.grid`), the training stage
(`blockem.block`), the figures and the CLI all read the registry (`blockem.methods.REGISTRY`).

A leaf module: it imports nothing from blockem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

# what a method needs besides the fine-tuning data
NEEDS = ("latents", "direction", "nothing", "aligned_data")
# the loss a method trains with: SFT + lam * L_block, SFT + lam * KL(p_model || p_base), plain SFT
OBJECTIVES = ("block", "kl", "sft")
# what the grid's `lambdas` of a method are
STRENGTHS = ("lambda", "alpha", "fraction")

Pairs = list[tuple[int, int]]  # (latent, sign) of a latent set, best first


@dataclass
class TrainContext:
    """One training run of the block stage (one grid run), as a method's `hook` and `pools` see
    it. Built by `blockem.block.train_stage` after the model, data and objective are ready."""

    model: Any  # the model being trained (PEFT LoRA or full), on `device`
    tokenizer: Any  # its HF tokenizer (with chat template)
    examples: list  # the domain's training chats, encoded (`blockem.chat.encode_chats`)
    rows: list[dict]  # the same chats as read from the data file ({"messages": [...], ...})
    target: dict | None  # the blocking target (`blockem.block.target_doc`); None if needs nothing
    sae: Any  # the SAE the target's latents are read with; None (direction, kl, empty target)
    lam: float  # the grid strength of this run (see `Method.strength`)
    settings: dict  # the block stage settings (train, model, compute, block: method, lam, ...)
    device: str
    seed: int  # the run's fine-tune seed
    inputs: dict[str, Path] = field(default_factory=dict)  # extra input files by name


@dataclass(frozen=True)
class ConfigView:
    """What a method's `check` and `run_settings` see of the config (built by `blockem.config`:
    this module imports nothing from blockem, so methods never read the config's layout)."""

    toy: bool  # the toy organism (model.source toy), not a real model
    world: dict | None  # the toy world's config (`world`); None for a real model
    batch_size: dict[str, int]  # the fine-tune batch size of each domain the entry / run trains


@dataclass(frozen=True)
class Method:
    """A blocking method (or baseline) of the grid: `block.grid[].method: <name>`."""

    name: str  # grid `method`, run-id prefix, `method` column of summary.parquet
    label: str  # legend / table label
    color: str  # matplotlib colour of its curves
    doc: str  # one line: what the method is
    # "latents": a discovered latent set; "direction": the mean-difference direction at layer L;
    # "nothing": no target (kl); "aligned_data": aligned chats (`mix`: TrainContext.inputs
    # ["aligned"], the toy's instruct set or a real config's data.aligned)
    needs: str = "latents"
    # which discovery set the target comes from: "main" (discovery.select.rule), a rule name
    # ("random", "topdelta": must be in discovery.select.extra_rules), None (needs no set)
    latent_set: str | None = "main"
    # (latent, sign) pairs of the set (already cut to the grid's size) + block.seed -> the pairs
    # to block; None: the set as it is. A method with `derive` gets a target of its own, named
    # after it (`<key>-<rule>-<name>`)
    derive: Callable[[Pairs, int], Pairs] | None = None
    strength: str = "lambda"  # what the grid's `lambdas` are
    # those strengths in a few words (config/README.md's table); None: the kind's usual words
    strength_doc: str | None = None
    sft_at_zero: bool = True  # strength 0 is the plain `sft` cell, not a run of its own
    grid_fields: tuple[str, ...] = ()  # grid-entry keys it accepts beyond the common ones
    objective: str = "block"  # one of OBJECTIVES
    freeze_above: bool = False  # train only decoder layers <= the target's layer
    multi_epoch: bool = False  # epochs x finetune.steps steps, an adapter per epoch (grid `epochs`)
    # a context manager active during training only (e.g. a steering hook), or None
    hook: Callable[[TrainContext], ContextManager] | None = None
    # the training pools [(examples, fraction)] (a data transform), or None: [(ctx.examples, 1.0)]
    pools: Callable[[TrainContext], list[tuple[list, float]]] | None = None
    # check(entry, view): raise ValueError (its message says what is wrong) for a grid entry the
    # method cannot run, e.g. a strength out of its range; blockem.config names the entry. None:
    # nothing beyond the common checks
    check: Callable[[dict, ConfigView], None] | None = None
    # run_settings(options, view) -> the extra block-stage settings of one of its runs, stored as
    # settings[<name>] (so they are in its settings hash, and only its runs change); `options`:
    # the run's values of its grid_fields (`blockem.grid.block_runs`). None: no extra settings
    run_settings: Callable[[dict, ConfigView], dict] | None = None

    def __post_init__(self):
        for attr, allowed in (("needs", NEEDS), ("objective", OBJECTIVES),
                              ("strength", STRENGTHS)):
            if getattr(self, attr) not in allowed:
                raise ValueError(f"method {self.name!r}: {attr} {getattr(self, attr)!r} is not "
                                 f"one of {allowed}")
        if (self.latent_set is None) == (self.needs in ("latents", "direction")):
            raise ValueError(f"method {self.name!r}: latent_set must be set exactly when it "
                             f"needs latents or the direction")

    @property
    def blocks(self) -> bool:
        """Whether the method has a blocking target (latents or the direction)."""
        return self.needs in ("latents", "direction")


def check_strengths(entry: dict, top: float, what: str, *, top_open: bool = False) -> None:
    """A ValueError unless every strength of a grid entry (`lambdas`, all >= 0 by the schema) is
    at most `top` (below it with `top_open`); `what` says what the strength is."""
    bad = [x for x in entry["lambdas"] if (x >= top if top_open else x > top)]
    if bad:
        rng = f"[0, {top:g})" if top_open else f"[0, {top:g}]"
        raise ValueError(f"strength {bad[0]:g} is out of range: its lambdas are {what}, in {rng}")
