"""Adaptive stages 2-3 (`discovery.adaptive.enabled`): the same tables as the exhaustive screen,
for a fraction of the generated answers.

The exhaustive screen answers every candidate x mode at the screen alpha, then every shortlisted
latent x mode x swept alpha, each with `samples_per_prompt` samples per core prompt. The adaptive
one spends answers only where they can change the selected set:

1. **screen** (stage 2, each shard job): every candidate x mode once at the screen alpha with
   `adaptive.samples_per_prompt` samples (1 by default), the unsteered baselines with
   `baseline_samples_per_prompt` (pooled copies of the zero vector in the same `generate` call).
2. **refine** (in the calibrate job, which sees every shard): up to `screen_rounds` rounds; a
   round gives another `samples_per_prompt` to the candidates whose IndPP interval (estimate
   +- z standard errors) contains the shortlist cut (midway between the `shortlist`-th and next
   estimate), at most `shortlist` of them (the closest to the cut in standard errors); the
   shortlist is then the top `calibrate.shortlist` by pooled IndPP (the exhaustive rule on the
   pooled rows).
3. **bisect** (stage 3): alpha* (the strongest swept alpha inside the incoherence budget) is
   found per shortlisted latent and mode by bisection over the ascending `calibrate.alphas`,
   assuming incoherence grows with alpha: a probe inside the budget raises the bracket's low
   end, one outside lowers its high end, until they are neighbours (~log2(len(alphas)) probes
   instead of every alpha; the screen's own measurement is reused when the screen alpha is on the
   sweep). Every probe of a round, over all latents and both modes, is one `score` call per model.
4. **confirm**: up to `confirm_rounds` rounds give another `samples_per_prompt` at alpha* to the
   latents whose ValidReduc standing is uncertain: a gain interval containing 0 (validity) or a
   repair-gain interval containing the selection cut (between the `select.size`-th and next
   score among the latents that can still be valid). Latents that cannot be valid (no alpha inside
   the budget, or a gain whose whole interval is <= 0) get no more answers; if none can be valid
   the job stops with `EmptyIntervention` naming the counts (unless allow_empty_interventions).

Repeated measurements of one condition are pooled (rates weighted by n; each round its own seed,
`discovery.seed + ROUND_SEED + round`), and the calibration table holds one pooled row per
measured (shortlisted latent, mode, swept alpha) plus the pooled unsteered rows: conditions never
run are absent, and `blockem.select.calibration_scores` ("the last alpha inside the budget, in
ascending order") reads the bisection's alpha* back from it. The screen tables keep round 1 (what
the shard jobs wrote); the refinement rows live in the calibration table for the shortlisted
latents only (so `indpp`, an extra rule, ranks round-1 estimates).
"""

from __future__ import annotations

import math
import sys

MODES = ("induce", "repair")
# every round of the calibrate job samples with discovery.seed + ROUND_SEED + its round number
# (the screen shards use discovery.seed + shard, as the exhaustive screen does)
ROUND_SEED = 1000
DEFAULTS = {"enabled": False, "samples_per_prompt": 1, "baseline_samples_per_prompt": 2,
            "screen_rounds": 1, "confirm_rounds": 2, "z": 1.0}
RATES = ("em", "incoherence", "refusal")


def settings(cfg_adaptive: dict | None) -> dict:
    """`discovery.adaptive` with its defaults filled in."""
    return {**DEFAULTS, **(cfg_adaptive or {})}


def enabled(d: dict) -> bool:
    """Whether a stage's `discovery` settings ask for the adaptive screen."""
    return bool((d.get("adaptive") or {}).get("enabled"))


