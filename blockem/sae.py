"""SAEs through sae-lens: three sources, the latent activation used everywhere, and a sanity table.

Sources (config `discovery.sae.source`):
- `train`: collect layer-L residuals of the base model on a corpus and train one of sae-lens's
  training classes (`topk`, `batchtopk`, `jumprelu`, `standard`) with a plain loop over our own
  activation iterator, then `save_inference_model`;
- `pretrained`: `SAE.from_pretrained(release, sae_id)` (the Hub; e.g. goodfire-llama-3.1-8b-instruct
  / layer_19);
- `disk`: `SAE.load_from_disk(path)`.

Layer convention: with 0-based decoder layers, the residual *after* `model.layers[L]` is HF's
`output_hidden_states[L + 1]` (index 0 is the embeddings). `capture_residual` (blockem.hooks)
hooks the output of `model.layers[L]`; a test checks the two agree. One exception: for the last
layer HF returns the residual *after* the final norm, while blockem always reads (and steers) the
raw residual.

Steering vectors (`steering_vectors`, `set_vector`): alpha * s_k * scale times the unit decoder
direction of latent k, added to the residual by `blockem.hooks.steering`.

Latent activation (`discovery.activation`): `relu_preact` (default) is the dense ReLU of the encoder
pre-activation, z = ReLU((h - b_dec) W_enc + b_enc), what BLOCK-EM reads and blocks; `sae_encode`
is the SAE's own sparse code (TopK / JumpReLU / ReLU).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from blockem import progress
from blockem.hooks import capture_residual, decoder_layers

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "standard")
ACTIVATIONS = ("relu_preact", "sae_encode")
META_FILE = "blockem_sae.json"


# --- residual stream access (the hooks: blockem.hooks) ----------------------------------------

def residuals(model, batches, layer: int, device: str = "cpu", drop_first: bool = False, *,
              desc: str = "activations", total: int | None = None):
    """Residuals at `layer` for token positions selected by each batch's `select` mask
    (`drop_first`: never the sequences' first token, an attention sink whose residual norm is
    ~100x the rest in many real models, e.g. SmolLM2's <|im_start|>; see `sae.drop_first_token`).

    `batches` yields dicts with input_ids, attention_mask and a boolean `select` [batch, seq];
    returns a float32 tensor [n_selected_tokens, d] (on CPU) and the per-row index of each token.
    Progress: a `blockem.progress` bar `desc` over the rows (`total` of them, if known).
    """
    import torch

    out, rows, offset, tokens = [], [], 0, 0
    store: list = []
    with torch.no_grad(), capture_residual(model, layer, store), \
            progress.bar(total, desc, unit="row") as bar:
        for b in batches:
            store.clear()
            model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
            h = store[0].float().cpu()
            sel = b["select"].bool()
            if drop_first:
                sel[:, 0] = False
            out.append(h[sel])
            rows.append(torch.nonzero(sel)[:, 0] + offset)
            offset += sel.shape[0]
            tokens += len(out[-1])
            bar.set_postfix(tokens=tokens)
            bar.update(sel.shape[0])
    return torch.cat(out), torch.cat(rows)


# --- latent activation ------------------------------------------------------------------------

def latent_activation(sae, h, mode: str = "relu_preact"):
    """Latent activations z of residuals h [..., d] -> [..., d_sae]."""
    import torch

    if mode == "sae_encode":
        return sae.encode(h.to(sae.W_enc.dtype))
    if mode != "relu_preact":
        raise ValueError(f"unknown latent activation {mode!r}; choose from {ACTIVATIONS}")
    x = h.to(sae.W_enc.dtype)
    if getattr(sae.cfg, "apply_b_dec_to_input", True):
        x = x - sae.b_dec
    return torch.relu(x @ sae.W_enc + sae.b_enc)


def unit_directions(sae, latents):
    """Unit decoder directions d_k / ||d_k|| for latent ids -> [len(latents), d]."""
    import torch

    W = sae.W_dec[torch.as_tensor(list(latents), dtype=torch.long)].float()
    return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-8)


# --- steering vectors -------------------------------------------------------------------------
# Steering latent k adds alpha * s_k * scale * d_k / ||d_k|| to the residual at the SAE's layer
# (blockem.hooks.steering): induce (+) on the base, repair (-) on the misaligned model.

STEER_MODES = ("induce", "repair")


def steering_vectors(sae, latents, signs, alphas, scale: float, mode: str):
    """[n, d] vectors: (+ for induce, - for repair) alpha * s_k * scale * unit decoder direction."""
    import torch

    if mode not in STEER_MODES:
        raise ValueError(f"unknown steering mode {mode!r}")
    if not len(latents):
        return torch.zeros(0, sae.W_dec.shape[1])
    sign = 1.0 if mode == "induce" else -1.0
    coef = torch.tensor([sign * a * s * scale for a, s in zip(alphas, signs)], dtype=torch.float32)
    return coef[:, None] * unit_directions(sae, latents)


def set_vector(latent_set: dict, sae, factor: float = 1.0):
    """One vector steering every latent of a set jointly at its repair strength:
    sum_k -factor * alpha_rep(k) * s_k * scale * d_k/||d_k||  ([d])."""
    ks = latent_set["latents"]
    vec = steering_vectors(sae, [k["latent"] for k in ks], [k["sign"] for k in ks],
                           [factor * k["alpha_rep"] for k in ks], latent_set["scale"], "repair")
    return vec.sum(0)


# --- sources ----------------------------------------------------------------------------------

def load_sae(path: str | Path, device: str = "cpu"):
    """Load an SAE saved in sae-lens's format (what every stage after `sae` reads)."""
    from sae_lens import SAE

    path = Path(path)
    if not (path / "cfg.json").exists():
        raise FileNotFoundError(f"{path}: no sae-lens SAE here (cfg.json missing)")
    return SAE.load_from_disk(str(path), device=device)


def read_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / META_FILE).read_text())


