"""The adaptive stages 2-3 (blockem/adaptive.py).

Two levels: (1) the round logic against an oracle scorer whose true rates are known (a real
sae-lens SAE whose decoder rows are the unit axes, so every steering vector says which latent and
alpha it steers), compared with the exhaustive screen + calibration + ValidReduc on the same
oracle; (2) the screen and calibrate stage functions end to end on the tiny organism of
test_discovery (random weights, generated answers, the toy judge), the exhaustive and the adaptive
way, counted by blockem.usage."""

from __future__ import annotations

import copy
import random

import pyarrow.parquet as pq
import pytest
import torch

from blockem import adaptive, usage
from blockem.errors import EmptyIntervention
from blockem.select import calibration_scores, screen_scores, select

FLAT = {"mode": "flat", "value": 0.10}
ALPHAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]
PROMPTS = 31


def truth(n_latents: int = 24, seed: int = 0) -> dict:
    """Per latent: sign, induce and repair EM slopes, and the alpha where incoherence crosses the
    flat 0.10 budget (incoherence 0.02 + 0.08 (alpha / limit)^2: rises with alpha)."""
    rng = random.Random(seed)
    out = {}
    for k in range(n_latents):
        out[k] = {"sign": 1 if k % 2 == 0 else -1,
                  "ind": 0.0 if k % 5 == 3 else rng.uniform(0.0, 0.6),
                  "rep": rng.uniform(0.0, 0.7),
                  "limit": rng.choice([0.15, 0.25, 0.35, 0.45, 0.55, 0.7, 0.9, 1.2])}
    return out


BASE_EM = {"induce": 0.02, "repair": 0.78}


def oracle(t: dict, *, noise: bool = False, calls: list | None = None):
    """A stand-in for blockem.steer.scorer (the factory the adaptive rounds are given): score(model, vectors, mode) -> rates per condition,
    read off each vector (the SAE's decoder rows are unit axes: latent = argmax |v|, alpha =
    |v| / scale); with `noise`, binomial rates over samples x PROMPTS answers from the seed."""
    def make(ctx, d, samples, seed, keep=0):
        rng = random.Random(seed)

        def score(model, vectors, mode):
            out = []
            for v in vectors:
                v = v.detach()
                norm = float(v.norm())
                if norm == 0:
                    em, inc = BASE_EM[mode], 0.02
                else:
                    k = int(v.abs().argmax())
                    a = norm / ctx["scale"]
                    g = t[k]["ind" if mode == "induce" else "rep"] * a
                    em = (min(1.0, BASE_EM[mode] + g) if mode == "induce"
                          else max(0.0, BASE_EM[mode] - g))
                    inc = min(1.0, 0.02 + 0.08 * (a / t[k]["limit"]) ** 2)
                n = samples * PROMPTS
                if noise:
                    em = sum(rng.random() < em for _ in range(n)) / n
                    inc = sum(rng.random() < inc for _ in range(n)) / n
                out.append({"em": em, "incoherence": inc, "refusal": 0.0, "n": n})
            if calls is not None:
                calls.append((mode, len(vectors), samples))
            return out
        return score
    return make


@pytest.fixture()
def axes_sae(make_sae):
    return make_sae("standard", W_dec=torch.eye(24))


def disc(**adapt) -> dict:
    return {"seed": 0, "incoherence_budget": FLAT,
            "screen": {"alpha": 0.5, "shards": 2, "samples_per_prompt": 3},
            "calibrate": {"shortlist": 10, "alphas": ALPHAS, "samples_per_prompt": 3},
            "adaptive": {**adaptive.settings({"enabled": True, **adapt}), "select_size": 8}}


def ctx_of(sae) -> dict:
    return {"base": "base-model", "mis": "mis-model", "sae": sae, "scale": 2.0}


def exhaustive(t, sae, calls):
    from blockem.steer import steer_table

    make = oracle(t, calls=calls)
    ctx = ctx_of(sae)
    pool = [{"latent": k, "sign": t[k]["sign"]} for k in t]
    screen = steer_table("b", "m", sae, pool, [0.5], scale=2.0, score=make(ctx, None, 3, 0))
    s = screen_scores(screen, FLAT)
    short = sorted(s, key=lambda k: (-s[k]["indpp"], k))[:10]
    calib = steer_table("b", "m", sae, [{"latent": k, "sign": t[k]["sign"]} for k in short],
                        ALPHAS, scale=2.0, score=make(ctx, None, 3, 0))
    return screen, calib


