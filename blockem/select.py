"""Stage 2/3 scores and the latent-set selection rules.

- `validreduc` (default, the paper's rule): keep latents with a positive induction gain at
  alpha*_ind and a positive repair at alpha*_rep (alpha* = the strongest swept alpha whose
  incoherence stays inside the budget); score = EM(M_mis) - EM(M_mis steered at alpha*_rep);
  K = top `size`.
- `indpp`: the stage-2 ranking, induction gain + repair gain at the screen alpha.
- `topdelta`: the largest |Delta| of stage 1 (no causal test).
- `random`: a seeded sample of live latents.
- `union`: the union of other sets (`union_sets`).
Gains count only inside the incoherence budget: `flat` (incoherence <= value) or `relative`
(incoherence <= unsteered incoherence + value).
"""

from __future__ import annotations

import random
from pathlib import Path

from blockem.errors import EmptyIntervention

RULES = ("validreduc", "indpp", "topdelta", "random")


STEER_COLUMNS = ("latent", "sign", "mode", "alpha", "em", "incoherence")
SHIFT_COLUMNS = ("latent", "sign", "delta", "candidate_rank")


def read_rows(paths, what: str = "a steering table (stage 2 screen or stage 3 calibration)",
              columns=STEER_COLUMNS) -> list[dict]:
    from blockem.io import read_checked

    rows = []
    for p in paths:
        rows += read_checked(p, columns, what).to_pylist()
    return rows


def candidates(shift_path: Path) -> list[dict]:
    """The stage-1 pool, K+ candidates by rank then K- candidates by rank."""
    import pyarrow.parquet as pq

    t = pq.read_table(shift_path, columns=["latent", "sign", "delta", "candidate_rank"]).to_pylist()
    pool = [r for r in t if r["candidate_rank"] >= 0]
    return sorted(pool, key=lambda r: (-r["sign"], r["candidate_rank"]))


def within_budget(incoherence: float, unsteered: float, budget: dict) -> bool:
    limit = budget["value"] if budget["mode"] == "flat" else unsteered + budget["value"]
    return incoherence <= limit + 1e-12


def _baselines(rows):
    """The unsteered row of each mode; a mode with steered rows but no unsteered row is an error
    (its gains would have nothing to be measured against)."""
    base = {r["mode"]: r for r in rows if r["latent"] == -1}
    missing = sorted({r["mode"] for r in rows if r["latent"] >= 0} - set(base))
    if missing:
        raise ValueError(f"steering table: no unsteered row (latent -1) for mode(s) {missing}")
    return base


def _gain(row, base, budget) -> float:
    """EM moved in the intended direction by a condition, 0 outside the budget."""
    if not within_budget(row["incoherence"], base["incoherence"], budget):
        return 0.0
    return row["em"] - base["em"] if row["mode"] == "induce" else base["em"] - row["em"]


def screen_scores(rows: list[dict], budget: dict) -> dict[int, dict]:
    """Stage 2: latent -> induce_gain, repair_gain and their sum `indpp`."""
    base = _baselines(rows)
    out: dict[int, dict] = {}
    for r in rows:
        if r["latent"] < 0:
            continue
        s = out.setdefault(r["latent"], {"sign": r["sign"], "induce_gain": 0.0, "repair_gain": 0.0})
        s[f"{r['mode']}_gain"] = _gain(r, base[r["mode"]], budget)
    for s in out.values():
        s["indpp"] = s["induce_gain"] + s["repair_gain"]
    return out


def calibration_scores(rows: list[dict], budget: dict) -> dict[int, dict]:
    """Stage 3: latent -> alpha_ind, alpha_rep (None if no alpha is inside the budget), the gains
    there, `valid` (both gains > 0) and `score` (the repair reduction at alpha_rep).

    Only the rows present count: a partial sweep (the adaptive screen's, `blockem.adaptive`)
    gives the strongest *measured* alpha inside the budget, and a latent with no row of a mode has
    no alpha* there (invalid)."""
    base = _baselines(rows)
    out: dict[int, dict] = {}
    for r in sorted((r for r in rows if r["latent"] >= 0), key=lambda r: r["alpha"]):
        s = out.setdefault(r["latent"], {"sign": r["sign"], "alpha_ind": None, "alpha_rep": None,
                                         "induce_gain": 0.0, "repair_gain": 0.0})
        if within_budget(r["incoherence"], base[r["mode"]]["incoherence"], budget):
            key = "alpha_ind" if r["mode"] == "induce" else "alpha_rep"
            s[key] = r["alpha"]  # rows ascend in alpha: the last one inside the budget wins
            s[f"{r['mode']}_gain"] = _gain(r, base[r["mode"]], budget)
    for s in out.values():
        s["valid"] = s["induce_gain"] > 0 and s["repair_gain"] > 0
        s["score"] = s["repair_gain"]
    return out