def steering_scale(meta: dict, setting) -> float:
    """The steering unit: the SAE's recorded median residual norm, or a configured number."""
    return meta["median_norm"] if setting == "median" else float(setting)


def sae_from_source(source: dict, device: str = "cpu"):
    """An SAE from `pretrained` (Hub) or `disk`; `train` is handled by `train_sae`."""
    from sae_lens import SAE

    kind = source["source"]
    if kind == "pretrained":
        return SAE.from_pretrained(source["release"], source["sae_id"], device=device)
    if kind == "disk":
        return load_sae(source["path"], device=device)
    raise ValueError(f"sae source {kind!r} is not loadable; use 'pretrained' or 'disk'")


def train_sae(acts, *, architecture: str, d_sae: int, params: dict, steps: int,
              batch_size: int, lr: float, seed: int, dead_window: int = 200, log_every: int = 200):
    """Train a sae-lens training SAE on activations [n, d] with a plain Adam loop.

    Coefficients (l1 / l0 / aux) follow the SAE's own `get_coefficients` with their warm-up.
    Returns the TrainingSAE and a per-step log."""
    import torch
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import TrainStepInput

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown SAE architecture {architecture!r}; choose from {ARCHITECTURES}")
    sae_cls, cfg_cls = get_sae_training_class(architecture)
    torch.manual_seed(seed)
    cfg = cfg_cls(d_in=acts.shape[1], d_sae=d_sae, **params)
    sae = sae_cls(cfg)
    # initialise b_dec at the data mean (geometric-median-style start)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    coefs = sae.get_coefficients()
    log = []
    with progress.bar(steps, "sae", unit="step") as bar:
        for step in range(steps):
            idx = torch.randint(0, acts.shape[0], (batch_size,), generator=gen)
            values = {}
            for name, c in coefs.items():
                if isinstance(c, (int, float)):
                    values[name] = float(c)
                else:
                    values[name] = c.value * min(1.0, (step + 1) / max(1, c.warm_up_steps))
            out = sae.training_forward_pass(TrainStepInput(
                sae_in=acts[idx], coefficients=values, dead_neuron_mask=since_fired > dead_window,
                n_training_steps=step, is_logging_step=False))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            fired = (out.feature_acts > 0).any(0).cpu()
            since_fired += 1
            since_fired[fired] = 0
            row = {"step": step + 1, "loss": float(out.loss.detach())}
            row.update({k: float(v.detach()) for k, v in out.losses.items()})
            log.append(row)
            recent = log[-log_every:]
            bar.set_postfix(loss=f"{sum(r['loss'] for r in recent) / len(recent):.4f}")
            bar.update(1)
    return sae, log


# --- sanity -----------------------------------------------------------------------------------

