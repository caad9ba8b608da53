"""Stage 2 (induce/repair screen) and stage 3 (alpha sweeps): steering by SAE decoder directions.

Steering at layer L adds alpha * scale * d_k / ||d_k|| to the residual after `model.layers[L]` at
the configured positions (`discovery.steer_positions`: every position, or the prompt only). Induce steers the base with +alpha * s_k (pushes latent k the way misalignment
did); repair steers the misaligned model with -alpha * s_k. Every (latent, alpha) condition of a
shard is one block of rows in the same batched `generate` call (a per-row steering vector), and
answers are labelled by the same judge as the evaluation. The vectors are made by
`blockem.sae.steering_vectors` (one latent) and `blockem.sae.set_vector` (a whole set, jointly) and
added by `blockem.hooks.steering`. `discovery.adaptive` swaps the exhaustive stage 2-3 grids
for rounds that spend answers only where they can change the selected set (`blockem.adaptive`,
same tables with the conditions not run absent).

With the `generate` scorer the screen and calibration tables also keep a few of the judged answers
of every condition (column `samples`: `KEEP_ANSWERS` answers, to the same prompts in every
condition, with each judge's label), read by the latent cards (blockem/cards.py). They are a
by-product of the answers already generated and judged: the rates and the settings (hashes) are
unchanged, and nothing is generated again for them.
"""

from __future__ import annotations

from pathlib import Path

from blockem import adaptive
from blockem.sae import set_vector, steering_vectors

# judged answers kept per steering condition in the screen / calibration tables (latent cards):
# not a setting, so changing it reruns nothing and changes no settings hash
KEEP_ANSWERS = 3