def run_adaptive(t, sae, d, calls, noise=False):
    make = oracle(t, noise=noise, calls=calls)
    ctx = ctx_of(sae)
    pool = [{"latent": k, "sign": t[k]["sign"]} for k in t]
    screen = []
    for shard in range(2):
        screen += adaptive.screen_rows(ctx, d, pool[shard::2], scorer=make, seed=shard, keep=0)
    calib, record = adaptive.calibrate_rows(ctx, d, screen, scorer=make, select_size=8, keep=0,
                                            log=lambda *a: None)
    return screen, calib, record


def answers(calls) -> int:
    return sum(n * samples * PROMPTS for _, n, samples in calls)


def test_pool_weights_repeated_measurements_by_n():
    p = adaptive.Pool([{"latent": 3, "sign": 1, "mode": "repair", "alpha": 0.5, "em": 0.5,
                        "incoherence": 0.0, "refusal": 0.0, "n": 10, "samples": ["first"]}])
    p.add([{"latent": 3, "sign": 1, "mode": "repair", "alpha": 0.5, "em": 1.0,
            "incoherence": 0.3, "refusal": 0.0, "n": 30, "samples": ["second"]}])
    r = p.get(3, "repair", 0.5)
    assert r["n"] == 40 and r["em"] == pytest.approx(0.875)
    assert r["incoherence"] == pytest.approx(0.225) and r["samples"] == ["first"]
    assert p.table([4]) == [] and len(p.table([3])) == 1


def test_contested_at_cut():
    est = {1: 0.9, 2: 0.5, 3: 0.45, 4: 0.1}
    se = {1: 0.05, 2: 0.05, 3: 0.05, 4: 0.05}
    assert adaptive.contested_at_cut(est, se, 2, 1.0) == [2, 3]  # cut 0.475
    assert adaptive.contested_at_cut(est, se, 1, 1.0) == []      # cut 0.7: nobody near it
    assert adaptive.contested_at_cut(est, se, 4, 1.0) == []      # everybody is in
    wide = {k: 0.5 for k in est}
    assert adaptive.contested_at_cut(est, wide, 2, 1.0) == [1, 2, 3, 4]
    assert adaptive.contested_at_cut(est, wide, 2, 1.0, limit=2) == [2, 3]


def test_bisection_finds_the_exhaustive_alpha_star_with_fewer_probes(axes_sae):
    """Noise-free oracle: the adaptive table gives every shortlisted latent the alpha*_ind and
    alpha*_rep of the exhaustive sweep, the same shortlist and the same ValidReduc set, for
    under a quarter of the answers."""
    t = truth()
    ex_calls, ad_calls = [], []
    ex_screen, ex_calib = exhaustive(t, axes_sae, ex_calls)
    screen, calib, record = run_adaptive(t, axes_sae, disc(), ad_calls)
    ex_c, ad_c = calibration_scores(ex_calib, FLAT), calibration_scores(calib, FLAT)
    assert sorted(ad_c) == sorted(ex_c) == sorted(record["shortlist"])
    for k in ex_c:
        for f in ("alpha_ind", "alpha_rep", "valid"):
            assert ad_c[k][f] == ex_c[k][f], (k, f)
        assert ad_c[k]["score"] == pytest.approx(ex_c[k]["score"])
    shift = [{"latent": k, "sign": t[k]["sign"], "delta": 1.0, "candidate_rank": 0} for k in t]
    ex_set = select("validreduc", 8, shift=shift, screen=screen_scores(ex_screen, FLAT), calib=ex_c)
    ad_set = select("validreduc", 8, shift=shift, screen=screen_scores(screen, FLAT), calib=ad_c)
    assert [k["latent"] for k in ad_set] == [k["latent"] for k in ex_set] and len(ad_set) == 8
    # one row per condition; never a latent outside the shortlist or an alpha off the sweep
    keys = [(r["latent"], r["mode"], r["alpha"]) for r in calib]
    assert len(keys) == len(set(keys))
    assert {r["alpha"] for r in calib if r["latent"] >= 0} <= set(ALPHAS)
    assert len(calib) - 2 < 10 * len(ALPHAS) * 2
    assert answers(ad_calls) * 4 <= answers(ex_calls), (answers(ad_calls), answers(ex_calls))
    # one score call per model per round: the rounds are batched
    assert len(ad_calls) == 2 * (2 + len(record["rounds"]))


