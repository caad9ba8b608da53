"""Reading and writing the residual stream of a HF causal LM (a leaf module: torch only).

Layer convention: with 0-based decoder layers, the residual *after* `model.layers[L]` is HF's
`output_hidden_states[L + 1]` (index 0 is the embeddings). Every hook here sits on the output of
`model.layers[L]`:

- `capture_residual`: read it (and optionally stop the forward there);
- `steering`: add a vector per batch row to it;
- `from_layer`: run the model from a given residual there (layers 0..L replaced by stand-ins).
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
    """Add vectors [batch, d] to the residual after `model.layers[layer]` (no-op for None).

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
    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


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
