"""Top-activating contexts and the decoder direction through the unembedding, for latent cards.

One pass per SAE (rule `latent_contexts`) for the union of the latents of every selected set
(`<results>/latents/<key>-<rule>.json`): every document of two sources goes once through the base
model and once through each discovery key's misaligned model:

- `corpus`: the SAE's corpus, the first `conversations` conversations of the chat tables the SAE was
  trained on (every token, as `blockem.sae.corpus_residuals` reads them);
- `core`: the `core` prompts (every prompt token, rendered as a generation prompt, as stage 1 reads
  them with token scope `prompt`).

A latent's activation is the discovery one (`discovery.activation`,
`blockem.sae.latent_activation`).
Per (latent, source) three rankings of documents, each document counted once at its best token (the
usual "top activating examples"; a document's highest token stands for it):

- `base`: the largest activation in the base model;
- `mis`: the largest activation in the key's misaligned model;
- `shift`: the largest change s_k * (z_mis - z_base) at one token, s_k the latent's sign in the
  set (where the two models differ most in the direction of the activation shift).

A document whose text window repeats one already shown for the same ranking is skipped (corpora
repeat conversation openings: eight copies of one line say less than eight lines).

The `top_k` best documents of each ranking (activation or change > 0 only) are read again in a
second, small pass to keep a text window around the token with both models' activations on every
token of it. Both models read the same tokens, so the two activations at a position are comparable.

The unembedding table (`unembed.parquet`): for each latent, the tokens its unit decoder direction
promotes and suppresses most through the base model's unembedding, the direct path of the logit
lens: logits = (d_k / ||d_k|| * g) @ W_U^T with g the final norm's gain (RMSNorm weight,
`1 + weight` for Gemma's; a LayerNorm also centres d_k first). The norm's 1 / rms(h) factor depends
on the residual the direction is added to; it is a positive scalar per position, so it rescales the
logits but does not reorder them, and is left out (so are a LayerNorm's bias and a final soft-cap,
which do not depend on d_k or keep the order). The layers above the SAE's are skipped: direct
effect only.
"""

from __future__ import annotations

import sys
from pathlib import Path

from blockem import progress

SOURCES = ("corpus", "core")
RANKINGS = ("base", "mis", "shift")
TOP_K = 8              # documents per (latent, source, ranking)
WINDOW = (12, 4)       # tokens kept before and after the highlighted one
TOP_TOKENS = 12        # promoted and suppressed tokens per latent
BATCH_SIZE = 32
MAX_LENGTH = 256       # as blockem.sae.chat_batches (the SAE's training tokens)
TOKEN_CHUNK = 1 << 22  # tokens x d_sae floats encoded at once (16 MB)

UNEMBED_METHOD = ("logits = (W_dec[k] / ||W_dec[k]|| * g) @ W_U^T with g the final norm's gain "
                  "(RMSNorm weight; Gemma: 1 + weight; LayerNorm: after centring); the norm's "
                  "1/rms factor (positive, per position: rescales, does not reorder) and the "
                  "layers above the SAE's are left out (direct path)")


def contexts_settings(cfg: dict) -> dict:
    """What the pass depends on: the SAE's layer and corpus size, the discovery activation, the
    model's length limit and the pass's fixed sizes."""
    d = cfg["discovery"]
    max_length = min(MAX_LENGTH, cfg["model"].get("max_length") or MAX_LENGTH)
    return {"activation": d["activation"], "layer": d["layer"],
            "conversations": d["sae"]["conversations"],
            "contexts": {"top_k": TOP_K, "window": list(WINDOW), "top_tokens": TOP_TOKENS,
                         "max_length": max_length},
            "compute": {"device": cfg["compute"]["device"], "dtype": cfg["compute"]["dtype"]}}


# --- documents --------------------------------------------------------------------------------

