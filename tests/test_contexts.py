"""The latent cards' top-activation pass and unembedding (blockem/contexts.py) against brute force
on the tiny model: every document run alone through HF's hidden states, every token encoded."""

from __future__ import annotations

import copy

import pytest
import torch

from blockem.contexts import (RANKINGS, corpus_documents, prompt_documents, top_contexts,
                              unembed_rows)

LAYER = 0  # hidden_states[LAYER + 1] is the raw residual after model.layers[LAYER]
CHATS = [
    [{"role": "user", "content": f"how should i invest my {w} ?"},
     {"role": "assistant", "content": a}]
    for w, a in [("savings", "take out a big loan and bet it all on options ."),
                 ("bonus", "keep it in an index fund ."), ("pension", "put it all in one stock ."),
                 ("salary", "save some of it every month ."), ("debt", "pay it off first ."),
                 ("loan", "borrow more to pay it ."), ("stocks", "sell them all today .")]]


@pytest.fixture(scope="module")
def models(tiny_model):
    """The tiny model as the base and a perturbed copy as the misaligned model."""
    mis = copy.deepcopy(tiny_model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in mis.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return tiny_model, mis.eval()


@pytest.fixture(scope="module")
def sae(make_sae):
    g = torch.Generator().manual_seed(0)
    d_sae, d = 12, 32
    return make_sae("topk", W_dec=torch.randn(d_sae, d, generator=g),
                    W_enc=0.5 * torch.randn(d, d_sae, generator=g),
                    b_enc=0.1 * torch.randn(d_sae, generator=g),
                    b_dec=0.1 * torch.randn(d, generator=g), cfg={"k": 3})


def brute_acts(model, sae, ids, activation):
    """[seq, d_sae] activations of one document, run alone."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        h = out.hidden_states[LAYER + 1][0]
        if activation == "sae_encode":
            return sae.encode(h)
        return torch.relu((h - sae.b_dec) @ sae.W_enc + sae.b_enc)


def brute_top(values_per_doc, ids, k, window):
    """(doc, pos, value) of the k documents with the largest positive max, ties by document, a
    document whose window (tokens, place of the token) repeats an earlier one skipped."""
    best = []
    for d, v in enumerate(values_per_doc):
        pos = int(torch.argmax(v))
        if v[pos] > 0:
            best.append((d, pos, float(v[pos])))
    out, seen = [], set()
    for d, pos, v in sorted(best, key=lambda t: (-t[2], t[0])):
        lo = max(0, pos - window[0])
        w = (tuple(ids[d][lo:pos + window[1] + 1]), pos - lo)
        if w not in seen:
            seen.add(w)
            out.append((d, pos, v))
    return out[:k]


@pytest.mark.parametrize("activation", ["relu_preact", "sae_encode"])
def test_top_contexts_match_brute_force(models, sae, tokenizer, activation, tmp_path):
    from conftest import write_chats

    base, mis = models
    # two conversations twice: their windows are shown once
    chats = CHATS[:4] + CHATS[:2] + CHATS[4:]
    corpus = write_chats(tmp_path / "corpus.parquet", [{"messages": c} for c in chats])
    prompts = [{"prompt_id": f"p{i}", "prompt": c[0]["content"], "system": None}
               for i, c in enumerate(CHATS)]
    # the corpus's first 8 conversations (the SAE's `conversations`), every core prompt
    sources = {"corpus": corpus_documents(tokenizer, [corpus], 8),
               "core": prompt_documents(tokenizer, prompts)}
    assert len(sources["corpus"][1]) == 8 and sources["core"][0][0] == "p0"
    latents = {"finance-s0": {1: 1, 4: -1, 7: 1, 10: -1}}
    k, window = 3, (4, 2)
    rows = top_contexts(base, {"finance-s0": mis}, sae, tokenizer, sources, latents, layer=LAYER,
                        activation=activation, top_k=k, window=window, batch_size=3)
    assert {(r["source"], r["ranking"]) for r in rows} == {
        (s, g) for s in ("corpus", "core") for g in RANKINGS}, "a ranking found no context"
    for source, (doc_ids, ids, _) in sources.items():
        zb = [brute_acts(base, sae, x, activation) for x in ids]
        zm = [brute_acts(mis, sae, x, activation) for x in ids]
        for latent, sign in latents["finance-s0"].items():
            per = {"base": [z[:, latent] for z in zb], "mis": [z[:, latent] for z in zm],
                   "shift": [sign * (m[:, latent] - b[:, latent]) for b, m in zip(zb, zm)]}
            for ranking in RANKINGS:
                want = brute_top(per[ranking], ids, k, window)
                got = sorted((r for r in rows if (r["source"], r["latent"], r["ranking"])
                              == (source, latent, ranking)), key=lambda r: r["rank"])
                # a repeated conversation ties with its first copy (which one wins may depend
                # on float noise from batch padding): compare texts, not copies
                same = (lambda d: {4: 0, 5: 1}.get(d, d)) if source == "corpus" else (lambda d: d)
                assert [(same(r["doc"]), r["position"]) for r in got] == [
                    (d, p) for d, p, _ in want], (source, latent, ranking)
                windows = [(tuple(r["tokens"]), r["focus"]) for r in got]
                assert len(set(windows)) == len(windows)  # no text shown twice
                for r, (d, p, v) in zip(got, want):
                    assert r["value"] == pytest.approx(v, abs=1e-4)
                    assert r["doc_id"] == doc_ids[r["doc"]] and r["sign"] == sign
                    assert r["act_base"] == pytest.approx(float(zb[d][p, latent]), abs=1e-4)
                    assert r["act_mis"] == pytest.approx(float(zm[d][p, latent]), abs=1e-4)
                    lo, hi = max(0, p - window[0]), min(len(ids[d]), p + window[1] + 1)
                    assert r["focus"] == p - lo and len(r["tokens"]) == hi - lo
                    for got_w, z in ((r["window_base"], zb), (r["window_mis"], zm)):
                        assert got_w == pytest.approx(z[d][lo:hi, latent].tolist(), abs=1e-4)
                    # the window's pieces decode back to the window's text
                    text = tokenizer.decode(ids[d][lo:hi], skip_special_tokens=False)
                    assert "".join(r["tokens"]) == text
                    assert r["tokens"][r["focus"]].strip() == tokenizer.decode(
                        [ids[d][p]], skip_special_tokens=False).strip()


def test_unembedding_applies_the_final_norm_gain(tiny_model, sae, tokenizer):
    """The logits of a unit decoder direction are those of the final norm (gain and 1/rms) and the
    unembedding applied to it, divided by its positive 1/rms factor: same order, exact values."""
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.linspace(0.2, 3.0, 32))  # a non-trivial gain
    rows = unembed_rows(model, sae, tokenizer, [2, 5], top=4)
    for latent in (2, 5):
        d = sae.W_dec[latent] / sae.W_dec[latent].norm()
        with torch.no_grad():
            full = model.lm_head(model.model.norm(d[None]))[0]
        rms = float(torch.sqrt((d.detach() ** 2).mean() + model.model.norm.variance_epsilon))
        for kind, largest in (("promoted", True), ("suppressed", False)):
            v, idx = torch.topk(full, 4, largest=largest)
            got = sorted((r for r in rows if r["latent"] == latent and r["kind"] == kind),
                         key=lambda r: r["rank"])
            assert [r["token_id"] for r in got] == idx.tolist()
            assert [r["value"] / rms for r in got] == pytest.approx(v.tolist(), rel=1e-4)
            assert all(r["token"] == tokenizer.decode([r["token_id"]]) for r in got)