def baseline_copies(a: dict) -> int:
    return max(1, a["baseline_samples_per_prompt"] // a["samples_per_prompt"])


# --- pooled measurements ------------------------------------------------------------------------

def _key(r: dict) -> tuple:
    return (int(r["latent"]), r["mode"], float(r["alpha"]))


class Pool:
    """Measurements of steering conditions, repeated ones pooled: rates weighted by n, the kept
    answers (`samples`) of the first measurement."""

    def __init__(self, rows=()):
        self.rows: dict[tuple, dict] = {}
        self.add(rows)

    def add(self, rows) -> None:
        for r in rows:
            k = _key(r)
            old = self.rows.get(k)
            if old is None:
                self.rows[k] = dict(r)
                continue
            n = old["n"] + r["n"]
            for f in RATES:
                if f in old and f in r and old[f] is not None and r[f] is not None:
                    old[f] = (old[f] * old["n"] + r[f] * r["n"]) / n
            old["n"] = n

    def get(self, latent: int, mode: str, alpha: float) -> dict | None:
        return self.rows.get((int(latent), mode, float(alpha)))

    def baselines(self) -> dict[str, dict]:
        return {m: r for (k, m, _), r in self.rows.items() if k == -1}

    def table(self, latents=None, alphas=None) -> list[dict]:
        """Baselines, then the rows of `latents` (all when None) at `alphas` (all when None), in
        a stable order (latent, mode, alpha)."""
        keep = None if latents is None else {int(k) for k in latents}
        grid = None if alphas is None else {float(a) for a in alphas}
        items = sorted(self.rows.items(), key=lambda kv: (kv[0][0] >= 0, kv[0]))
        out = [r for (k, m, a), r in items
               if k == -1 or ((keep is None or k in keep) and (grid is None or a in grid))]
        return [dict(r) for r in out]


# --- intervals ---------------------------------------------------------------------------------

def _var(p: float, n: int) -> float:
    """Variance of a rate from n answers, with one pseudo-count each way (never 0)."""
    q = (p * n + 1) / (n + 2)
    return q * (1 - q) / max(n, 1)


def gain_se(row: dict, base: dict) -> float:
    """Standard error of a condition's EM gain over its unsteered baseline."""
    return math.sqrt(_var(row["em"], row["n"]) + _var(base["em"], base["n"]))


def contested_at_cut(est: dict, se: dict, keep: int, z: float, limit: int | None = None) -> list:
    """The items whose interval (estimate +- z se) contains the cut between the `keep` best
    estimates and the rest (midway between the keep-th and the next); none if at most `keep`.
    `limit`: at most that many, the closest to the cut (in standard errors) first."""
    if len(est) <= keep:
        return []
    order = sorted(est, key=lambda k: (-est[k], k))
    cut = (est[order[keep - 1]] + est[order[keep]]) / 2
    near = [k for k in order if abs(est[k] - cut) <= z * se[k] + 1e-12]
    if limit is not None and len(near) > limit:
        close = sorted(near, key=lambda k: (abs(est[k] - cut) / max(se[k], 1e-12), k))[:limit]
        near = [k for k in near if k in set(close)]
    return near


# --- stage 2 ------------------------------------------------------------------------------------

def screen_estimates(pool: Pool, latents: list[dict], alpha: float, budget: dict):
    """IndPP per latent from the pooled rows at the screen alpha (`screen_scores`' rule) and its
    standard error."""
    from blockem.select import screen_scores

    rows = pool.table([k["latent"] for k in latents], [alpha])
    scores = screen_scores(rows, budget)
    base = pool.baselines()
    se = {}
    for k in scores:
        se[k] = math.sqrt(sum(gain_se(pool.get(k, m, alpha), base[m]) ** 2 for m in MODES
                              if pool.get(k, m, alpha) is not None))
    return scores, se


# --- stage 3 ------------------------------------------------------------------------------------

def bracket(pool: Pool, latent: int, mode: str, alphas: list[float], budget: dict):
    """(lo, hi) indices into the ascending `alphas`: hi = the smallest measured alpha outside the
    budget (len when none), lo = the largest measured alpha inside it below hi (-1 when none).
    alpha* is found when hi - lo <= 1 (then alphas[lo], or None when lo is -1)."""
    from blockem.select import within_budget

    base = pool.baselines()[mode]
    status = {}
    for i, a in enumerate(alphas):
        r = pool.get(latent, mode, a)
        if r is not None:
            status[i] = within_budget(r["incoherence"], base["incoherence"], budget)
    hi = min([i for i, ok in status.items() if not ok], default=len(alphas))
    lo = max([i for i, ok in status.items() if ok and i < hi], default=-1)
    return lo, hi


def next_probes(pool: Pool, latents: list[dict], alphas: list[float], budget: dict) -> list[dict]:
    """One bisection step for every (latent, mode) whose alpha* is not yet pinned down."""
    probes = []
    for k in latents:
        for mode in MODES:
            lo, hi = bracket(pool, k["latent"], mode, alphas, budget)
            if hi - lo > 1:
                probes.append({"latent": k["latent"], "sign": k["sign"], "mode": mode,
                               "alpha": alphas[(lo + hi) // 2]})
    return probes


def confirm_targets(pool: Pool, latents: list[dict], alphas: list[float], budget: dict,
                    size: int, z: float):
    """(conditions to measure again, standing) after the sweep: see the module docstring. The
    standing counts the latents that can still be valid and why the others cannot."""
    from blockem.select import calibration_scores

    cal = calibration_scores(pool.table([k["latent"] for k in latents], alphas), budget)
    base = pool.baselines()
    why = {"no induce alpha inside the budget": 0, "no repair alpha inside the budget": 0,
           "induce gain <= 0": 0, "repair gain <= 0": 0}
    alive, se, targets = {}, {}, []
    for k, s in cal.items():
        if s["alpha_ind"] is None or s["alpha_rep"] is None:
            why["no induce alpha inside the budget" if s["alpha_ind"] is None
                else "no repair alpha inside the budget"] += 1
            continue
        rows = {m: pool.get(k, m, s["alpha_ind" if m == "induce" else "alpha_rep"]) for m in MODES}
        ses = {m: gain_se(rows[m], base[m]) for m in MODES}
        gains = {m: s[f"{m}_gain"] for m in MODES}
        dead = [m for m in MODES if gains[m] + z * ses[m] <= 0]
        if dead:
            why[f"{dead[0]} gain <= 0"] += 1
            continue
        alive[k], se[k] = s, ses
        for m in MODES:  # validity uncertain: the interval holds 0
            if gains[m] - z * ses[m] <= 0:
                targets.append((k, m))
    scores = {k: s["score"] for k, s in alive.items()}
    for k in contested_at_cut(scores, {k: se[k]["repair"] for k in alive}, size, z):
        if (k, "repair") not in targets:
            targets.append((k, "repair"))
    conds = [{"latent": k, "sign": cal[k]["sign"], "mode": m,
              "alpha": cal[k]["alpha_ind" if m == "induce" else "alpha_rep"]}
             for k, m in sorted(targets, key=lambda t: (t[0], t[1]))]
    return conds, {"can_be_valid": len(alive), "shortlisted": len(cal), "cannot": why}


# --- measuring ----------------------------------------------------------------------------------

def measure(base, mis, sae, conds: list[dict], *, scale: float, score,
            baseline: int = 0) -> list[dict]:
    """Rates of steering conditions ({latent, sign, mode, alpha}), one `score` call per model
    (induce: the base; repair: the misaligned model); `baseline` > 0 adds that many copies of the
    unsteered condition per mode (pooled into one row, latent -1, alpha 0)."""
    import torch

    from blockem.sae import steering_vectors

    out = []
    for mode, model in (("induce", base), ("repair", mis)):
        cs = [c for c in conds if c["mode"] == mode]
        if not cs and not baseline:
            continue
        d = sae.W_dec.shape[1]
        vec = steering_vectors(sae, [c["latent"] for c in cs], [c["sign"] for c in cs],
                               [c["alpha"] for c in cs], scale, mode) if cs else torch.zeros(0, d)
        vec = torch.cat([torch.zeros(baseline, vec.shape[1]), vec.detach()])
        rates = score(model, vec, mode)
        if baseline:
            out += Pool([{"latent": -1, "sign": 0, "mode": mode, "alpha": 0.0, **r}
                         for r in rates[:baseline]]).table()
        out += [{"latent": c["latent"], "sign": c["sign"], "mode": mode, "alpha": c["alpha"], **r}
                for c, r in zip(cs, rates[baseline:])]
    return out


def screen_rows(ctx: dict, d: dict, pool_latents: list[dict], *, scorer, seed: int,
                keep: int) -> list[dict]:
    """Stage 2 of one shard, adaptive: every candidate once, `samples_per_prompt` samples.
    `scorer(ctx, d, samples, seed, keep)` makes the score function (`blockem.steer.scorer`)."""
    a = settings(d["adaptive"])
    conds = [{"latent": k["latent"], "sign": k["sign"], "mode": m, "alpha": d["screen"]["alpha"]}
             for m in MODES for k in pool_latents]
    return measure(ctx["base"], ctx["mis"], ctx["sae"], conds, scale=ctx["scale"],
                   score=scorer(ctx, d, a["samples_per_prompt"], seed, keep=keep),
                   baseline=baseline_copies(a))


def check_screen(screen: list[dict]) -> float:
    """The screen tables an adaptive calibration starts from: an unsteered row for both modes,
    one screen alpha, at least one candidate. Returns that alpha (checked before any model load)."""
    from blockem.errors import EmptyIntervention

    modes = {r["mode"] for r in screen if r["latent"] < 0}
    if modes != set(MODES):
        raise ValueError("adaptive calibration: the screen tables have no unsteered row for "
                         f"{sorted(set(MODES) - modes)}")
    s_alpha = sorted({float(r["alpha"]) for r in screen if r["latent"] >= 0})
    if not s_alpha:
        raise EmptyIntervention("adaptive calibration: the screen tables hold no candidate")
    if len(s_alpha) != 1:
        raise ValueError(f"adaptive calibration: the screen tables hold alphas {s_alpha}, "
                         f"expected the one screen alpha")
    return s_alpha[0]


def calibrate_rows(ctx: dict, d: dict, screen: list[dict], *, scorer, select_size: int,
                   keep: int, allow_empty: bool = False, log=None):
    """Stage 3, adaptive (steps 2-4 of the module docstring), from the shards' round-1 rows;
    `scorer` as in `screen_rows`. Returns (calibration rows, a record of the rounds for the
    provenance)."""
    from blockem.errors import EmptyIntervention

    a = settings(d["adaptive"])
    cal = d["calibrate"]
    budget = d["incoherence_budget"]
    alphas = sorted(float(x) for x in cal["alphas"])
    if log is None:
        def log(msg: str) -> None:  # stderr, flushed: in order with the progress lines
            print(f"[calibrate] {msg}", file=sys.stderr, flush=True)
    s_alpha = check_screen(screen)
    pool = Pool(screen)
    screened = {}
    for r in screen:
        if r["latent"] >= 0:
            screened.setdefault(int(r["latent"]), {"latent": int(r["latent"]), "sign": r["sign"]})
    cands = sorted(screened.values(), key=lambda k: k["latent"])
    record = {"rounds": []}

    def run(step: str, conds: list[dict]) -> None:
        n = len(record["rounds"]) + 1
        rows = measure(ctx["base"], ctx["mis"], ctx["sae"], conds, scale=ctx["scale"],
                       score=scorer(ctx, d, a["samples_per_prompt"], d["seed"] + ROUND_SEED + n,
                                    keep=keep))
        pool.add(rows)
        record["rounds"].append({"round": n, "step": step, "conditions": len(conds)})
        log(f"adaptive round {n} ({step}): {len(conds)} conditions")

    # 2. refine the shortlist cut
    for _ in range(a["screen_rounds"]):
        scores, se = screen_estimates(pool, cands, s_alpha, budget)
        est = {k: s["indpp"] for k, s in scores.items()}
        contested = contested_at_cut(est, se, cal["shortlist"], a["z"], limit=cal["shortlist"])
        if not contested:
            break
        run("refine", [{"latent": k, "sign": screened[k]["sign"], "mode": m, "alpha": s_alpha}
                       for k in contested for m in MODES])
    scores, _ = screen_estimates(pool, cands, s_alpha, budget)
    short = sorted(scores, key=lambda k: (-scores[k]["indpp"], k))[:cal["shortlist"]]
    latents = [screened[k] for k in short]
    record["shortlist"] = short
    if not latents:
        raise EmptyIntervention("adaptive calibration: the screen tables hold no candidate")
    # 3. bisect alpha* (the screen alpha's rows count when it is on the sweep)
    for _ in range(len(alphas) + 1):  # each probe halves an open bracket: <= log2 + 1 rounds
        if not (probes := next_probes(pool, latents, alphas, budget)):
            break
        run("bisect", probes)
    else:
        raise RuntimeError("adaptive calibration: the alpha bisection did not converge")
    # 4. confirm the uncertain
    standing = None
    for i in range(a["confirm_rounds"] + 1):
        conds, standing = confirm_targets(pool, latents, alphas, budget, select_size, a["z"])
        if i == a["confirm_rounds"] or not conds:
            break
        run("confirm", conds)
    record["standing"] = standing
    # confirmation pools more answers at alpha*, on the budget's edge: when that moves a pooled
    # incoherence across the budget, the bracket reopens and the table's alpha* falls back to the
    # next lower measured alpha (not re-bisected); say so rather than let it pass unseen
    reopened = sorted({(p["latent"], p["mode"])
                       for p in next_probes(pool, latents, alphas, budget)})
    record["reopened"] = [{"latent": k, "mode": m} for k, m in reopened]
    if reopened:
        log(f"{len(reopened)} alpha* bracket(s) reopened by the confirmation answers (alpha* "
            f"falls back to the next lower measured alpha): "
            + ", ".join(f"{k}/{m}" for k, m in reopened))
    if not standing["can_be_valid"]:
        why = "; ".join(f"{n} {w}" for w, n in standing["cannot"].items() if n)
        msg = (f"adaptive calibration: none of the {standing['shortlisted']} shortlisted latents "
               f"can be valid ({why})")
        if not allow_empty:
            raise EmptyIntervention(msg + ". Change discovery settings (candidates, shortlist, "
                                    "alphas, budget) or set allow_empty_interventions: true")
        log(msg + " (allow_empty_interventions: writing the table)")
    return pool.table(short, alphas), record
