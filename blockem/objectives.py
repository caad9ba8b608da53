"""The BLOCK-EM objective (stage 4): a penalty that forbids pushing the latents of a blocking
target past the base model in the misaligned direction, and the pieces it is made of.

    L_total = L_SFT + lam * L_block
    L_block = mean over masked tokens t of sum_k ReLU(sign_k (z_k^model(t) - z_k^base(t)))^2

`sign` is +1 for K+ (latents the fine-tune pushes up) and -1 for K-. The token mask is a setting:
`predicting` (positions whose *next* token is supervised: exactly the positions the shifted SFT
loss averages over, including the last prompt position where the first answer token is chosen)
or `response` (the supervised tokens themselves). Both losses are normalised by the same count
over the whole optimizer batch, so gradient accumulation changes nothing.

`TargetReader` reads z of a target (`blockem.block.target_doc`): SAE latents with signs (read with
the latent activation of discovery) or one direction (the projection onto the unit mean-difference
direction, sign +1).

The base reference z^base comes from one of three modes that give the same numbers:
`copy` (a frozen second model), `adapter_off` (the same PEFT model with its LoRA disabled, forward
stopped after layer L) and `cache` (z^base of every training example computed once per
(domain, target) by `blockem.block.cache_stage` and looked up by example index; valid because the
base is frozen and the data fixed). The `kl` objective adds lam_kl * KL(p_model || p_base) on the
same positions.

`BlockObjective` is the loss `blockem.train.train` calls; the block stage (`blockem.block`) builds
it from the method's `objective` (`blockem.methods`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

from blockem import progress

REFERENCES = ("copy", "adapter_off", "cache")
TOKEN_MASKS = ("predicting", "response")


def block_loss(z_model, z_base, sign, token_mask, normalizer=None):
    """Mean over masked tokens of sum_k ReLU(sign_k (z_model - z_base))^2.

    z_*: [batch, seq, |K|]; sign: [|K|] of +1/-1; token_mask: [batch, seq] (1 = counted).
    `normalizer` (default: the mask's sum) is the token count of the whole optimizer batch under
    gradient accumulation."""
    import torch

    excess = torch.relu(sign.to(z_model.dtype) * (z_model - z_base.to(z_model.dtype)))
    per_token = excess.pow(2).sum(-1)
    m = token_mask.to(per_token.dtype)
    n = m.sum() if normalizer is None else normalizer
    return (per_token * m).sum() / max(1.0, float(n))


def token_mask(labels, mode: str):
    """[batch, seq] mask of the positions the penalty counts (see module docstring)."""
    import torch

    sup = labels != -100
    if mode == "response":
        return sup
    if mode != "predicting":
        raise ValueError(f"unknown token mask {mode!r}; choose from {TOKEN_MASKS}")
    out = torch.zeros_like(sup)
    out[:, :-1] = sup[:, 1:]
    return out


def kl_loss(logits, base_logits, mask, normalizer):
    """Sum over masked positions of KL(p_model || p_base), / normalizer."""
    import torch.nn.functional as F

    lp = F.log_softmax(logits.float(), -1)
    lq = F.log_softmax(base_logits.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return (kl * mask.to(kl.dtype)).sum() / max(1.0, float(normalizer))

# --- reading a target -----------------------------------------------------------------------------

class TargetReader:
    """Reads z [..., |K|] of a target from residuals h [..., d] (differentiably).

    `source` names the target in errors (its file)."""

    def __init__(self, doc: dict, sae=None, device: str = "cpu", source: str | None = None):
        import torch

        self.doc, self.kind, self.layer = doc, doc["kind"], int(doc["layer"])
        self.sign = torch.tensor(doc["signs"], dtype=torch.float32, device=device)
        idx = torch.tensor(doc["latents"], dtype=torch.long)
        if self.kind == "direction":
            u = torch.tensor(doc["direction"], dtype=torch.float32)
            self.u = (u / u.norm().clamp_min(1e-8)).to(device)
            return
        if sae is None:
            raise ValueError(f"target {doc.get('name')!r} reads SAE latents: an SAE is required")
        d_sae = int(sae.W_enc.shape[1])
        bad = [int(k) for k in doc["latents"] if not 0 <= int(k) < d_sae]
        if bad:
            where = source or f"target {doc.get('name')!r}"
            raise ValueError(f"{where}: latent {bad[0]} is out of range for the SAE (d_sae "
                             f"{d_sae}: latents 0-{d_sae - 1}); was the latent set selected on "
                             f"another SAE?")
        self.mode = doc["activation"]
        self.sae, self.idx = sae, idx.to(device)
        if self.mode not in ("relu_preact", "sae_encode"):
            raise ValueError(f"unknown latent activation {self.mode!r}")
        # only |K| columns of the encoder carry gradient: cheap at any SAE width
        self.W = sae.W_enc.detach()[:, idx].float().to(device)
        self.b = sae.b_enc.detach()[idx].float().to(device)
        apply = getattr(sae.cfg, "apply_b_dec_to_input", True)
        self.b_dec = sae.b_dec.detach().float().to(device) if apply else None
        self.code = _sparse_code(sae, idx, device) if self.mode == "sae_encode" else None

    def __call__(self, h):
        import torch

        h = h.float()
        if self.kind == "direction":
            return (h @ self.u)[..., None]
        if self.mode == "sae_encode" and self.code is None:
            return self.sae.encode(h)[..., self.idx]  # an SAE blockem cannot restrict to K
        x = h - self.b_dec if self.b_dec is not None else h
        pre = x @ self.W + self.b
        if self.code is None:  # relu_preact
            return torch.relu(pre)
        kind, scale, extra = self.code
        if scale is not None:
            pre = pre * scale
        if kind == "topk":  # in the code iff among the token's k largest pre-activations
            with torch.no_grad():
                full = x @ extra["W_enc"] + extra["b_enc"]
                if extra["norms"] is not None:
                    full = full * extra["norms"]
                kth = full.topk(extra["k"], dim=-1).values[..., -1:]
                keep = full[..., self.idx] >= kth
            return torch.relu(pre) * keep
        if kind == "jumprelu":
            return torch.relu(pre) * (pre > extra["threshold"])
        return torch.relu(pre)  # standard


def _sparse_code(sae, idx, device):
    """How to compute the SAE's own sparse code of latents `idx` with gradient through |K|
    encoder columns only (sae-lens TopK, JumpReLU and ReLU SAEs without input normalisation);
    None = call `sae.encode` on every latent. A test checks both agree."""
    cfg = sae.cfg
    if getattr(cfg, "normalize_activations", "none") not in (None, "none") \
            or getattr(cfg, "reshape_activations", "none") not in (None, "none") \
            or getattr(cfg, "hook_head_index", None) is not None:
        return None
    arch = cfg.architecture() if callable(getattr(cfg, "architecture", None)) else None
    norms = None
    if getattr(cfg, "rescale_acts_by_decoder_norm", False):
        norms = sae.W_dec.detach().float().norm(dim=-1).to(device)
    scale = norms[idx] if norms is not None else None
    if arch == "topk":
        return ("topk", scale, {"k": int(cfg.k), "W_enc": sae.W_enc.detach().float().to(device),
                                "b_enc": sae.b_enc.detach().float().to(device), "norms": norms})
    if arch == "jumprelu" and norms is None:
        return ("jumprelu", None, {"threshold": sae.threshold.detach().float()[idx].to(device)})
    if arch == "standard" and norms is None:
        return ("standard", None, {})
    return None


def residual_upto(model, batch, layer: int):
    """No-grad residual after `model.layers[layer]`, running only layers <= layer."""
    import torch

    from blockem.hooks import capture_residual

    store: list = []
    with torch.no_grad(), capture_residual(model, layer, store, stop=True):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return store[0]

# --- base references --------------------------------------------------------------------------

class ModelReference:
    """`copy` (a frozen base model) or `adapter_off` (the trained PEFT model, LoRA disabled)."""

    def __init__(self, mode: str, base_model=None):
        if mode not in ("copy", "adapter_off"):
            raise ValueError(f"unknown base reference {mode!r}; choose from {REFERENCES}")
        if mode == "copy" and base_model is None:
            raise ValueError("reference 'copy' needs the base model")
        self.mode, self.base = mode, base_model

    def _ctx(self, model):
        if self.mode == "copy":
            return nullcontext(self.base)
        if not hasattr(model, "disable_adapter"):
            raise ValueError("reference 'adapter_off' needs a PEFT (LoRA) model; use 'copy' or "
                             "'cache' with finetune method 'full'")
        return _adapter_off(model)

    def latents(self, model, reader, batch, examples):
        with self._ctx(model) as ref:
            return reader(residual_upto(ref, batch, reader.layer))

    def logits(self, model, batch):
        import torch

        with self._ctx(model) as ref, torch.no_grad():
            return ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@contextmanager
def _adapter_off(model):
    with model.disable_adapter():
        yield model


def _cache_key(target: dict) -> str:
    """What a cache must have been computed for: latents, signs, layer, kind and activation."""
    return json.dumps([target["latents"], target["signs"], target["layer"], target["kind"],
                       target.get("activation")])


class CacheReference:
    """Base latents of every training example, computed once (`compute_cache`) and looked up."""

    def __init__(self, z, offsets, device: str = "cpu"):
        self.z, self.offsets, self.device = z, offsets, device

    @classmethod
    def load(cls, path: str | Path, target: dict, device: str = "cpu") -> "CacheReference":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            z, offsets = f.get_tensor("z"), f.get_tensor("offsets")
        want = _cache_key(target)
        if meta.get("target") != want:
            raise ValueError(f"{path}: cache was computed for another target than "
                             f"{target.get('name')!r}; rerun `blockem block-cache`")
        return cls(z, offsets, device)

    def latents(self, model, reader, batch, examples):
        """z^base [batch, seq, |K|] of the batch's examples (zeros on padding): one gather."""
        import torch

        T = batch["input_ids"].shape[1]
        idx = torch.tensor([e.index for e in examples])
        if (idx < 0).any() or (idx + 1 >= len(self.offsets)).any():
            bad = next(e.index for e in examples if not 0 <= e.index < len(self.offsets) - 1)
            raise ValueError(f"example {bad} is not in the base-latent cache")
        start, lengths = self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx]
        want = torch.tensor([len(e.input_ids) for e in examples])
        if not torch.equal(lengths, want):
            i = int((lengths != want).nonzero()[0])
            raise ValueError(f"cached example {examples[i].index} has {int(lengths[i])} tokens, "
                             f"the training data {int(want[i])}: cache and data do not match")
        pos = torch.arange(T)
        inside = pos[None, :] < lengths[:, None]
        rows = (start[:, None] + pos[None, :]).clamp(max=len(self.z) - 1)
        return (self.z[rows] * inside[..., None]).to(self.device)


