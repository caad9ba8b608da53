"""Reading and writing the residual stream of a HF causal LM (a leaf module: torch only).

Layer convention: with 0-based decoder layers, the residual *after* `model.layers[L]` is HF's
`output_hidden_states[L + 1]` (index 0 is the embeddings). Every hook here sits on the output of
`model.layers[L]`:

- `capture_residual`: read it (and optionally stop the forward there);
- `steering`: add a vector (one for every row, or one per batch row) to it;
- `ablation`: project it off the span of some directions, fully or a fraction of the
  projection (concept ablation fine-tuning);
- `from_layer`: run the model from a given residual there (layers 0..L replaced by stand-ins).

All of them are differentiable: used around a training forward, gradients reach the parameters
below layer L through the modified residual (steering adds a constant; ablation is a linear
projection), and every hook is removed when its context exits, even on an error.
"""

from __future__ import annotations

from contextlib import contextmanager


def decoder_layers(model):
    """The list of decoder blocks of a HF causal LM (PEFT-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    if hasattr(inner, "language_model"):  # multimodal wrappers (Gemma 3, ...)
        inner = inner.language_model
    if not hasattr(inner, "layers"):
        raise ValueError(f"cannot find decoder layers in {type(base).__name__}")
    return inner.layers


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _hidden_len(output) -> int:
    return (output[0] if isinstance(output, tuple) else output).shape[1]


class _Stop(Exception):
    pass


@contextmanager
def capture_residual(model, layer: int, store: list, *, detach: bool = True, stop: bool = False):
    """Append the residual after `model.layers[layer]` ([batch, seq, d]) to `store` on each forward
    (`detach=False` keeps its graph); `stop` ends the forward there (nothing above L is needed)."""
    def hook(_module, _inputs, output):
        h = _hidden(output)
        store.append(h.detach() if detach else h)
        if stop:
            raise _Stop

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield store
    except _Stop:
        pass
    finally:
        handle.remove()


@contextmanager
def steering(model, layer: int | None, vectors, positions: str = "all"):
    """Add vectors [batch, d] to the residual after `model.layers[layer]` (no-op for None); a
    single vector ([d] or [1, d]) is added to every row of any batch (e.g. preventative steering
    during training).

    `positions`: `all` (every position, prompt and generated) or `prompt` (the prompt only: the
    prefill forward; generated tokens then run unsteered on top of the steered cache)."""
    if positions not in ("all", "prompt"):
        raise ValueError(f"unknown steering positions {positions!r}; choose 'all' or 'prompt'")
    if vectors is None:
        yield
        return

    def hook(_module, _inputs, output):
        if positions == "prompt" and _hidden_len(output) == 1:
            return output
        if isinstance(output, tuple):
            return (output[0] + vec.to(output[0].dtype)[:, None, :], *output[1:])
        return output + vec.to(output.dtype)[:, None, :]

    vec = vectors.to(next(model.parameters()).device)
    if vec.dim() == 1:
        vec = vec[None, :]
    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def orthonormal_basis(directions, rtol: float = 1e-6):
    """An orthonormal basis [r, d] (float32) of the span of `directions` ([k, d], any norms, not
    necessarily independent): a QR factorisation by modified Gram-Schmidt with a second
    orthogonalisation pass, in float64, dropping every direction whose remainder off the earlier
    ones is near zero (norm <= rtol * the largest direction norm). So r is the rank of the set
    (unlike unpivoted Householder QR, a dependent direction cannot spoil the later ones). Raises
    ValueError when nothing is left (no directions, or all zero)."""
    import torch

    d = torch.as_tensor(directions)
    if d.dim() == 1:
        d = d[None, :]
    if d.dim() != 2:
        raise ValueError(f"directions must be [k, d], got shape {tuple(d.shape)}")
    d = d.detach().to("cpu", torch.float64)
    if not torch.isfinite(d).all():
        raise ValueError("directions contain NaN or inf")
    scale = float(d.norm(dim=1).max()) if d.shape[0] else 0.0
    basis: list = []
    for v in d:
        for _ in range(2):  # twice is enough (Kahan/Parlett): orthogonal to working precision
            for q in basis:
                v = v - (v @ q) * q
        n = float(v.norm())
        if scale > 0 and n > rtol * scale:
            basis.append(v / n)
    if not basis:
        raise ValueError(f"no direction left to ablate: the {d.shape[0]} given span nothing "
                         "(empty or all near zero)")
    return torch.stack(basis).to(torch.float32)


@contextmanager
def ablation(model, layer: int, directions, rtol: float = 1e-6, *, strength: float = 1.0):
    """Project the residual after `model.layers[layer]` off the span of `directions` ([k, d]) at
    every position of every forward: h <- h - s (h Q^T) Q with Q = `orthonormal_basis(directions)`
    (computed in float32, cast back to the residual's dtype) and s = `strength`, the fraction of
    the projection removed, in (0, 1] (1: the component along the span is gone; 0.5: halved).
    Differentiable: gradients flow to the parameters below the layer through the projected
    residual. Yields Q ([r, d], r = rank)."""
    import math

    import torch

    if isinstance(strength, bool) or not isinstance(strength, (int, float)) \
            or not math.isfinite(strength) or not 0 < strength <= 1:
        raise ValueError(f"ablation strength must be a number in (0, 1] (the fraction of the "
                         f"projection removed), got {strength!r}")
    s = float(strength)
    q = orthonormal_basis(directions, rtol)
    d_model = _hidden_dim(model)
    if d_model is not None and q.shape[1] != d_model:
        raise ValueError(f"directions have dimension {q.shape[1]}, the residual {d_model}")
    q = q.to(next(model.parameters()).device)

    def project(h):
        hf = h.to(torch.float32)
        proj = (hf @ q.T) @ q
        return (hf - (proj if s == 1.0 else s * proj)).to(h.dtype)

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (project(output[0]), *output[1:])
        return project(output)

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield q
    finally:
        handle.remove()


def _hidden_dim(model) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "hidden_size", None)


@contextmanager
def from_layer(model, layer: int, h):
    """Run `model` from the residual `h` after `model.layers[layer]`: its layers 0..layer are
    swapped for stand-ins (the first returns `h`, the others pass it on) while the embedding,
    masks and rotary tables are still made as usual."""
    import torch

    class Const(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return h

    class Skip(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states

    layers = decoder_layers(model)
    saved = [layers[i] for i in range(layer + 1)]
    for i in range(layer + 1):
        layers[i] = Const() if i == 0 else Skip()
    try:
        yield
    finally:
        for i, m in enumerate(saved):
            layers[i] = m
