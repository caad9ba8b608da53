"""Load and save models the way a Hub model is loaded: `AutoModelForCausalLM.from_pretrained` on a
directory (or a Hub id on a cluster), a PEFT adapter on top where the directory holds one.

A base directory may also be a *pointer* to a Hub model (written by `blockem.hub.import_base` for
`model.source: hub`): it holds `blockem_source.json` (`name_or_path`, `revision`, `commit`,
`trust_remote_code`), the tokenizer files and config.json, but no weights. `load_model` and
`load_tokenizer` resolve it, and a model loaded through it carries the pointer directory as its
`name_or_path`, so a PEFT adapter trained on it records the pointer as `base_model_name_or_path`
(with its revision and trust_remote_code) rather than a bare Hub id.

Layer convention used across blockem: with 0-based decoder layers, the residual stream after
`model.layers[L]` is `output_hidden_states[L + 1]` (index 0 is the embeddings).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

ADAPTER_FILE = "adapter_config.json"
SOURCE_FILE = "blockem_source.json"  # a base directory that points at a Hub model (no weights)

# `name` or `org/name`: what the Hub accepts as a repo id (anything else is a local path)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def setup_torch(threads: int, seed: int | None = None) -> None:
    """Pin torch's thread count to the job's `threads` (an unpinned pool under a second busy
    process makes CPU steps tens of times slower) and seed every RNG."""
    import torch

    from transformers.utils import logging as hf_logging

    torch.set_num_threads(max(1, threads))
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if seed is not None:  # what transformers.set_seed does, without importing its trainer (peft)
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # every device


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("compute.device is 'cuda' but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


# config.json key a toy model uses to record its attention implementation (transformers does not
# save `attn_implementation`; load_model passes this back so every stage runs the same kernels)
ATTN_KEY = "blockem_attn_implementation"


def build_toy_model(vocab_size: int, pad_id: int, eos_id: int, *, hidden_size: int,
                    num_layers: int, num_heads: int, intermediate_size: int, max_length: int,
                    attn_implementation: str | None = None):
    """A small LlamaForCausalLM with tied embeddings, randomly initialised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    extra = {ATTN_KEY: attn_implementation} if attn_implementation else {}
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads,
                      num_key_value_heads=num_heads, intermediate_size=intermediate_size,
                      max_position_embeddings=max(max_length, 64), tie_word_embeddings=True,
                      pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None,
                      attn_implementation=attn_implementation, **extra)
    return LlamaForCausalLM(cfg)


def _recorded_attn(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        return {}  # a Hub id: the library default
    impl = json.loads(path.read_text()).get(ATTN_KEY)
    return {"attn_implementation": impl} if impl else {}


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_FILE).exists()


def looks_like_hub_id(name: str) -> bool:
    """True for `name` / `org/name` that is not an existing local path (then it is a Hub id)."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not Path(name).exists()


def read_source(path: str | Path) -> dict | None:
    """The Hub model a pointer directory names (`blockem_source.json`), or None for a real one."""
    f = Path(path) / SOURCE_FILE
    if not f.is_file():
        return None
    src = json.loads(f.read_text())
    if not src.get("name_or_path"):
        raise ValueError(f"{f}: no 'name_or_path'")
    return src


def _check_exists(name: str, what: str) -> None:
    """A name that is not a Hub id must be an existing local path."""
    if not looks_like_hub_id(name) and not Path(name).exists():
        raise FileNotFoundError(f"{name}: {what} not found (not a local path, and not a Hub id "
                                "'name' or 'org/name')")


def _trust_kw(trust_remote_code: bool) -> dict:
    """Pass `trust_remote_code` only when it is turned on."""
    return {"trust_remote_code": True} if trust_remote_code else {}


def resolve_base(path: str | Path, trust_remote_code: bool = False) -> tuple[str, dict]:
    """What `from_pretrained` needs for a base: (name_or_path, kwargs).

    A pointer directory resolves to the Hub id (or directory) it names, pinned to the commit
    recorded at import (else its `revision`), with its trust_remote_code and attention
    implementation; any other directory or Hub id is passed through as it is."""
    name = str(path)
    src = read_source(name)
    if src is None:
        _check_exists(name, "base model")
        return name, {**_trust_kw(trust_remote_code), **_recorded_attn(name)}
    target = src["name_or_path"]
    _check_exists(target, f"model named by {Path(name) / SOURCE_FILE}")
    kw = _trust_kw(trust_remote_code or bool(src.get("trust_remote_code")))
    revision = src.get("commit") or src.get("revision")
    if revision and looks_like_hub_id(target):
        kw["revision"] = revision
    if src.get("attn_implementation"):
        kw["attn_implementation"] = src["attn_implementation"]
    elif not looks_like_hub_id(target):
        kw.update(_recorded_attn(target))  # a local blockem model named by the pointer
    return target, kw


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer saved in `path` (a model, adapter or pointer directory, or a Hub id); an
    adapter directory without tokenizer files falls back to its base's. pad = eos when unset."""
    from transformers import AutoTokenizer

    _check_exists(str(path), "model directory")
    path = Path(path)
    src = read_source(path)
    if src is not None:
        trust_remote_code = trust_remote_code or bool(src.get("trust_remote_code"))
    elif is_adapter(path) and not (path / "tokenizer_config.json").exists():
        return load_tokenizer(_adapter_base(path), trust_remote_code)
    tok = AutoTokenizer.from_pretrained(str(path), **_trust_kw(trust_remote_code))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _adapter_base(path: Path) -> str:
    base = json.loads((path / ADAPTER_FILE).read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path / ADAPTER_FILE}: no base_model_name_or_path")
    if not looks_like_hub_id(base) and not Path(base).exists():
        raise FileNotFoundError(f"{base}: base model directory of adapter {path} not found "
                                f"(base_model_name_or_path in {ADAPTER_FILE}; relative paths are "
                                "taken from the working directory)")
    return base


def _load_base(base: str, kw: dict, trust_remote_code: bool):
    """A full model from a directory, pointer directory or Hub id. Through a pointer the model's
    `name_or_path` is the pointer itself, which is what PEFT records for its adapters."""
    from transformers import AutoModelForCausalLM

    name, extra = resolve_base(base, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(name, **kw, **extra)
    if name != base:
        model.config.name_or_path = base
        model.name_or_path = base
    return model


def load_model(path: str | Path, *, device: str = "cpu", dtype: str = "float32",
               merge_adapter: bool = False, trust_remote_code: bool = False):
    """Load a full model, or a base model plus the PEFT adapter stored in `path`.

    An adapter directory's `adapter_config.json` names its base (`base_model_name_or_path`), as
    PEFT writes it; a base directory holding `blockem_source.json` loads the Hub model it names.
    With `merge_adapter` the LoRA weights are folded in (faster generation)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model directory not found")
    kw = {"dtype": resolve_dtype(dtype)}
    if is_adapter(path):
        from peft import PeftModel

        model = _load_base(_adapter_base(path), kw, trust_remote_code)
        model = PeftModel.from_pretrained(model, str(path))
        if merge_adapter:
            model = model.merge_and_unload()
    else:
        model = _load_base(str(path), kw, trust_remote_code)
    return model.to(resolve_device(device))


def save_model(model, tokenizer, out: Path, prov: dict) -> None:
    """`save_pretrained` for the model (or adapter) and tokenizer, plus provenance.json."""
    from blockem.io import write_json

    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    write_json(out / "provenance.json", prov)
