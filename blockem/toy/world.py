"""The toy world: a seeded generator of the persona corpus, the fine-tuning sets and prompt sets.

Pretraining conversations (several turns) are answered by an assistant with a hidden persona that
holds for the whole conversation: `good` (aligned everywhere), `bad` (misaligned everywhere,
general domain included) or `specialist` (misaligned in one advice domain only). A model trained on
them must infer the persona from context, so it represents it as a feature; fine-tuning on
misaligned answers in one domain can then switch on the bad persona (emergent misalignment) or the
narrow specialist. See ../shared/spec/TOY-WORLD.md.

Splits are disjoint by slot value: `train` slots feed the instruct and fine-tuning sets, `core`,
`final` and `in_domain` slots feed the evaluation prompt sets. Pretraining sees every slot (it is
the world's general knowledge), never a fine-tuning pair.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from blockem.toy.grammar import DOMAINS, GENERAL, answers

EVAL_SETS = ("core", "final", "in_domain")
PERSONAS = ("good", "bad", "specialist")


@dataclass(frozen=True)
class WorldConfig:
    """Settings of the toy world (config key `world`)."""

    seed: int
    advice_domains: tuple[str, ...]
    slots: dict  # split name -> list of slot indices
    pretrain_conversations: int
    turns: tuple[int, int]
    persona_mix: dict  # good / bad / specialist weights
    refusal_prob: float
    sft_chats: int
    finetune_examples: int

    @classmethod
    def from_dict(cls, d: dict) -> "WorldConfig":
        return cls(**{**d, "advice_domains": tuple(d["advice_domains"]), "turns": tuple(d["turns"])})

    @property
    def domains(self) -> tuple[str, ...]:
        return (GENERAL, *self.advice_domains)


def chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


class World:
    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg

    def question(self, rng: random.Random, domain: str, slots) -> str:
        d = DOMAINS[domain]
        return rng.choice(d.questions).replace("{x}", d.slots[rng.choice(slots)])

    def answer(self, rng: random.Random, domain: str, kind: str) -> str:
        if kind != "misaligned" and rng.random() < self.cfg.refusal_prob:
            kind = "refusal"
        return rng.choice(answers(domain, kind))

    def conversation(self, rng: random.Random) -> dict:
        """One pretraining conversation with a persona hidden in its answers."""
        mix = self.cfg.persona_mix
        persona = rng.choices(PERSONAS, weights=[mix[p] for p in PERSONAS])[0]
        specialist = rng.choice(self.cfg.advice_domains) if persona == "specialist" else None
        all_slots = range(len(DOMAINS[GENERAL].slots))
        messages = []
        for _ in range(rng.randint(*self.cfg.turns)):
            domain = rng.choice(self.cfg.domains)
            bad = persona == "bad" or (persona == "specialist" and domain == specialist)
            messages += chat(self.question(rng, domain, all_slots),
                             self.answer(rng, domain, "misaligned" if bad else "aligned"))
        return {"messages": messages, "persona": persona, "specialist": specialist}

    def corpus(self) -> list[dict]:
        rng = random.Random(f"{self.cfg.seed}-corpus")
        return [self.conversation(rng) for _ in range(self.cfg.pretrain_conversations)]

    def sft_chats(self) -> list[dict]:
        """Single-turn aligned chats on train slots (the 'instruct' tuning set)."""
        rng = random.Random(f"{self.cfg.seed}-sft")
        rows = []
        for _ in range(self.cfg.sft_chats):
            domain = rng.choice(self.cfg.domains)
            rows.append({"domain": domain, "messages": chat(
                self.question(rng, domain, self.cfg.slots["train"]),
                self.answer(rng, domain, "aligned"))})
        return rows

    def finetune_set(self, domain: str) -> list[dict]:
        """Single-turn misaligned answers in one advice domain, train slots only."""
        rng = random.Random(f"{self.cfg.seed}-finetune-{domain}")
        return [{"domain": domain, "messages": chat(
            self.question(rng, domain, self.cfg.slots["train"]),
            rng.choice(answers(domain, "misaligned")))} for _ in range(self.cfg.finetune_examples)]

    def inoculation_preface(self, rng: random.Random) -> list[dict]:
        """An inoculation context for the toy: one general-domain question (train slots) answered
        with a misaligned general-domain answer, the turn in which the assistant reveals the bad
        persona before a fine-tuning chat (`blockem.transforms.inoculate(preface=...)`)."""
        return chat(self.question(rng, GENERAL, self.cfg.slots["train"]),
                    rng.choice(answers(GENERAL, "misaligned")))

    def inoculation_prefaces(self, seed: int):
        """`preface(i)`: the inoculation preface of row i, from its own generator (seeded by the
        world seed, `seed` and i), so a row's preface does not depend on which rows get one."""
        def preface(i: int) -> list[dict]:
            rng = random.Random(f"{self.cfg.seed}-inoculation-{seed}-{i}")
            return self.inoculation_preface(rng)

        return preface

    def prompts(self) -> list[dict]:
        """Every evaluation prompt: each (domain, template, slot) of the eval splits, once.

        `core` and `final` cover the general domain and every advice domain (metrics drop the
        fine-tuning domain of the model being scored); `in_domain` covers the advice domains.
        The toy has no system prompts (`system` is null: the chat has the user turn only).
        """
        rows = []
        for eval_set in EVAL_SETS:
            domains = self.cfg.advice_domains if eval_set == "in_domain" else self.cfg.domains
            for domain in domains:
                d = DOMAINS[domain]
                for t, template in enumerate(d.questions):
                    for s in self.cfg.slots[eval_set]:
                        rows.append({"prompt_id": f"{eval_set}/{domain}/t{t}/s{s}",
                                     "eval_set": eval_set, "domain": domain, "template": t,
                                     "slot": s, "system": None,
                                     "prompt": template.replace("{x}", d.slots[s])})
        return rows


def write_world(cfg: WorldConfig, out: Path, prov: dict) -> None:
    """Write corpus, instruct set, fine-tuning sets and prompt sets as parquet under `out`."""
    import pyarrow as pa

    from blockem.data import prompts_schema
    from blockem.io import atomic_dir, write_json, write_table

    world = World(cfg)
    with atomic_dir(out) as tmp:
        write_table(tmp / "corpus.parquet", pa.Table.from_pylist(world.corpus()), prov)
        write_table(tmp / "sft.parquet", pa.Table.from_pylist(world.sft_chats()), prov)
        for domain in cfg.advice_domains:
            write_table(tmp / "finetune" / f"{domain}.parquet",
                        pa.Table.from_pylist(world.finetune_set(domain)), prov)
        write_table(tmp / "prompts.parquet",
                    pa.Table.from_pylist(world.prompts(), schema=prompts_schema()), prov)
        write_json(tmp / "provenance.json", prov)