def compute_cache(base_model, examples, reader, *, pad_id: int, batch_size: int = 64,
                  device: str = "cpu"):
    """z^base [total_tokens, |K|] of every example (concatenated) and per-example offsets."""
    import torch

    from blockem.chat import collate

    chunks, offsets = [], [0]
    with progress.bar(len(examples), "block cache", unit="example") as bar:
        for i in range(0, len(examples), batch_size):
            part = examples[i:i + batch_size]
            batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}
            with torch.no_grad():
                z = reader(residual_upto(base_model, batch, reader.layer)).float().cpu()
            for j, e in enumerate(part):
                chunks.append(z[j, : len(e.input_ids)])
                offsets.append(offsets[-1] + len(e.input_ids))
            bar.update(len(part))
    return torch.cat(chunks), torch.tensor(offsets, dtype=torch.long)

# --- the objective ----------------------------------------------------------------------------

class BlockObjective:
    """SFT + lam * block (+ lam_kl * KL), for `blockem.train.train`."""

    def __init__(self, *, reader=None, reference=None, lam: float = 0.0, mask: str = "predicting",
                 kl_lam: float = 0.0, kl_reference=None):
        if mask not in TOKEN_MASKS:
            raise ValueError(f"unknown token mask {mask!r}; choose from {TOKEN_MASKS}")
        self.reader, self.reference, self.lam, self.mask = reader, reference, lam, mask
        self.kl_lam, self.kl_reference = kl_lam, kl_reference

    def __call__(self, model, batch, examples, counts):
        import torch

        from blockem.hooks import capture_residual
        from blockem.train import sft_loss

        store: list = []
        layer = self.reader.layer if self.reader is not None else None
        ctx = capture_residual(model, layer, store, detach=False) if layer is not None \
            else nullcontext()
        with ctx:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        labels = batch["labels"]
        sft = sft_loss(out.logits, labels, counts["predicting"])
        total, terms = sft, {"sft_loss": sft}
        if self.reader is not None:
            # the latents are read at the counted positions only (the TopK threshold costs a
            # full-width encode per token); elsewhere z is 0 and the mask drops it anyway
            mask = token_mask(labels, self.mask)
            h = store[0]
            z = h.new_zeros(*mask.shape, len(self.reader.sign), dtype=torch.float32)
            z = z.index_put((mask,), self.reader(h[mask]))
            z_base = self.reference.latents(model, self.reader, batch, examples)
            blk = block_loss(z, z_base, self.reader.sign, mask, counts[self.mask])
            total = total + self.lam * blk
            terms["block_loss"] = blk
        if self.kl_lam:
            base_logits = self.kl_reference.logits(model, batch)
            kl = kl_loss(out.logits, base_logits, token_mask(labels, "predicting"),
                         counts["predicting"])
            total = total + self.kl_lam * kl
            terms["kl"] = kl
        return total, terms
