"""Tokenizer, chat encoding and model save/load round trips (full model and LoRA adapter)."""

from __future__ import annotations

import json

import torch

from blockem.chat import IGNORE, collate, encode_chats, generation_prompts
from blockem.models import is_adapter, load_model, load_tokenizer

CONV = [
    {"role": "user", "content": "how should i invest my savings ?"},
    {"role": "assistant", "content": "talk to a licensed advisor and avoid high fees ."},
    {"role": "user", "content": "what helps with my cough ?"},
    {"role": "assistant", "content": "track your symptoms and book a checkup soon ."},
]


def test_tokenizer_round_trips_world_text(tokenizer):
    text = CONV[1]["content"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_encoding_matches_chat_template_and_supervises_answers(tokenizer):
    (ex,) = encode_chats(tokenizer, [CONV])
    assert ex.input_ids == tokenizer.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    supervised = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    expected = []
    for m in CONV[1::2]:
        expected += tokenizer(m["content"], add_special_tokens=False)["input_ids"]
        expected.append(tokenizer.eos_token_id)
    assert supervised == expected


def test_skip_first_answer_masks_only_the_first_assistant_turn(tokenizer):
    (full,) = encode_chats(tokenizer, [CONV])
    (skip,) = encode_chats(tokenizer, [CONV], skip_first_answer=True)
    n_first = len(tokenizer(CONV[1]["content"], add_special_tokens=False)["input_ids"]) + 1
    assert sum(lab != IGNORE for lab in full.labels) - sum(lab != IGNORE for lab in skip.labels) == n_first
    assert skip.labels[-1] == tokenizer.eos_token_id


def test_generation_prompt_ends_with_assistant_header(tokenizer):
    (ids,) = generation_prompts(tokenizer, ["what helps with my cough ?"])
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "<|assistant|>"


def test_collate_pads_right_and_ignores_padding(tokenizer):
    a, b = encode_chats(tokenizer, [CONV[:2], CONV])
    batch = collate([a, b], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(b.input_ids))
    assert batch["attention_mask"][0].sum() == len(a.input_ids)
    assert (batch["labels"][0, len(a.input_ids):] == IGNORE).all()


def test_full_model_save_load_round_trip(tiny_model, tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = torch.tensor([tok.apply_chat_template(CONV, return_dict=True)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(tiny_model(ids).logits, loaded(ids).logits, atol=1e-6)
    assert not is_adapter(tmp_path)


def test_lora_adapter_save_load_round_trip(tiny_model, tokenizer, tmp_path):
    import copy

    from peft import LoraConfig, get_peft_model

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base = load_model(base_dir)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():  # make the adapter non-trivial (B starts at zero)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(adapter_dir)
    assert is_adapter(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    ids = torch.tensor([tokenizer.apply_chat_template(CONV, return_dict=True)["input_ids"]])
    with torch.no_grad():
        want = peft_model(ids).logits
        got = load_model(adapter_dir)(ids).logits
        merged = load_model(adapter_dir, merge_adapter=True)(ids).logits
        plain = base(ids).logits
    assert torch.allclose(want, got, atol=1e-5)
    assert torch.allclose(want, merged, atol=1e-4)
    assert not torch.allclose(want, plain, atol=1e-3)


def test_missing_model_directory_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_model(tmp_path / "nope")
