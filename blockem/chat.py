"""Chat data: load conversations with `datasets`, tokenize with the model's chat template, and mark
which tokens are supervised.

Works for any tokenizer with a chat template that copies message contents verbatim (the toy one,
Llama 3, Qwen, ...): conversations are rendered with `apply_chat_template`, tokenized with offsets,
and a token is supervised when it lies in an assistant message's content or in the end-of-turn
marker (the tokenizer's eos token) that closes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IGNORE = -100


def load_rows(path: str | Path) -> list[dict]:
    """Rows of a parquet or JSONL file of chats, through `datasets` (kept in memory, no cache)."""
    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file")
    kind = "json" if path.suffix in (".jsonl", ".json") else "parquet"
    ds = load_dataset(kind, data_files=str(path), split="train", keep_in_memory=True)
    return ds.to_list()


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where not supervised
    index: int = -1    # position in the encoded data set (keys BLOCK-EM's cached base latents)


def encode_chats(tokenizer, conversations: list[list[dict]], *, skip_first_answer: bool = False,
                 max_length: int | None = None) -> list[Example]:
    """Tokenize conversations; supervise assistant turns (all, or all but the first)."""
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    eos = tokenizer.eos_token
    out = []
    for n, (conv, text, ids, offsets) in enumerate(
            zip(conversations, texts, enc["input_ids"], enc["offset_mapping"])):
        spans, cursor, n_answers = [], 0, 0
        for m in conv:
            start = text.find(m["content"], cursor)
            if start < 0:
                raise ValueError(f"chat template does not copy message content verbatim: {m!r}")
            end = start + len(m["content"])
            cursor = end
            if m["role"] != "assistant":
                continue
            n_answers += 1
            if skip_first_answer and n_answers == 1:
                continue
            close = text.find(eos, end) if eos else -1
            if close >= 0 and not text[end:close].strip():
                end = close + len(eos)
            spans.append((start, end))
        labels = [IGNORE] * len(ids)
        j = 0
        for i, (a, b) in enumerate(offsets):
            while j < len(spans) and a >= spans[j][1]:
                j += 1
            if j < len(spans) and a >= spans[j][0] and b <= spans[j][1] and b > a:
                labels[i] = ids[i]
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        out.append(Example(list(ids), labels, n))
    return out


def collate(examples: list[Example], pad_id: int):
    """Right-padded batch tensors: input_ids, attention_mask, labels."""
    import torch

    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prompt_messages(question: str, system: str | None = None) -> list[dict]:
    """The chat of one prompt: the system message (when there is a system prompt) and the user
    turn. Without one, the chat template's default (if it has one, e.g. SmolLM2's) applies."""
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": question}]


def generation_prompts(tokenizer, questions: list[str],
                       systems: list[str | None] | None = None) -> list[list[int]]:
    """Token ids of single-turn prompts (`systems[i]`: the system prompt of question i, None for
    none) followed by the assistant header."""
    if systems is None:
        systems = [None] * len(questions)
    if len(systems) != len(questions):
        raise ValueError(f"{len(systems)} system prompts for {len(questions)} questions")
    convs = [prompt_messages(q, s) for q, s in zip(questions, systems)]
    try:
        texts = tokenizer.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - e.g. a template that rejects the system role
        if not any(systems):
            raise
        first = next(s for s in systems if s)
        raise ValueError(f"the tokenizer's chat template cannot render a prompt with a system "
                         f"message (system prompt {first[:60]!r}): {type(e).__name__}: {e}") \
            from None
    return tokenizer(texts, add_special_tokens=False)["input_ids"]