def test_noisy_rounds_are_seeded_and_pool_their_answers(axes_sae):
    t = truth(seed=1)
    a1, a2 = [], []
    s1, c1, r1 = run_adaptive(t, axes_sae, disc(), a1, noise=True)
    s2, c2, r2 = run_adaptive(t, axes_sae, disc(), a2, noise=True)
    assert c1 == c2 and r1 == r2 and a1 == a2
    steps = [r["step"] for r in r1["rounds"]]
    assert steps == sorted(steps, key=["refine", "bisect", "confirm"].index)
    # pooled n: each measurement adds samples_per_prompt x prompts
    assert all(r["n"] % PROMPTS == 0 for r in c1)
    assert {r["n"] for r in c1 if r["latent"] == -1} == {2 * 2 * PROMPTS}  # 2 shards x 2 copies
    assert any(r["n"] > PROMPTS for r in c1 if r["latent"] >= 0)  # something was confirmed
    # more rounds of confirmation cost more answers; none costs fewer
    a0 = []
    run_adaptive(t, axes_sae, disc(confirm_rounds=0, screen_rounds=0), a0, noise=True)
    assert answers(a0) < answers(a1)


def test_no_latent_that_can_be_valid_is_an_error_naming_why(axes_sae):
    t = {k: {**v, "limit": 0.05} for k, v in truth().items()}  # incoherent at every alpha
    with pytest.raises(EmptyIntervention, match="none of the 10 shortlisted latents can be "
                                                "valid.*no induce alpha inside the budget"):
        run_adaptive(t, axes_sae, disc(), [])
    ctx = ctx_of(axes_sae)
    screen = adaptive.screen_rows(ctx, disc(), [{"latent": k, "sign": t[k]["sign"]} for k in t],
                                  scorer=oracle(t), seed=0, keep=0)
    rows, record = adaptive.calibrate_rows(ctx, disc(), screen, scorer=oracle(t), select_size=8,
                                           keep=0, allow_empty=True, log=lambda *a: None)
    assert record["standing"]["can_be_valid"] == 0
    assert not any(s["valid"] for s in calibration_scores(rows, FLAT).values())


# --- end to end on the tiny organism (stage functions, generated answers, the toy judge) --------

@pytest.fixture(scope="module")
def discovered(organism):
    """The tiny organism's SAE and stage-1 table (test_discovery's organism)."""
    from blockem.sae import sae_stage
    from blockem.shift import shift_stage

    from test_discovery import COMPUTE, DISC

    r = organism
    d = copy.deepcopy(DISC)
    d.update(screen={"alpha": 0.5, "shards": 2, "samples_per_prompt": 3},
             calibrate={"shortlist": 3, "alphas": ALPHAS, "samples_per_prompt": 3},
             incoherence_budget={"mode": "relative", "value": 0.5})
    settings = {"discovery": d, "compute": COMPUTE, "domain": "finance",
                "allow_empty_interventions": True}
    sae_stage(r / "base", r / "corpus.parquet", r / "sae", {**d, "compute": COMPUTE})
    shift_stage(r / "base", r / "mis", r / "sae", r / "prompts.parquet", None,
                r / "shift.parquet", r / "direction.safetensors", settings)
    return r, settings


from test_discovery import organism  # noqa: E402,F401  (the module's fixture)


def stages_2_3(r, settings, tag):
    from blockem.steer import calibrate_stage, screen_stage

    before = usage.snapshot()
    screens = [r / f"{tag}-screen{s}.parquet" for s in range(2)]
    for shard in range(2):
        screen_stage(r / "shift.parquet", r / "base", r / "mis", r / "sae", r / "prompts.parquet",
                     screens[shard], settings, shard=shard)
    calibrate_stage(r / "shift.parquet", screens, r / "base", r / "mis", r / "sae",
                    r / "prompts.parquet", r / f"{tag}-calib.parquet", settings)
    after = usage.snapshot()
    return screens, r / f"{tag}-calib.parquet", {k: after[k] - before[k] for k in after}