def sanity_row(sae, acts, dense_threshold: float) -> dict:
    """Reconstruction and sparsity of an SAE (its own sparse code) on activations [n, d]."""
    import torch

    with torch.no_grad():
        x = acts.to(sae.W_enc.dtype)
        codes = sae.encode(x)
        recon = sae.decode(codes)
        fvu = float(((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        cos = float(torch.nn.functional.cosine_similarity(x, recon, dim=-1).mean())
        density = (codes > 0).float().mean(0)
    return {"n_tokens": int(x.shape[0]), "fvu": fvu, "cosine": cos,
            "l0": float((codes > 0).float().sum(-1).mean()),
            "dead_fraction": float((density == 0).float().mean()),
            "dense_fraction": float((density > dense_threshold).float().mean())}


# --- stages -----------------------------------------------------------------------------------

def chat_batches(tokenizer, conversations, batch_size: int = 64, max_length: int = 256):
    """Right-padded batches of whole conversations, every real token selected."""
    from blockem.chat import collate, encode_chats

    examples = encode_chats(tokenizer, conversations, max_length=max_length)
    for start in range(0, len(examples), batch_size):
        b = collate(examples[start:start + batch_size], tokenizer.pad_token_id)
        b["select"] = b["attention_mask"].bool()
        yield b


def corpus_residuals(model, tokenizer, corpus_path, n: int, layer: int, device: str,
                     drop_first: bool = False):
    """Layer residuals of `model` on every token of the first `n` conversations of a corpus
    (one chat table, or several read one after the other)."""
    from blockem.chat import load_rows

    paths = [corpus_path] if isinstance(corpus_path, (str, Path)) else list(corpus_path)
    convs = [r["messages"] for p in paths for r in load_rows(p)][:n]
    if not convs:
        raise ValueError(f"{', '.join(map(str, paths))}: no conversations to collect "
                         f"activations from")
    acts, _ = residuals(model, chat_batches(tokenizer, convs), layer, device, drop_first,
                        desc="activations corpus", total=len(convs))
    return acts


def sae_stage(base_dir: Path, corpus_path, out: Path, settings: dict, threads: int = 1):
    """Train (or fetch) the SAE at layer L and save it in sae-lens's format with blockem_sae.json
    (layer, source, median residual norm of the base at L: the default steering scale)."""
    import pyarrow as pa

    from blockem.io import atomic_dir, provenance, write_json, write_table
    from blockem.models import load_model, load_tokenizer, resolve_device, setup_torch

    s = settings["sae"]
    layer = settings["layer"]
    setup_torch(threads, s["seed"])
    device = resolve_device(settings["compute"]["device"])
    tok = load_tokenizer(base_dir)
    base = load_model(base_dir, device=device, dtype=settings["compute"]["dtype"]).eval()
    if layer >= len(decoder_layers(base)):
        raise ValueError(f"discovery.layer {layer} is out of range: the model has "
                         f"{len(decoder_layers(base))} layers (0-based)")
    drop_first = bool(s.get("drop_first_token", False))
    acts = corpus_residuals(base, tok, corpus_path, s["conversations"], layer, device, drop_first)
    median_norm = float(acts.norm(dim=-1).median())
    log = []
    if s["source"] == "train":
        sae, log = train_sae(acts.to(device), architecture=s["architecture"], d_sae=s["d_sae"],
                             params=s["params"], steps=s["steps"], batch_size=s["batch_size"],
                             lr=s["lr"], seed=s["seed"])
        sae_id = f"trained/{s['architecture']}-{s['d_sae']}-L{layer}"
    else:
        sae = sae_from_source(s, device=device)
        sae_id = f"{s['release']}/{s['sae_id']}" if s["source"] == "pretrained" else str(s["path"])
    if sae.cfg.d_in != acts.shape[1]:
        raise ValueError(f"SAE {sae_id} reads d_in={sae.cfg.d_in} but layer {layer} of "
                         f"{base_dir} has width {acts.shape[1]}")
    prov = provenance("sae", settings, s["seed"])
    with atomic_dir(out) as tmp:
        if hasattr(sae, "save_inference_model"):
            sae.save_inference_model(tmp)
        else:
            sae.save_model(tmp)
        write_json(tmp / META_FILE, {"layer": layer, "source": s["source"], "id": sae_id,
                                     "d_in": int(acts.shape[1]), "d_sae": int(sae.cfg.d_sae),
                                     "median_norm": median_norm, "n_tokens": int(acts.shape[0]),
                                     "drop_first_token": drop_first})
        if log:
            write_table(tmp / "train_log.parquet", pa.Table.from_pylist(log), prov)
        write_json(tmp / "provenance.json", prov)


def sanity_stage(sae_dir: Path, models: dict[str, Path], corpus_path: Path, out: Path,
                 settings: dict, threads: int = 1) -> None:
    """FVU, cosine, L0, dead and dense fractions of the SAE on each model's activations."""
    import pyarrow as pa

    from blockem.io import provenance, write_table
    from blockem.models import load_model, load_tokenizer, resolve_device, setup_torch

    setup_torch(threads, None)
    device = resolve_device(settings["compute"]["device"])
    sae = load_sae(sae_dir, device=device)
    meta = read_meta(sae_dir)
    rows = []
    for name, path in models.items():
        tok = load_tokenizer(path)
        model = load_model(path, device=device, dtype=settings["compute"]["dtype"],
                           merge_adapter=True).eval()
        acts = corpus_residuals(model, tok, corpus_path, settings["sanity_conversations"],
                                meta["layer"], device, meta.get("drop_first_token", False))
        rows.append({"model": name, "sae": meta["id"], "layer": meta["layer"],
                     **sanity_row(sae, acts.to(device), settings["dense_threshold"])})
        print(f"[sanity] {rows[-1]}", file=sys.stderr, flush=True)
    write_table(out, pa.Table.from_pylist(rows), provenance("sae_sanity", settings, None))
