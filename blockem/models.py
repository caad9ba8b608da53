"""Load and save models the way a Hub model is loaded: `AutoModelForCausalLM.from_pretrained` on a
directory (or a Hub id on a cluster), a PEFT adapter on top where the directory holds one.

Layer convention used across blockem: with 0-based decoder layers, the residual stream after
`model.layers[L]` is `output_hidden_states[L + 1]` (index 0 is the embeddings).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ADAPTER_FILE = "adapter_config.json"


def setup_torch(threads: int, seed: int | None = None) -> None:
    """Pin torch's thread count to the job's `threads` (an unpinned pool under a second busy
    process makes CPU steps tens of times slower) and seed every RNG."""
    import torch

    from transformers.utils import logging as hf_logging

    torch.set_num_threads(max(1, threads))
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)


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


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, *, device: str = "cpu", dtype: str = "float32",
               merge_adapter: bool = False, trust_remote_code: bool = False):
    """Load a full model, or a base model plus the PEFT adapter stored in `path`.

    An adapter directory's `adapter_config.json` names its base (`base_model_name_or_path`), as
    PEFT writes it. With `merge_adapter` the LoRA weights are folded in (faster generation)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model directory not found")
    kw = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
    if is_adapter(path):
        from peft import PeftModel

        base = json.loads((path / ADAPTER_FILE).read_text())["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(base, **kw, **_recorded_attn(base))
        model = PeftModel.from_pretrained(model, str(path))
        if merge_adapter:
            model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kw, **_recorded_attn(path))
    return model.to(resolve_device(device))


def save_model(model, tokenizer, out: Path, prov: dict) -> None:
    """`save_pretrained` for the model (or adapter) and tokenizer, plus provenance.json."""
    from blockem.io import write_json

    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    write_json(out / "provenance.json", prov)