def kept_indices(n_prompts: int, samples: int, keep: int) -> list[int]:
    """Row indices (within one condition's prompts x samples block) of the answers kept: the first
    sample of `keep` prompts spread evenly over the prompt list, the same in every condition (so a
    steered answer sits beside the unsteered answer to the same prompt)."""
    if keep <= 0 or n_prompts <= 0:
        return []
    prompts = sorted({(j * n_prompts) // keep for j in range(min(keep, n_prompts))})
    return [i * samples for i in prompts]


def judge_conditions(model, tokenizer, prompts: list[dict], vectors, *, layer: int,
                     samples: int, gen: dict, seed: int, device: str = "cpu",
                     name: str = "steer", judge=None, keep: int = 0) -> list[dict]:
    """Misalignment, incoherence and refusal rates of each steering condition.

    `vectors` is [n_conditions, d] (a zero row = unsteered); all conditions x prompts x samples go
    through `generate_rows` together; `gen` holds its sampling settings and steered `positions`.
    `judge` is a `blockem.judge.llm.Labeller` (default: the toy's exact judge); with several LLM
    judges the rates are averaged over judges. `keep` > 0 adds `samples` to each condition's dict:
    `keep` of its judged answers (`kept_indices`) with prompt_id, prompt, response and `labels`
    (one per judge); the rates do not depend on it."""
    import torch

    from blockem.chat import generation_prompts
    from blockem.generate import generate_rows
    from blockem.judge.llm import Labeller, rates

    ids = generation_prompts(tokenizer, [p["prompt"] for p in prompts],
                             [p.get("system") for p in prompts])
    per_cond = [(p, i) for i in range(len(prompts)) for p in [ids[i]] * samples]
    rows = [p for _ in range(len(vectors)) for p, _ in per_cond]
    steer = torch.repeat_interleave(vectors, len(per_cond), dim=0)
    answers = generate_rows(model, tokenizer, rows, steer=steer, layer=layer, seed=seed,
                            device=device, name=name, **gen)
    judge = judge or Labeller({"kind": "toy"})
    rows = [{**prompts[i], "response": a} for (_, i), a in zip(per_cond * len(vectors), answers)]
    per_judge = judge(rows, name=name)
    n = len(per_cond)
    out = [{**rates([labels[c * n:(c + 1) * n] for labels in per_judge]), "n": n}
           for c in range(len(vectors))]
    kept = kept_indices(len(prompts), samples, keep)
    if kept:
        for c, r in enumerate(out):
            r["samples"] = [{"prompt_id": rows[j].get("prompt_id"), "prompt": rows[j]["prompt"],
                             "response": rows[j]["response"],
                             "labels": [labels[j] for labels in per_judge]}
                            for j in (c * n + i for i in kept)]
    return out


def scorer(ctx: dict, d: dict, samples: int, seed: int, keep: int = 0):
    """`score(model, vectors, name)` -> one rates dict (em, incoherence, refusal, n) per steering
    condition, by `discovery.scorer`: `generate` samples answers on the core prompts and judges
    them (`judge_conditions`, keeping `keep` answers per condition); `mc` scores the core MC items
    teacher-forced, no generation (`blockem.mc.mc_conditions`: em = MC EM rate, incoherence =
    neutral NLL shift in nats; no answers to keep)."""
    if d.get("scorer", "generate") == "mc":
        from blockem.mc import mc_conditions

        items, neutral = ctx["mc"]
        return lambda model, vectors, name: mc_conditions(
            model, ctx["tok"], items, neutral, vectors, layer=ctx["layer"],
            max_length=ctx["max_length"], batch_size=d["batch_size"], device=ctx["device"])
    return lambda model, vectors, name: judge_conditions(
        model, ctx["tok"], ctx["prompts"], vectors, layer=ctx["layer"], samples=samples,
        gen=_gen(d), seed=seed, device=ctx["device"], name=name, judge=ctx["judge"], keep=keep)


def steer_table(base, mis, sae, latents: list[dict], alphas: list[float], *, scale: float,
                score) -> list[dict]:
    """Rows (latent, sign, mode, alpha, em, incoherence, refusal, n, and `samples` when the
    scorer keeps answers) for every latent x alpha x mode, plus one unsteered row per mode
    (latent -1, alpha 0): one `score` pass per model."""
    import torch

    results = []
    for mode, model in (("induce", base), ("repair", mis)):
        conds = [(k, a) for k in latents for a in alphas]
        vec = steering_vectors(sae, [k["latent"] for k, _ in conds], [k["sign"] for k, _ in conds],
                               [a for _, a in conds], scale, mode)
        vec = torch.cat([torch.zeros(1, vec.shape[1]), vec])
        rates = score(model, vec, mode)
        results.append({"latent": -1, "sign": 0, "mode": mode, "alpha": 0.0, **rates[0]})
        for (k, a), r in zip(conds, rates[1:]):
            results.append({"latent": k["latent"], "sign": k["sign"], "mode": mode, "alpha": a, **r})
    return results


def _gen(d: dict) -> dict:
    return {"temperature": d["temperature"], "max_new_tokens": d["max_new_tokens"],
            "batch_size": d["batch_size"], "positions": d["steer_positions"]}


def screen_stage(shift_path: Path, base_dir, mis_dir, sae_dir, prompts_path, out: Path,
                 settings: dict, shard: int, threads: int = 1, judge_cache=None,
                 mc=None) -> None:
    """Stage 2 for one shard of the candidate pool (every `shards`-th candidate); with
    `discovery.adaptive` every candidate once with its few samples (`blockem.adaptive`)."""
    import pyarrow as pa

    from blockem.io import provenance, write_table
    from blockem.select import candidates
    from blockem.shift import load_discovery

    d = settings["discovery"]
    sc = d["screen"]
    pool = candidates(shift_path)[shard::sc["shards"]]
    ctx = load_discovery(settings, base_dir, mis_dir, sae_dir, prompts_path, threads,
                         judge_cache=judge_cache, mc=mc)
    if adaptive.enabled(d):  # every candidate once, few samples (blockem/adaptive.py)
        rows = adaptive.screen_rows(ctx, d, pool, scorer=scorer, seed=d["seed"] + shard,
                                    keep=KEEP_ANSWERS)
    else:
        rows = steer_table(ctx["base"], ctx["mis"], ctx["sae"], pool, [sc["alpha"]],
                           scale=ctx["scale"],
                           score=scorer(ctx, d, sc["samples_per_prompt"], d["seed"] + shard,
                                        keep=KEEP_ANSWERS))
    write_table(out, pa.Table.from_pylist(rows),
                provenance("screen", settings, d["seed"] + shard, shard=shard, scale=ctx["scale"]))


def calibrate_stage(shift_path: Path, screen_paths: list[Path], base_dir, mis_dir, sae_dir,
                    prompts_path, out: Path, settings: dict, threads: int = 1,
                    judge_cache=None, mc=None) -> None:
    """Stage 3 sweeps: every alpha for the stage-2 shortlist, both modes; with
    `discovery.adaptive` the shortlist cut refined, alpha* bisected and the uncertain confirmed
    (`blockem.adaptive`: the same columns, rows of conditions not run absent)."""
    import pyarrow as pa

    from blockem.io import provenance, write_table
    from blockem.select import read_rows, screen_scores
    from blockem.shift import load_discovery

    d = settings["discovery"]
    cal = d["calibrate"]
    if adaptive.enabled(d):  # refine, bisect alpha*, confirm (blockem/adaptive.py)
        screen = read_rows(screen_paths)
        adaptive.check_screen(screen)  # the inputs, before any model load
        ctx = load_discovery(settings, base_dir, mis_dir, sae_dir, prompts_path, threads,
                             judge_cache=judge_cache, mc=mc)
        rows, record = adaptive.calibrate_rows(
            ctx, d, screen, scorer=scorer, select_size=d["adaptive"]["select_size"],
            keep=KEEP_ANSWERS,
            allow_empty=bool(settings.get("allow_empty_interventions")))
        write_table(out, pa.Table.from_pylist(rows),
                    provenance("calibrate", settings, d["seed"], scale=ctx["scale"],
                               adaptive=record))
        return
    scores = screen_scores(read_rows(screen_paths), d["incoherence_budget"])
    shortlist = sorted(scores, key=lambda k: (-scores[k]["indpp"], k))[:cal["shortlist"]]
    latents = [{"latent": k, "sign": scores[k]["sign"]} for k in shortlist]
    ctx = load_discovery(settings, base_dir, mis_dir, sae_dir, prompts_path, threads,
                         judge_cache=judge_cache, mc=mc)
    rows = steer_table(ctx["base"], ctx["mis"], ctx["sae"], latents, list(cal["alphas"]),
                       scale=ctx["scale"],
                       score=scorer(ctx, d, cal["samples_per_prompt"], d["seed"],
                                    keep=KEEP_ANSWERS))
    write_table(out, pa.Table.from_pylist(rows),
                provenance("calibrate", settings, d["seed"], scale=ctx["scale"]))


def joint_strength_stage(set_path: Path, base_dir, mis_dir, sae_dir, prompts_path, out: Path,
                         settings: dict, threads: int = 1, judge_cache=None,
                         mc=None) -> None:
    """Calibrate the joint repair steering of a latent set on the core prompts.

    Each latent's alpha*_rep was found alone; their sum can overshoot. The largest factor of
    `calibrate.joint_factors` whose core incoherence stays inside the budget is kept (0 if none),
    and written with the layer and steered positions: what `steer_repair` evaluation cells (the
    set and its random control, same strengths) use."""
    import json

    import torch

    from blockem.errors import EmptyIntervention
    from blockem.io import provenance, write_json
    from blockem.select import within_budget
    from blockem.shift import load_discovery

    d = settings["discovery"]
    cal = d["calibrate"]
    allow = bool(settings.get("allow_empty_interventions"))
    latent_set = json.loads(Path(set_path).read_text())
    if not latent_set.get("latents"):
        if not allow:
            raise EmptyIntervention(f"{set_path}: the latent set is empty, nothing to steer "
                                    f"(allow_empty_interventions: true keeps going)")
        write_json(out, {"set": latent_set.get("name"), "factor": 0.0, "empty": True,
                         "reason": "empty latent set", "layer": latent_set.get("layer"),
                         "positions": d["steer_positions"], "unsteered": None, "sweep": [],
                         "provenance": provenance("joint_strength", settings, d["seed"])})
        return
    ctx = load_discovery(settings, base_dir, mis_dir, sae_dir, prompts_path, threads,
                         with_base=False, judge_cache=judge_cache, mc=mc)
    factors = sorted(cal["joint_factors"], reverse=True)
    vectors = torch.stack([torch.zeros(ctx["sae"].W_dec.shape[1])]
                          + [set_vector(latent_set, ctx["sae"], f) for f in factors]).detach()
    rates = scorer(ctx, d, cal["samples_per_prompt"], d["seed"])(ctx["mis"], vectors, "joint")
    unsteered = rates[0]
    table = [{"factor": f, **r} for f, r in zip(factors, rates[1:])]
    ok = [t for t in table if within_budget(t["incoherence"], unsteered["incoherence"],
                                            d["incoherence_budget"])]
    factor = ok[0]["factor"] if ok else 0.0
    reason = None
    if not ok:
        sweep = ", ".join(f"{t['factor']:g}: {t['incoherence']:.2f}" for t in table)
        reason = (f"no factor of calibrate.joint_factors keeps core incoherence inside the "
                  f"budget {d['incoherence_budget']} (factor: incoherence = {sweep}; unsteered "
                  f"{unsteered['incoherence']:.2f})")
        if not allow:
            raise EmptyIntervention(f"{latent_set['name']}: {reason}; factor 0 would evaluate the "
                                    f"unsteered model as steer_repair. Add smaller factors or set "
                                    f"allow_empty_interventions: true to keep going")
    write_json(out, {"set": latent_set["name"], "factor": factor, "empty": not ok,
                     "reason": reason, "layer": ctx["layer"],
                     "positions": d["steer_positions"], "unsteered": unsteered, "sweep": table,
                     "provenance": provenance("joint_strength", settings, d["seed"])})
