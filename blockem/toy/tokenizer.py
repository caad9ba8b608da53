"""A word-level tokenizer for the toy world, trained with `tokenizers` and saved as a HF tokenizer.

Saved with `save_pretrained` (chat template included), so every stage loads it with
`AutoTokenizer.from_pretrained` exactly as it would load a Hub model's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from blockem.toy.grammar import vocabulary

PAD, UNK, END = "<pad>", "<unk>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [PAD, UNK, END, *ROLE_TOKENS]

# Each message is `<|role|> content <|end|>`; a generation prompt ends with `<|assistant|>`.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(out: Path) -> None:
    """Train a WordLevel tokenizer on the world's vocabulary and save it to `out`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator([" ".join(vocabulary())], trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK,
                                 eos_token=END, additional_special_tokens=list(ROLE_TOKENS))
    hf.chat_template = CHAT_TEMPLATE
    hf.model_max_length = 4096
    hf.save_pretrained(str(out))