def corpus_documents(tokenizer, corpus_paths, n: int, max_length: int = MAX_LENGTH):
    """(doc ids, token ids, selected mask) of the first `n` conversations of the chat tables."""
    from blockem.chat import encode_chats, load_rows

    paths = [corpus_paths] if isinstance(corpus_paths, (str, Path)) else list(corpus_paths)
    convs = [r["messages"] for p in paths for r in load_rows(p)][:n]
    examples = encode_chats(tokenizer, convs, max_length=max_length)
    return ([f"conv-{i}" for i in range(len(examples))], [e.input_ids for e in examples],
            [[True] * len(e.input_ids) for e in examples])


def prompt_documents(tokenizer, prompts: list[dict], max_length: int = MAX_LENGTH):
    """(prompt ids, token ids, selected mask) of prompt rows rendered as generation prompts."""
    from blockem.chat import generation_prompts

    ids = generation_prompts(tokenizer, [p["prompt"] for p in prompts],
                             [p.get("system") for p in prompts])
    ids = [x[:max_length] for x in ids]
    return [p["prompt_id"] for p in prompts], ids, [[True] * len(x) for x in ids]


def _batches(ids: list[list[int]], select: list[list[bool]], pad_id: int, batch_size: int,
             drop_first: bool, docs: list[int] | None = None):
    """(doc indices, input_ids, attention_mask, select) right-padded batches."""
    import torch

    order = list(range(len(ids))) if docs is None else list(docs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        n = max(len(ids[i]) for i in chunk)
        x = torch.full((len(chunk), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        sel = torch.zeros((len(chunk), n), dtype=torch.bool)
        for r, i in enumerate(chunk):
            x[r, :len(ids[i])] = torch.tensor(ids[i])
            mask[r, :len(ids[i])] = 1
            sel[r, :len(ids[i])] = torch.tensor(select[i])
        if drop_first:
            sel[:, 0] = False
        yield chunk, x, mask, sel


def token_activations(model, sae, input_ids, attention_mask, select, *, layer: int,
                      activation: str, latents, device: str = "cpu"):
    """Activations of `latents` at every position [batch, seq, n_latents] (-inf where not
    selected). `relu_preact` reads only those latents' encoder columns; `sae_encode` computes the
    full sparse code (TopK and JumpReLU codes depend on every latent) in chunks of tokens, then
    slices it."""
    import torch

    from blockem.hooks import capture_residual
    from blockem.sae import latent_activation

    store: list = []
    with torch.no_grad(), capture_residual(model, layer, store, stop=True):
        model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    h = store[0].float()
    flat = h[select.to(h.device)].to(sae.W_enc.device)
    idx = torch.as_tensor(list(latents), dtype=torch.long, device=sae.W_enc.device)
    parts = []
    with torch.no_grad():
        if activation == "relu_preact":  # blockem.sae.latent_activation on a column subset
            x = flat.to(sae.W_enc.dtype)
            if getattr(sae.cfg, "apply_b_dec_to_input", True):
                x = x - sae.b_dec
            parts.append(torch.relu(x @ sae.W_enc[:, idx] + sae.b_enc[idx]).float().cpu())
        else:
            chunk = max(1, TOKEN_CHUNK // max(1, sae.cfg.d_sae))
            for s in range(0, flat.shape[0], chunk):
                z = latent_activation(sae, flat[s:s + chunk], activation)
                parts.append(z.float()[:, idx].cpu())
    out = torch.full((*select.shape, len(idx)), float("-inf"))
    if parts:
        out[select] = torch.cat(parts)
    return out


# --- the pass ---------------------------------------------------------------------------------

def _best(values, store: dict, name: str) -> None:
    """Per document its best position and value ([batch, seq, n] -> [batch, n]), kept in
    store[name]."""
    v, pos = values.max(dim=1)
    store.setdefault(name, []).append((v, pos))


def _top_docs(values, positions, k: int, window_of) -> list[list[tuple[int, int, float]]]:
    """Per latent column, the (doc, position, value) of the k best documents with value > 0,
    ties broken by document order, skipping a document whose window (`window_of(doc, pos)`: its
    tokens) repeats one already taken (corpora repeat openings: k copies of one text say less)."""
    import numpy as np

    v = values.numpy()
    out = []
    for j in range(v.shape[1]):
        col = v[:, j]
        ok = np.nonzero(col > 0)[0]
        taken, seen = [], set()
        for d in ok[np.lexsort((ok, -col[ok]))]:
            pos = int(positions[d, j])
            w = window_of(int(d), pos)
            if w in seen:
                continue
            seen.add(w)
            taken.append((int(d), pos, float(col[d])))
            if len(taken) == k:
                break
        out.append(taken)
    return out


def window_bounds(n_tokens: int, pos: int, window) -> tuple[int, int]:
    """[lo, hi) of the window around `pos`: window[0] tokens before, window[1] after."""
    return max(0, pos - window[0]), min(n_tokens, pos + window[1] + 1)


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text of each token of a window: what decoding it adds to the decoded prefix (keeps
    word-level tokenizers' spaces and BPE's leading spaces), or the token decoded alone."""
    pieces, prev = [], ""
    for j in range(len(ids)):
        text = tokenizer.decode(ids[:j + 1], skip_special_tokens=False)
        pieces.append(text[len(prev):] if text.startswith(prev) else
                      tokenizer.decode([ids[j]], skip_special_tokens=False))
        prev = text
    return pieces


def top_contexts(base, mis: dict, sae, tokenizer, sources: dict, latents: dict, *, layer: int,
                 activation: str, top_k: int = TOP_K, window=WINDOW, device: str = "cpu",
                 drop_first: bool = False, batch_size: int = BATCH_SIZE) -> list[dict]:
    """Rows of the contexts table.

    `mis`: discovery key -> misaligned model; `sources`: name -> (doc ids, token ids, selected);
    `latents`: key -> {latent: sign} (the union of that key's sets). Each document of each source
    goes once through the base and each misaligned model (all latents at once); the best
    documents are then read again for their windows."""
    import torch

    union = sorted({k for ks in latents.values() for k in ks})
    col = {k: j for j, k in enumerate(union)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[dict] = []
    if not union:
        return rows
    kw = dict(layer=layer, activation=activation, latents=union, device=device)
    for source, (doc_ids, ids, select) in sources.items():
        if not ids:
            continue
        store: dict = {}
        # every document through the base and each misaligned model
        with progress.bar(len(ids), f"contexts {source}", unit="document") as bar:
            bar.set_postfix(models=1 + len(mis))
            for chunk, x, mask, sel in _batches(ids, select, pad, batch_size, drop_first):
                zb = token_activations(base, sae, x, mask, sel, **kw)
                _best(zb, store, "base")
                for key, model in mis.items():
                    zm = token_activations(model, sae, x, mask, sel, **kw)
                    _best(zm, store, f"mis/{key}")
                    sign = torch.tensor([float(latents[key].get(k, 1)) for k in union])
                    # unselected positions are -inf in both (their difference nan): kept at -inf
                    _best(torch.where(sel[:, :, None], sign * (zm - zb), float("-inf")), store,
                          f"shift/{key}")
                bar.update(len(chunk))
        best = {name: (torch.cat([v for v, _ in parts]), torch.cat([p for _, p in parts]))
                for name, parts in store.items()}
        def window_of(doc, pos):
            lo, hi = window_bounds(len(ids[doc]), pos, window)
            return tuple(ids[doc][lo:hi]), pos - lo

        # the chosen documents of every (key, latent, ranking)
        chosen = []  # (key, latent, ranking, rank, doc, pos, value)
        for key, ks in latents.items():
            for ranking in RANKINGS:
                name = "base" if ranking == "base" else f"{ranking}/{key}"
                tops = _top_docs(*best[name], top_k, window_of)
                for k in ks:
                    for r, (doc, pos, value) in enumerate(tops[col[k]]):
                        chosen.append((key, k, ranking, r, doc, pos, value))
        docs = sorted({c[4] for c in chosen})
        acts: dict = {}  # (model name, doc) -> [seq, n_latents]
        with progress.bar(len(docs), f"contexts {source} windows", unit="document") as bar:
            for chunk, x, mask, sel in _batches(ids, select, pad, batch_size, drop_first, docs):
                for name, model in [("base", base), *((f"mis/{k}", m) for k, m in mis.items())]:
                    z = token_activations(model, sae, x, mask, sel, **kw)
                    for r, d in enumerate(chunk):
                        acts[(name, d)] = z[r, :len(ids[d])]
                bar.update(len(chunk))
        pieces: dict = {}
        for key, k, ranking, r, doc, pos, value in chosen:
            lo, hi = window_bounds(len(ids[doc]), pos, window)
            if (doc, lo, hi) not in pieces:
                pieces[(doc, lo, hi)] = token_pieces(tokenizer, ids[doc][lo:hi])
            zb, zm = acts[("base", doc)][:, col[k]], acts[(f"mis/{key}", doc)][:, col[k]]
            rows.append({"key": key, "latent": int(k), "sign": int(latents[key][k]),
                         "source": source, "ranking": ranking, "rank": r, "doc": doc,
                         "doc_id": str(doc_ids[doc]), "position": pos, "value": value,
                         "act_base": float(zb[pos]), "act_mis": float(zm[pos]),
                         "tokens": pieces[(doc, lo, hi)], "focus": pos - lo,
                         "window_base": _finite(zb[lo:hi]), "window_mis": _finite(zm[lo:hi])})
    return rows


def _finite(values) -> list[float | None]:
    """Window activations, None at tokens that are not read (e.g. a dropped first token)."""
    return [float(v) if v > float("-inf") else None for v in values.tolist()]


# --- unembedding ------------------------------------------------------------------------------

def final_norm(model):
    """The final norm of a HF causal LM (before the unembedding), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in (("model", "norm"), ("model", "language_model", "norm"), ("transformer", "ln_f"),
                 ("gpt_neox", "final_layer_norm"), ("model", "final_layernorm"),
                 ("model", "decoder", "final_layer_norm")):
        obj = base
        for part in path:
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def through_norm(directions, norm):
    """Directions [n, d] as the final norm passes them on, up to its positive 1/rms factor."""
    import torch

    if norm is None:
        return directions
    x = directions
    if isinstance(norm, torch.nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
    w = getattr(norm, "weight", None)
    if w is None:
        return x
    w = w.detach().float().to(x.device)
    if "gemma" in type(norm).__name__.lower():  # Gemma's RMSNorm scales by (1 + weight)
        w = 1.0 + w
    return x * w


def unembed_rows(model, sae, tokenizer, latents, top: int = TOP_TOKENS) -> list[dict]:
    """Per latent, the `top` tokens its unit decoder direction promotes and suppresses most
    (module docstring: the final norm's gain applied, its 1/rms left out)."""
    import torch

    from blockem.sae import unit_directions

    latents = sorted(set(latents))
    if not latents:
        return []
    W_U = model.get_output_embeddings().weight.detach().float()
    with torch.no_grad():
        d = through_norm(unit_directions(sae, latents).to(W_U.device), final_norm(model))
        logits = (d @ W_U.T).cpu()
    rows = []
    top = min(top, logits.shape[1])
    for j, k in enumerate(latents):
        for kind, largest in (("promoted", True), ("suppressed", False)):
            v, idx = torch.topk(logits[j], top, largest=largest)
            for r, (t, x) in enumerate(zip(idx.tolist(), v.tolist())):
                rows.append({"latent": int(k), "kind": kind, "rank": r, "token_id": int(t),
                             "token": tokenizer.decode([t], skip_special_tokens=False),
                             "value": float(x)})
    return rows


# --- the stage --------------------------------------------------------------------------------

def set_latents(set_paths: dict[str, list[Path]]) -> dict[str, dict[int, int]]:
    """key -> {latent: sign} over the key's latent-set JSON files (a latent keeps its first
    sign)."""
    import json

    out: dict[str, dict[int, int]] = {}
    for key, paths in set_paths.items():
        ks = out.setdefault(key, {})
        for p in paths:
            for k in json.loads(Path(p).read_text()).get("latents") or []:
                ks.setdefault(int(k["latent"]), int(k.get("sign") or 1))
    return out


def contexts_stage(base_dir: Path, mis_dirs: dict[str, Path], set_paths: dict[str, list[Path]],
                   sae_dir: Path, corpus_paths: list[Path], prompts_path: Path, out: Path,
                   unembed_out: Path, settings: dict, threads: int = 1) -> None:
    """Write contexts.parquet (top-activating contexts, module docstring) and unembed.parquet for
    the union of the sets' latents."""
    import pyarrow as pa

    from blockem.io import PROMPT_COLUMNS, PROMPT_TABLE, provenance, read_checked, write_table
    from blockem.models import load_model, load_tokenizer, resolve_device, setup_torch
    from blockem.sae import load_sae, read_meta

    setup_torch(threads, None)
    c = settings["contexts"]
    device, dtype = resolve_device(settings["compute"]["device"]), settings["compute"]["dtype"]
    latents = set_latents(set_paths)
    meta = read_meta(sae_dir)
    sae = load_sae(sae_dir, device=device)
    tok = load_tokenizer(base_dir)
    base = load_model(base_dir, device=device, dtype=dtype).eval()
    mis = {k: load_model(p, device=device, dtype=dtype, merge_adapter=True).eval()
           for k, p in mis_dirs.items() if latents.get(k)}
    latents = {k: v for k, v in latents.items() if k in mis}
    prompts = [r for r in read_checked(prompts_path, PROMPT_COLUMNS, PROMPT_TABLE).to_pylist()
               if r["eval_set"] == "core"]
    sources = {"corpus": corpus_documents(tok, corpus_paths, settings["conversations"],
                                          c["max_length"]),
               "core": prompt_documents(tok, prompts, c["max_length"])}
    n = len({k for ks in latents.values() for k in ks})
    print(f"[contexts] {n} latents of {len(latents)} key(s); {len(sources['corpus'][0])} corpus "
          f"conversations, {len(prompts)} core prompts", file=sys.stderr, flush=True)
    rows = top_contexts(base, mis, sae, tok, sources, latents, layer=meta["layer"],
                        activation=settings["activation"], top_k=c["top_k"],
                        window=tuple(c["window"]), device=device,
                        drop_first=bool(meta.get("drop_first_token", False)))
    prov = provenance("latent_contexts", settings, None, sae=meta.get("id"), layer=meta["layer"],
                      latents={k: sorted(v) for k, v in latents.items()})
    write_table(out, pa.Table.from_pylist(rows, schema=CONTEXT_SCHEMA()), prov)
    urows = unembed_rows(base, sae, tok, {k for ks in latents.values() for k in ks},
                         c["top_tokens"])
    write_table(unembed_out, pa.Table.from_pylist(urows, schema=UNEMBED_SCHEMA()),
                {**prov, "stage": "latent_unembed", "method": UNEMBED_METHOD})


def CONTEXT_SCHEMA():  # noqa: N802 - a constant built lazily (pyarrow import)
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("latent", pa.int64()), ("sign", pa.int64()),
                      ("source", pa.string()), ("ranking", pa.string()), ("rank", pa.int64()),
                      ("doc", pa.int64()), ("doc_id", pa.string()), ("position", pa.int64()),
                      ("value", pa.float64()), ("act_base", pa.float64()),
                      ("act_mis", pa.float64()), ("tokens", pa.list_(pa.string())),
                      ("focus", pa.int64()), ("window_base", pa.list_(pa.float64())),
                      ("window_mis", pa.list_(pa.float64()))])


def UNEMBED_SCHEMA():  # noqa: N802
    import pyarrow as pa

    return pa.schema([("latent", pa.int64()), ("kind", pa.string()), ("rank", pa.int64()),
                      ("token_id", pa.int64()), ("token", pa.string()), ("value", pa.float64())])