def test_adaptive_stages_end_to_end_write_tables_select_and_cards_read(discovered, tmp_path):
    from blockem.cards import build_cards
    from blockem.io import read_provenance
    from blockem.select import read_rows, select_stage

    r, settings = discovered
    ex_screens, ex_calib, ex_use = stages_2_3(r, settings, "ex")
    ad_settings = copy.deepcopy(settings)
    ad_settings["discovery"]["adaptive"] = {**adaptive.settings({"enabled": True}),
                                            "select_size": 2}
    ad_screens, ad_calib, ad_use = stages_2_3(r, ad_settings, "ad")
    # the same columns as the exhaustive tables
    for ex, ad in [(ex_screens[0], ad_screens[0]), (ex_calib, ad_calib)]:
        assert pq.read_schema(ad).names == pq.read_schema(ex).names
    cal = read_rows([ad_calib])
    record = read_provenance(ad_calib)["adaptive"]
    assert sorted({x["latent"] for x in cal if x["latent"] >= 0}) == sorted(record["shortlist"])
    screened = {x["latent"] for p in ad_screens for x in read_rows([p])}
    assert set(record["shortlist"]) < screened and len(record["shortlist"]) == 3
    # the table holds what the rounds measured: alpha* read back = the bisection's bracket
    pool = adaptive.Pool(cal)
    budget = settings["discovery"]["incoherence_budget"]
    for k, s in calibration_scores(cal, budget).items():
        for mode, key in (("induce", "alpha_ind"), ("repair", "alpha_rep")):
            lo, hi = adaptive.bracket(pool, k, mode, ALPHAS, budget)
            assert hi - lo == 1 and s[key] == (ALPHAS[lo] if lo >= 0 else None)
    # the whole of stages 2-3 (6 candidates, shortlist 3: the screen's baselines weigh more than
    # on the toy's 24 / 10): at least 3x fewer generated answers and tokens
    assert ad_use["generated_sequences"] * 3 <= ex_use["generated_sequences"], (ad_use, ex_use)
    assert ad_use["generated_tokens"] * 3 <= ex_use["generated_tokens"], (ad_use, ex_use)
    assert ad_use["judge_requests"] <= ex_use["judge_requests"]  # the toy judge asks no endpoint
    # select and the latent cards read the adaptive tables
    out = tmp_path / "latents"
    select_stage(r / "shift.parquet", ad_screens, ad_calib, r / "sae", out, "finance-s0",
                 ad_settings)
    doc = build_cards(out / "finance-s0-validreduc.json", shift_path=r / "shift.parquet",
                      screen_paths=ad_screens, calibration_path=ad_calib, sae_dir=r / "sae")
    assert doc["funnel"][2]["n"] == 3  # shortlisted
    for card in doc["latents"]:
        assert card["filters"]["shortlisted"] and card["curves"]["repair"]["points"]


# --- the setting ----------------------------------------------------------------------------------

def test_the_setting_leaves_exhaustive_configs_hashes_alone_and_is_validated(config):
    from blockem.config import stage_settings, validate
    from blockem.errors import ConfigError
    from blockem.hashing import settings_hash

    stages = ("shift", "screen", "calibrate", "select", "joint")
    before = {s: settings_hash(stage_settings(config, s, "finance")) for s in stages}
    config["discovery"]["adaptive"] = {"enabled": False, "samples_per_prompt": 2}
    validate(config)
    assert {s: settings_hash(stage_settings(config, s, "finance")) for s in stages} == before
    config["discovery"]["adaptive"] = {"enabled": True}
    validate(config)
    on = {s: stage_settings(config, s, "finance") for s in stages}
    for s in ("screen", "calibrate", "select"):
        assert on[s]["discovery"]["adaptive"]["samples_per_prompt"] == 1  # defaults filled in
    assert on["calibrate"]["discovery"]["adaptive"]["select_size"] == 8
    assert "adaptive" not in on["shift"]["discovery"] and "adaptive" not in on["joint"]["discovery"]
    assert settings_hash(on["joint"]) == before["joint"]
    for bad, match in [({"enabled": True, "zz": 1}, "unknown key 'discovery.adaptive.zz'"),
                       ({"samples_per_prompt": 1}, "enabled"),
                       ({"enabled": True, "samples_per_prompt": 2,
                         "baseline_samples_per_prompt": 3}, "multiple"),
                       ({"enabled": True, "samples_per_prompt": 0}, "samples_per_prompt")]:
        config["discovery"]["adaptive"] = bad
        with pytest.raises(ConfigError, match=match):
            validate(config)
    config["discovery"]["adaptive"] = {"enabled": True}
    config["discovery"]["scorer"] = "mc"
    with pytest.raises(ConfigError, match="scorer 'generate'"):
        validate(config)


def test_the_overlay_validates():
    from blockem.config import DEFAULT_CONFIG, REPO, load_config, stage_settings

    cfg = load_config(DEFAULT_CONFIG, REPO / "config" / "toy-screen.yaml",
                      REPO / "config" / "toy-adaptive.yaml")
    assert stage_settings(cfg, "calibrate", "auto")["discovery"]["adaptive"]["enabled"]
    assert cfg["discovery"]["domains"] == cfg["finetune"]["domains"]
    assert len(cfg["finetune"]["domains"]) == 6
