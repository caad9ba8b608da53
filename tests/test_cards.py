"""Latent cards (blockem/cards.py, blockem/cards_html.py, blockem/contexts.py) on a small real
discovery output: stages 1-3 on the tiny organism of tests/test_discovery.py, then the contexts
pass, then the cards JSON, the page (also in a real headless browser) and the terminal view."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest
from test_discovery import COMPUTE, DISC, organism  # noqa: F401 - the organism fixture

KEY = "finance-s0"
# the sets select writes (random weights: validreduc finds nothing, an empty set), and a set of the
# stage-3 shortlist (calibrated latents; `write_shortlist_set`)
RULES = ("validreduc", "topdelta", "random", "shortlist")


def write_shortlist_set(latents, calibration_path):
    """`<KEY>-shortlist.json`: the validreduc set's document with the calibrated latents."""
    doc = json.loads((latents / f"{KEY}-validreduc.json").read_text())
    rows = pq.read_table(calibration_path).to_pylist()
    chosen = sorted({(r["latent"], r["sign"]) for r in rows if r["latent"] >= 0})
    ks = [{"latent": k, "sign": s, "alpha_rep": 0.3} for k, s in chosen]
    doc.update(name=f"{KEY}-shortlist", rule="shortlist", latents=ks, size=len(ks), empty=False,
               K_pos=[k for k, s in chosen if s > 0], K_neg=[k for k, s in chosen if s < 0])
    (latents / f"{KEY}-shortlist.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def results(organism, tmp_path_factory):  # noqa: F811 - the imported fixture
    """A results directory in the workflow's layout: stages 1-3, every set's cards."""
    from blockem.cards import cards_stage, discovery_paths
    from blockem.contexts import contexts_stage
    from blockem.sae import sae_stage
    from blockem.select import select_stage
    from blockem.shift import shift_stage
    from blockem.steer import calibrate_stage, screen_stage

    r, res = organism, tmp_path_factory.mktemp("results")
    disc, latents, sae = res / "discovery" / KEY, res / "latents", res / "sae" / "model"
    settings = {"discovery": copy.deepcopy(DISC), "compute": COMPUTE, "domain": "finance",
                "allow_empty_interventions": True}
    sae_stage(r / "base", r / "corpus.parquet", sae, {**DISC, "compute": COMPUTE})
    shift_stage(r / "base", r / "mis", sae, r / "prompts.parquet", None, disc / "shift.parquet",
                latents / f"{KEY}-direction.safetensors", settings)
    screens = [disc / "screen" / f"{s}.parquet" for s in range(2)]
    for shard, path in enumerate(screens):
        screen_stage(disc / "shift.parquet", r / "base", r / "mis", sae, r / "prompts.parquet",
                     path, settings, shard=shard)
    calibrate_stage(disc / "shift.parquet", screens, r / "base", r / "mis", sae,
                    r / "prompts.parquet", disc / "calibration.parquet", settings)
    select_stage(disc / "shift.parquet", screens, disc / "calibration.parquet", sae, latents, KEY,
                 settings)
    write_shortlist_set(latents, disc / "calibration.parquet")
    ctx_settings = {"activation": DISC["activation"], "layer": DISC["layer"], "conversations": 20,
                    "contexts": {"top_k": 4, "window": [6, 2], "top_tokens": 5,
                                 "max_length": 64},
                    "compute": COMPUTE}
    contexts_stage(r / "base", {KEY: r / "mis"},
                   {KEY: [latents / f"{KEY}-{x}.json" for x in RULES]}, sae, [r / "corpus.parquet"],
                   r / "prompts.parquet", latents / "contexts.parquet", latents / "unembed.parquet",
                   ctx_settings)
    for rule in RULES:
        set_path = latents / f"{KEY}-{rule}.json"
        cards_stage(set_path, latents / f"{KEY}-{rule}.html", latents / f"{KEY}-{rule}.cards.json",
                    **discovery_paths(set_path))
    return res


def _set(results, rule):
    return json.loads((results / "latents" / f"{KEY}-{rule}.json").read_text())


def _cards(results, rule):
    return json.loads((results / "latents" / f"{KEY}-{rule}.cards.json").read_text())


def test_kept_answers_leave_the_rates_unchanged(tiny_model, tokenizer, organism):  # noqa: F811
    """Keeping answers is a by-product: the same rates as without, answers to the same prompts in
    every condition, each with its judge label."""
    import torch

    from blockem.steer import judge_conditions, kept_indices

    prompts = pq.read_table(organism / "prompts.parquet").to_pylist()[:7]
    vectors = torch.zeros(2, 32)
    vectors[1, 0] = 4.0
    kw = dict(layer=1, samples=2, seed=3, gen={"temperature": 1.0, "max_new_tokens": 4,
                                               "batch_size": 64, "positions": "all"})
    plain = judge_conditions(tiny_model, tokenizer, prompts, vectors, **kw)
    kept = judge_conditions(tiny_model, tokenizer, prompts, vectors, keep=3, **kw)
    assert [{k: v for k, v in r.items() if k != "samples"} for r in kept] == plain
    assert kept_indices(7, 2, 3) == [0, 4, 8]  # the first sample of prompts 0, 2 and 4
    for r in kept:
        assert [s["prompt_id"] for s in r["samples"]] == [prompts[i]["prompt_id"]
                                                          for i in (0, 2, 4)]
        assert all(s["labels"][0] in ("aligned", "misaligned", "refusal", "incoherent")
                   for s in r["samples"])
    assert "samples" not in plain[0]


def test_card_json_contents(results):
    from blockem.select import calibration_scores, read_rows, screen_scores
    from blockem.steer import KEEP_ANSWERS

    disc = results / "discovery" / KEY
    shift = {r["latent"]: r for r in pq.read_table(disc / "shift.parquet").to_pylist()}
    screens = sorted((disc / "screen").glob("*.parquet"))
    budget = DISC["incoherence_budget"]
    screen = screen_scores(read_rows(screens), budget)
    cal_rows = read_rows([disc / "calibration.parquet"])
    calib = calibration_scores(cal_rows, budget)
    contexts = pq.read_table(results / "latents" / "contexts.parquet").to_pylist()
    for rule in RULES:
        latent_set, doc = _set(results, rule), _cards(results, rule)
        assert doc["set"] == f"{KEY}-{rule}" and doc["key"] == KEY and doc["scorer"] == "generate"
        assert [c["latent"] for c in doc["latents"]] == [k["latent"] for k in latent_set["latents"]]
        assert [f["stage"] for f in doc["funnel"]] == ["candidates", "screened", "shortlisted",
                                                       "valid", "selected"]
        assert [f["n"] for f in doc["funnel"]] == [
            sum(r["candidate_rank"] >= 0 for r in shift.values()), len(screen), len(calib),
            sum(s["valid"] for s in calib.values()), len(latent_set["latents"])]
        assert doc["sae"]["neuronpedia_id"] is None  # a trained SAE
        assert {p[0] for p in doc["scatter"]["points"]} == set(shift)  # 64 latents: all shown
        assert bool(doc["latents"]) == (rule != "validreduc")  # random weights: nothing valid
        for card, k in zip(doc["latents"], latent_set["latents"]):
            lat = card["latent"]
            assert card["sign"] == k["sign"] and card["group"] == ("K+" if k["sign"] > 0 else "K-")
            s1 = card["stage1"]
            for f in ("delta", "mean_base", "mean_mis", "density_base", "density_mis", "dense",
                      "candidate_rank"):
                assert s1[f] == shift[lat][f], f
            assert card["filters"]["candidate"] == (shift[lat]["candidate_rank"] >= 0)
            assert card["filters"]["screened"] == (lat in screen)
            assert card["filters"]["shortlisted"] == (lat in calib)
            assert card["filters"]["valid"] == bool(lat in calib and calib[lat]["valid"])
            if lat in calib:
                c = card["calibration"]
                assert (c["alpha_ind"], c["alpha_rep"], c["score"]) == (
                    calib[lat]["alpha_ind"], calib[lat]["alpha_rep"], calib[lat]["score"])
                for mode in ("induce", "repair"):
                    cv = card["curves"][mode]
                    assert cv["source"] == "calibration"
                    assert [p["alpha"] for p in cv["points"]] == DISC["calibrate"]["alphas"]
                    assert cv["unsteered"]["alpha"] == 0.0
                    for p in cv["points"]:
                        row = next(r for r in cal_rows if (r["latent"], r["mode"], r["alpha"])
                                   == (lat, mode, p["alpha"]))
                        assert (p["em"], p["incoherence"], p["n"]) == (
                            row["em"], row["incoherence"], row["n"])
                        assert p["em_sem"] == pytest.approx(
                            (row["em"] * (1 - row["em"]) / row["n"]) ** 0.5)
            if rule == "validreduc":  # the rule's own latents passed every filter
                assert all(card["filters"].values())
                assert card["calibration"]["score_rank"] == card["set_rank"]
            # generations kept by stages 2-3, beside the unsteered answer to the same prompt
            g = card["generations"]
            if lat in screen:
                assert g["available"], g
                for mode in ("repair", "induce"):
                    assert len(g[mode]["samples"]) == KEEP_ANSWERS
                    assert all(s["unsteered"] is not None and s["steered_labels"]
                               for s in g[mode]["samples"])
            else:
                assert not g["available"] and "not steered" in g["reason"]
            # contexts: the pass's rows for this latent, both sources and all three rankings
            mine = [r for r in contexts if r["latent"] == lat and r["key"] == KEY]
            assert mine
            for r in mine:
                got = card["contexts"][r["source"]][r["ranking"]][r["rank"]]
                assert (got["doc_id"], got["position"], got["value"]) == (
                    r["doc_id"], r["position"], r["value"])
            assert set(card["contexts"]) == {"corpus", "core"}
            assert len(card["unembed"]["promoted"]) == 5 == len(card["unembed"]["suppressed"])
            values = [t["value"] for t in card["unembed"]["promoted"]]
            assert values == sorted(values, reverse=True)
    # the contexts pass covered the union of every set's latents, one job
    union = {k["latent"] for rule in RULES for k in _set(results, rule)["latents"]}
    assert {r["latent"] for r in contexts} == union


def test_valid_latents_pass_every_filter(results, tmp_path):
    """Random weights leave ValidReduc empty; with the calibration's EM moved for one shortlisted
    latent (it induces and repairs), select finds it and its card says it passed every filter."""
    import pyarrow as pa

    from blockem.cards import build_cards, discovery_paths
    from blockem.io import read_provenance, write_table
    from blockem.select import select_stage

    res = tmp_path / "res"
    shutil.copytree(results, res)
    disc = res / "discovery" / KEY
    cal = disc / "calibration.parquet"
    rows = pq.read_table(cal).to_pylist()
    target = min(r["latent"] for r in rows if r["latent"] >= 0)
    for r in rows:
        if r["latent"] == target:
            r["em"] = 0.5 if r["mode"] == "induce" else 0.0
        elif r["latent"] == -1:
            r["em"] = 0.0 if r["mode"] == "induce" else 0.5
    write_table(cal, pa.Table.from_pylist(rows), read_provenance(cal))
    settings = {"discovery": copy.deepcopy(DISC), "compute": COMPUTE, "domain": "finance",
                "allow_empty_interventions": True}
    screens = sorted((disc / "screen").glob("*.parquet"))
    select_stage(disc / "shift.parquet", screens, cal, res / "sae" / "model", res / "latents", KEY,
                 settings)
    set_path = res / "latents" / f"{KEY}-validreduc.json"
    doc = build_cards(set_path, **discovery_paths(set_path))
    assert [c["latent"] for c in doc["latents"]] == [target]
    card = doc["latents"][0]
    assert all(card["filters"].values()), card["filters"]
    assert card["calibration"]["score"] == 0.5 and card["calibration"]["score_rank"] == 1
    assert card["calibration"]["alpha_rep"] == max(DISC["calibrate"]["alphas"])
    assert [f["n"] for f in doc["funnel"]][-2:] == [1, 1]
    assert card["curves"]["repair"]["unsteered"]["em"] == 0.5


def test_page_is_self_contained_with_every_card(results):
    for rule in RULES:
        page = (results / "latents" / f"{KEY}-{rule}.html").read_text()
        doc = _cards(results, rule)
        for c in doc["latents"]:
            assert f'id="latent-{c["latent"]}"' in page
        assert page.count('<article class="card"') == len(doc["latents"])
        # nothing fetched: no external script, stylesheet, image, font or frame
        assert not re.search(r"""<(script|img|iframe|link)[^>]+(src|href)=""", page)
        assert not re.search(r"url\(|@import|https?://(?!www\.neuronpedia\.org/)", page.replace(
            'xmlns="http://www.w3.org/2000/svg"', ""))
        assert "<svg" in page and "Discovery funnel" in page


def test_scorer_mc_cards_say_there_are_no_generations(results, tmp_path):
    """With discovery.scorer: mc stages 2-3 generate nothing: the card says so."""
    from blockem.cards import build_cards, discovery_paths
    from blockem.io import read_provenance, write_table

    paths = discovery_paths(results / "latents" / f"{KEY}-shortlist.json")
    prov = read_provenance(paths["calibration_path"])
    prov["settings"]["discovery"]["scorer"] = "mc"
    write_table(tmp_path / "cal.parquet",
                pq.read_table(paths["calibration_path"]).drop_columns(["samples"]), prov)
    paths["calibration_path"] = tmp_path / "cal.parquet"
    doc = build_cards(results / "latents" / f"{KEY}-shortlist.json", **paths)
    assert doc["scorer"] == "mc" and doc["incoherence_unit"].startswith("nats") and doc["latents"]
    for card in doc["latents"]:
        assert not card["generations"]["available"]
        assert "scorer is mc" in card["generations"]["reason"]
    from blockem.cards_html import render_page

    assert "scorer is mc" in render_page(doc)


def test_terminal_view(results, tmp_path, capsys):
    from blockem.__main__ import main

    set_path = results / "latents" / f"{KEY}-topdelta.json"
    doc = _cards(results, "topdelta")
    first = doc["latents"][0]["latent"]
    assert main(["latents", str(set_path)]) == 0
    out = capsys.readouterr().out
    assert "funnel: candidates" in out
    assert all(f"=== latent {c['latent']} " in out for c in doc["latents"])
    assert main(["latents", str(set_path), "--latent", str(first)]) == 0
    out = capsys.readouterr().out
    assert out.count("=== latent ") == 1 and f"=== latent {first} " in out
    assert "stage 1: Delta" in out and "top contexts" in out and "promoted:" in out
    assert main(["latents", str(set_path), "--latent", "99999"]) == 2
    # without the cards JSON beside it: computed from the discovery files that exist
    copy_dir = tmp_path / "res"
    shutil.copytree(results, copy_dir)
    (copy_dir / "latents" / f"{KEY}-topdelta.cards.json").unlink()
    assert main(["latents", str(copy_dir / "latents" / f"{KEY}-topdelta.json")]) == 0
    out = capsys.readouterr().out
    assert "computed from the discovery files" in out and f"=== latent {first} " in out


def test_neuronpedia_ids_of_pretrained_saes():
    from blockem.cards import neuronpedia_id, neuronpedia_url

    assert neuronpedia_id({"source": "pretrained",
                           "id": "goodfire-llama-3.1-8b-instruct/layer_19"}) \
        == "llama3.1-8b-it/19-resid-post-gf"
    # SAE ids with slashes (Gemma Scope)
    assert neuronpedia_id({"source": "pretrained",
                           "id": "gemma-scope-9b-it-res-canonical/layer_20/width_131k/canonical"}) \
        == "gemma-2-9b-it/20-gemmascope-res-131k"
    assert neuronpedia_id({"source": "pretrained", "id": "x/y"},
                          {"metadata": {"neuronpedia_id": "m/l"}}) == "m/l"
    assert neuronpedia_id({"source": "train", "id": "trained/topk-64-L1"}) is None
    assert neuronpedia_id({"source": "pretrained", "id": "no-such-release/x"}) is None
    assert neuronpedia_url("gemma-2-9b-it/20-gemmascope-res-131k", 7) == \
        "https://www.neuronpedia.org/gemma-2-9b-it/20-gemmascope-res-131k/7"


# --- the page in a real browser ---------------------------------------------------------------

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_page_renders_in_a_headless_browser_without_console_errors(results, tmp_path):
    """Debian's chromium loads the page from disk (no network), runs its script and dumps the DOM:
    every card is there, the script ran to its end (data-ready), nothing was logged to the console
    (the page logs nothing on its own, so any console line is an error or a warning)."""
    exe = _chromium()
    if exe is None:
        reason = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    for rule in RULES:
        page = results / "latents" / f"{KEY}-{rule}.html"
        doc = _cards(results, rule)
        r = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--user-data-dir="
             + str(tmp_path / f"profile-{rule}"), "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=3000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        dom = r.stdout
        assert 'data-ready="true"' in dom, "the page's script did not run to its end"
        for c in doc["latents"]:
            assert f'id="latent-{c["latent"]}"' in dom
        assert dom.count('<article class="card"') == len(doc["latents"])
        assert f"showing {len(doc['latents'])} of {len(doc['latents'])} latents" in dom
        console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
        assert not console, "\n".join(console)