def select(rule: str, size: int, *, shift: list[dict], screen: dict, calib: dict,
           seed: int = 0) -> list[dict]:
    """The chosen latents, best first: dicts with latent, sign and the scores behind the choice."""
    by_id = {r["latent"]: r for r in shift}
    if rule == "validreduc":
        keep = [k for k, s in calib.items() if s["valid"]]
        chosen = sorted(keep, key=lambda k: (-calib[k]["score"], k))[:size]
    elif rule == "indpp":
        chosen = sorted((k for k, s in screen.items() if s["indpp"] > 0),
                        key=lambda k: (-screen[k]["indpp"], k))[:size]
    elif rule == "topdelta":
        pool = [r for r in shift if r.get("candidate_rank", 0) >= 0 and r["delta"] != 0]
        chosen = [r["latent"] for r in sorted(pool, key=lambda r: (-abs(r["delta"]), r["latent"]))][:size]
    elif rule == "random":
        live = [r["latent"] for r in shift
                if max(r.get("density_base", 1.0), r.get("density_mis", 1.0)) > 0]
        chosen = random.Random(seed).sample(live, min(size, len(live)))
    else:
        raise ValueError(f"unknown selection rule {rule!r}; choose from {RULES}")
    out = []
    for k in chosen:
        sign = by_id[k]["sign"] if by_id[k]["sign"] != 0 else 1
        out.append({"latent": int(k), "sign": int(sign), "delta": by_id[k]["delta"],
                    **{f"screen_{n}": v for n, v in screen.get(k, {}).items() if n != "sign"},
                    **{f"calib_{n}": v for n, v in calib.get(k, {}).items() if n != "sign"}})
    return out


def empty_reason(rule: str, shift: list[dict], screen: dict, calib: dict) -> str:
    """Why a rule found nothing, in counts (for the error message)."""
    pool = sum(1 for r in shift if r.get("candidate_rank", 0) >= 0)
    if rule == "validreduc":
        return (f"{pool} candidates, {len(screen)} screened, {len(calib)} calibrated, "
                f"{sum(1 for s in calib.values() if s['valid'])} valid (non-zero induction and "
                f"repair inside the incoherence budget)")
    if rule == "indpp":
        return f"{len(screen)} screened, none with a positive induce + repair gain"
    return f"{pool} candidates"


def union_sets(sets: list[dict], name: str) -> dict:
    """Union of latent sets on the same SAE and layer; a latent keeps its first set's entry."""
    if len({(s["layer"], s["sae"]["id"]) for s in sets}) > 1:
        raise ValueError("cannot unite latent sets from different SAEs or layers")
    seen, latents = set(), []
    for s in sets:
        for k in s["latents"]:
            if k["latent"] not in seen:
                seen.add(k["latent"])
                latents.append(k)
    return {**sets[0], "name": name, "rule": "union", "sources": [s["name"] for s in sets],
            "latents": latents, **split_signs(latents)}


def split_signs(latents: list[dict]) -> dict:
    return {"K_pos": [k["latent"] for k in latents if k["sign"] > 0],
            "K_neg": [k["latent"] for k in latents if k["sign"] < 0]}


def with_repair_alphas(latents: list[dict], reference: list[dict], fallback: float) -> list[dict]:
    """Give each latent the alpha_rep of the reference latent at the same rank (so a control set
    is steered at the same strengths as the selected set)."""
    alphas = [k.get("calib_alpha_rep") for k in reference]
    out = []
    for i, k in enumerate(latents):
        a = alphas[i] if i < len(alphas) and alphas[i] is not None else fallback
        out.append({**k, "alpha_rep": a})
    return out


def select_stage(shift_path: Path, screen_paths: list[Path], calib_path: Path, sae_dir: Path,
                 out_dir: Path, name: str, settings: dict) -> None:
    """Write results/latents/<name>-<rule>.json for the default rule and every extra rule."""
    from blockem.io import provenance, write_json
    from blockem.sae import read_meta, steering_scale

    d = settings["discovery"]
    sel = d["select"]
    budget = d["incoherence_budget"]
    shift = read_rows([shift_path], "a stage-1 shift table (discovery/<key>/shift.parquet)",
                      SHIFT_COLUMNS)
    screen = screen_scores(read_rows(screen_paths), budget)
    calib = calibration_scores(read_rows([calib_path]), budget)
    default = select(sel["rule"], sel["size"], shift=shift, screen=screen, calib=calib,
                     seed=sel["seed"])
    allow = bool(settings.get("allow_empty_interventions"))
    if not default and not allow:
        why = empty_reason(sel["rule"], shift, screen, calib)
        raise EmptyIntervention(
            f"{name}: selection rule {sel['rule']!r} selected no latent ({why}); "
            f"an empty set would make steer_repair the unsteered model and blocking plain SFT. "
            f"Change discovery settings (candidates, shortlist, alphas, budget) or set "
            f"allow_empty_interventions: true to keep going with an empty set")
    meta = read_meta(sae_dir)
    scale = steering_scale(meta, d["scale"])
    fallback = max(d["calibrate"]["alphas"])
    for rule in [sel["rule"], *[r for r in sel["extra_rules"] if r != sel["rule"]]]:
        chosen = default if rule == sel["rule"] else select(
            rule, max(1, len(default)), shift=shift, screen=screen, calib=calib, seed=sel["seed"])
        if rule == sel["rule"]:
            latents = [{**k, "alpha_rep": k.get("calib_alpha_rep") or fallback} for k in chosen]
        else:
            latents = with_repair_alphas(chosen, default, fallback)
        doc = {"name": f"{name}-{rule}", "rule": rule, "domain": settings["domain"],
               "layer": meta["layer"], "sae": {k: meta[k] for k in ("source", "id")},
               "activation": d["activation"], "scale": scale, "size": len(latents),
               "latents": latents, **split_signs(latents), "empty": not latents,
               "provenance": provenance("select", settings, sel["seed"])}
        write_json(out_dir / f"{name}-{rule}.json", doc)
