"""Latent cards: what the selected latents are, one card per latent of a latent set.

For every selected set `<results>/latents/<key>-<rule>.json` the rule `latent_cards` writes
`<key>-<rule>.cards.json` (this module, `build_cards`) and `<key>-<rule>.html` (a self-contained
page, `blockem.cards_html`); `python -m blockem latents <set.json> [--latent K]` prints them
(`format_cards`), from the JSON beside the set or, without it, from whatever discovery files exist.

A card gathers, for one latent, what the discovery stages wrote about it:

- stage 1 (`discovery/<key>/shift.parquet`): Delta, mean activation and firing density in both
  models, sign (K+ rises under misalignment, K- falls), dense flag, rank in the candidate pool;
- stages 2-3 (`screen/<shard>.parquet`, `calibration.parquet`, scored as `blockem.select` scores
  them): induce and repair curves over alpha (EM and incoherence with SEM), alpha*_ind, alpha*_rep,
  the ValidReduc score, and which filter it passed (candidate -> screened -> shortlisted -> valid ->
  selected);
- the answers stages 2-3 kept (`blockem.steer.KEEP_ANSWERS` per condition): the misaligned model
  repaired by this latent alone and the base induced by it, each beside the unsteered answer to the
  same prompt (none with `discovery.scorer: mc`, which generates nothing);
- top-activating contexts and the decoder direction through the unembedding
  (`latents/contexts.parquet`, `latents/unembed.parquet`: `blockem.contexts`);
- a Neuronpedia link for pretrained SAEs that Neuronpedia hosts (sae-lens's pretrained SAE
  directory names their Neuronpedia ids).

This module imports neither torch nor sae_lens: the card jobs are cheap.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from blockem.cards_html import FILTERS, render_page

NEURONPEDIA = "https://www.neuronpedia.org"
SCATTER_MAX = 2500  # plotted latents (all candidates and set members, then the largest |Delta|)


# --- Neuronpedia ------------------------------------------------------------------------------

def _pretrained_directory() -> Path | None:
    """sae-lens's pretrained SAE directory (pretrained_saes.yaml), found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("sae_lens")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "pretrained_saes.yaml"
        if path.exists():
            return path
    return None


def neuronpedia_id(meta: dict, sae_cfg: dict | None = None) -> str | None:
    """The Neuronpedia id (e.g. `llama3.1-8b-it/19-resid-post-gf`) of a pretrained SAE: from its
    saved config when sae-lens recorded it there, else from sae-lens's pretrained SAE directory by
    release and SAE id (`meta["id"]` = `<release>/<sae_id>`). None for trained or local SAEs."""
    if meta.get("source") != "pretrained":
        return None
    cfg = sae_cfg or {}
    for d in (cfg, cfg.get("metadata") or {}):
        if d.get("neuronpedia_id"):
            return d["neuronpedia_id"]
    path = _pretrained_directory()
    if path is None:
        return None
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open() as f:
        directory = yaml.load(f, Loader=loader)
    sae_id = str(meta.get("id", ""))
    for cut in [i for i, ch in enumerate(sae_id) if ch == "/"]:
        release, sid = sae_id[:cut], sae_id[cut + 1:]
        for entry in (directory.get(release) or {}).get("saes") or []:
            if entry.get("id") == sid:
                return entry.get("neuronpedia")
    return None


def neuronpedia_url(np_id: str | None, latent: int) -> str | None:
    return f"{NEURONPEDIA}/{np_id}/{latent}" if np_id else None


# --- reading ----------------------------------------------------------------------------------

def _sem(p, n) -> float | None:
    if p is None or not n or not 0.0 <= p <= 1.0:
        return None
    return math.sqrt(p * (1 - p) / n)


def _point(row: dict, rate_incoherence: bool) -> dict:
    return {"alpha": row["alpha"], "em": row["em"], "em_sem": _sem(row["em"], row.get("n")),
            "incoherence": row["incoherence"],
            "incoherence_sem": _sem(row["incoherence"], row.get("n")) if rate_incoherence else None,
            "refusal": row.get("refusal"), "n": row.get("n")}


def _samples(steered: dict | None, unsteered: dict | None) -> list[dict]:
    """Kept answers of a steered condition beside the unsteered answers to the same prompts."""
    if not steered or not steered.get("samples"):
        return []
    plain = {s["prompt"]: s for s in (unsteered or {}).get("samples") or []}
    out = []
    for s in steered["samples"]:
        u = plain.get(s["prompt"]) or {}
        out.append({"prompt_id": s.get("prompt_id"), "prompt": s["prompt"],
                    "steered": s["response"], "steered_labels": list(s.get("labels") or []),
                    "unsteered": u.get("response"),
                    "unsteered_labels": list(u.get("labels") or [])})
    return out


def _provenance(path) -> dict:
    from blockem.io import read_provenance

    try:
        return read_provenance(path)
    except Exception:  # noqa: BLE001 - a file without provenance: cards say less, not fail
        return {}


def _scorer(prov: dict) -> str:
    return ((prov.get("settings") or {}).get("discovery") or {}).get("scorer", "generate")


def build_cards(set_path: Path, *, shift_path: Path | None = None, screen_paths=(),
                calibration_path: Path | None = None, contexts_path: Path | None = None,
                unembed_path: Path | None = None, sae_dir: Path | None = None,
                key: str | None = None) -> dict:
    """The cards document of one latent set (module docstring); missing inputs leave their parts
    empty with a note saying why."""
    import pyarrow.parquet as pq

    from blockem.select import calibration_scores, read_rows, screen_scores

    latent_set = json.loads(Path(set_path).read_text())
    rule = latent_set.get("rule", "")
    name = latent_set.get("name") or Path(set_path).stem
    key = key or (name[:-len(rule) - 1] if rule and name.endswith("-" + rule) else name)
    notes: list[str] = []
    settings = (latent_set.get("provenance") or {}).get("settings") or {}
    disc = settings.get("discovery") or {}
    budget = disc.get("incoherence_budget")

    exists = lambda p: bool(p) and Path(p).exists()  # noqa: E731
    shift = pq.read_table(shift_path).to_pylist() if exists(shift_path) else []
    if not shift:
        notes.append("no stage-1 shift table: stage 1 statistics are missing")
    shift_disc = ((_provenance(shift_path).get("settings") or {}).get("discovery") or {}
                  if shift else {})
    screen_paths = [p for p in screen_paths if Path(p).exists()]
    screen_rows = read_rows(screen_paths) if screen_paths else []
    cal_rows = read_rows([calibration_path]) if exists(calibration_path) else []
    prov = _provenance(calibration_path) if cal_rows else (
        _provenance(screen_paths[0]) if screen_paths else {})
    pdisc = (prov.get("settings") or {}).get("discovery") or {}
    budget = budget or pdisc.get("incoherence_budget") or {"mode": "flat", "value": 0.1}
    scorer = _scorer(prov) if prov else disc.get("scorer", "generate")
    rate_incoherence = scorer != "mc"
    screen = screen_scores(screen_rows, budget) if screen_rows else {}
    calib = calibration_scores(cal_rows, budget) if cal_rows else {}

    meta, sae_cfg = {}, {}
    if sae_dir and (Path(sae_dir) / "blockem_sae.json").exists():
        meta = json.loads((Path(sae_dir) / "blockem_sae.json").read_text())
        if (Path(sae_dir) / "cfg.json").exists():
            sae_cfg = json.loads((Path(sae_dir) / "cfg.json").read_text())
    meta = {**(latent_set.get("sae") or {}), **meta}
    np_id = neuronpedia_id(meta, sae_cfg)

    by_id = {r["latent"]: r for r in shift}
    pool = [r for r in shift if r.get("candidate_rank", -1) >= 0]
    pool_size = {s: sum(1 for r in pool if r["sign"] == s) for s in (1, -1)}
    by_abs = {r["latent"]: i + 1 for i, r in enumerate(
        sorted(shift, key=lambda r: (-abs(r["delta"]), r["latent"])))}
    indpp_rank = {k: i + 1 for i, k in enumerate(
        sorted(screen, key=lambda k: (-screen[k]["indpp"], k)))}
    valid = [k for k, s in calib.items() if s["valid"]]
    score_rank = {k: i + 1 for i, k in enumerate(
        sorted(valid, key=lambda k: (-calib[k]["score"], k)))}
    base_rows = {("screen", r["mode"]): r for r in screen_rows if r["latent"] == -1}
    base_rows.update({("calibration", r["mode"]): r for r in cal_rows if r["latent"] == -1})
    screen_alpha = next((r["alpha"] for r in screen_rows if r["latent"] >= 0), None)

    contexts, unembed = {}, {}
    if contexts_path and Path(contexts_path).exists():
        for r in pq.read_table(contexts_path).to_pylist():
            if r["key"] == key:
                contexts.setdefault(r["latent"], []).append(r)
    else:
        notes.append("no contexts table (rule latent_contexts): top-activating contexts missing")
    unembed_method = None
    if unembed_path and Path(unembed_path).exists():
        unembed_method = _provenance(unembed_path).get("method")
        for r in pq.read_table(unembed_path).to_pylist():
            unembed.setdefault(r["latent"], []).append(r)
    else:
        notes.append("no unembedding table (rule latent_contexts): token effects missing")
    gen_note = None
    if scorer == "mc":
        gen_note = ("discovery.scorer is mc: stages 2-3 scored multiple-choice items "
                    "teacher-forced and generated no answers, so there are none to show")
    elif not any("samples" in r for r in screen_rows + cal_rows):
        gen_note = ("the screen and calibration tables keep no answers (written before they kept "
                    "them): rerun the screen and calibrate jobs to keep a few per latent")

    cards = []
    for i, k in enumerate(latent_set.get("latents") or []):
        lat = int(k["latent"])
        sign = int(k.get("sign") or 1)
        s1 = by_id.get(lat)
        stage1 = None
        if s1:
            stage1 = {f: s1.get(f) for f in ("delta", "mean_base", "mean_mis", "density_base",
                                              "density_mis", "dense", "candidate_rank")}
            stage1.update(sign=s1.get("sign"), abs_delta_rank=by_abs[lat], d_sae=len(shift),
                          pool_size=pool_size.get(s1.get("sign"), 0))
        sc = screen.get(lat)
        screened = {"alpha": screen_alpha, **sc} if sc else None
        if sc:
            screened["indpp_rank"] = indpp_rank[lat]
            for mode in ("induce", "repair"):
                row = next((r for r in screen_rows
                            if r["latent"] == lat and r["mode"] == mode), None)
                screened[mode] = _point(row, rate_incoherence) if row else None
        ca = calib.get(lat)
        curves, calibrated = {}, None
        for mode in ("induce", "repair"):
            src = "calibration" if ca else "screen"
            rows = cal_rows if ca else screen_rows
            pts = [r for r in rows if r["latent"] == lat and r["mode"] == mode]
            b = base_rows.get((src, mode))
            curves[mode] = {"source": src if pts else None,
                            "unsteered": _point(b, rate_incoherence) if b else None,
                            "points": [_point(r, rate_incoherence)
                                       for r in sorted(pts, key=lambda r: r["alpha"])]}
        if ca:
            calibrated = {**ca, "score_rank": score_rank.get(lat), "n_valid": len(valid)}
        filters = {
            "candidate": bool(s1 and s1.get("candidate_rank", -1) >= 0),
            "screened": sc is not None,
            "shortlisted": ca is not None,
            "induces": bool(ca and ca["induce_gain"] > 0),
            "repairs": bool(ca and ca["repair_gain"] > 0),
            "valid": bool(ca and ca["valid"]),
            "selected": True,
        }
        gens = {"available": False, "reason": gen_note}
        if gen_note is None:
            gens = {"available": True, "reason": None}
            for mode, alpha_key in (("repair", "alpha_rep"), ("induce", "alpha_ind")):
                alpha, src, rows = None, None, []
                if ca and ca.get(alpha_key) is not None:
                    alpha, src, rows = ca[alpha_key], "calibration", cal_rows
                elif sc:
                    alpha, src, rows = screen_alpha, "screen", screen_rows
                steered = next((r for r in rows if r["latent"] == lat and r["mode"] == mode
                                and r["alpha"] == alpha), None)
                gens[mode] = {"alpha": alpha, "source": src,
                              "samples": _samples(steered, base_rows.get((src, mode)))}
            if not (gens["repair"]["samples"] or gens["induce"]["samples"]):
                gens.update(available=False, reason="this latent was not steered in stages 2-3 "
                            "(outside the screened pool), so no answers were kept for it")
        ctx = {}
        for r in sorted(contexts.get(lat, []), key=lambda r: r["rank"]):
            ctx.setdefault(r["source"], {}).setdefault(r["ranking"], []).append(
                {**{f: r[f] for f in ("rank", "doc_id", "position", "value", "act_base", "act_mis",
                                      "tokens", "focus")},
                 # per-token shading: 4 decimals are plenty, and keep the files small
                 **{f: [None if v is None else round(v, 4) for v in r[f]]
                    for f in ("window_base", "window_mis")}})
        ue = None
        if lat in unembed:
            ue = {kind: [{"token": r["token"], "token_id": r["token_id"], "value": r["value"]}
                         for r in sorted(unembed[lat], key=lambda r: r["rank"])
                         if r["kind"] == kind] for kind in ("promoted", "suppressed")}
        cards.append({
            "latent": lat, "sign": sign, "group": "K+" if sign > 0 else "K-", "set_rank": i + 1,
            "alpha_rep": k.get("alpha_rep"), "stage1": stage1, "screen": screened,
            "calibration": calibrated, "curves": curves, "filters": filters,
            "generations": gens, "contexts": ctx or None, "unembed": ue,
            "neuronpedia": neuronpedia_url(np_id, lat)})

    funnel = [
        {"stage": "candidates", "n": len(pool),
         "what": f"top {shift_disc.get('candidates_per_sign', 'N')} latents by positive and by "
                 f"negative Delta (stage 1)"
                 + (", dense latents excluded" if shift_disc.get("exclude_dense") else "")},
        {"stage": "screened", "n": len(screen),
         "what": f"steered once, alpha {screen_alpha} (stage 2 induce/repair)"},
        {"stage": "shortlisted", "n": len(calib),
         "what": "best IndPP (induce + repair gain), swept over alpha (stage 3)"},
        {"stage": "valid", "n": len(valid),
         "what": "induce and repair gains > 0 within the incoherence budget"},
        {"stage": "selected", "n": len(cards), "what": f"rule {rule}"},
    ]
    in_set = {c["latent"]: c["sign"] for c in cards}
    scatter = _scatter(shift, in_set)
    unsteered = {m: _point(b, rate_incoherence) for (src, m), b in base_rows.items()
                 if src == ("calibration" if cal_rows else "screen")}
    return {
        "set": name, "rule": rule, "key": key, "domain": latent_set.get("domain"),
        "layer": latent_set.get("layer", meta.get("layer")),
        "sae": {"source": meta.get("source"), "id": meta.get("id"), "d_sae": meta.get("d_sae"),
                "neuronpedia_id": np_id},
        "activation": latent_set.get("activation"), "scale": latent_set.get("scale"),
        "scorer": scorer, "incoherence_budget": budget,
        "incoherence_unit": "rate" if rate_incoherence else "nats (neutral NLL shift)",
        "calibration_alphas": sorted({r["alpha"] for r in cal_rows if r["latent"] >= 0}),
        "screen_alpha": screen_alpha, "unsteered": unsteered,
        "size": len(cards), "K_pos": latent_set.get("K_pos", []),
        "K_neg": latent_set.get("K_neg", []), "empty": not cards,
        "funnel": funnel, "scatter": scatter, "unembed_method": unembed_method,
        "notes": notes, "latents": cards,
    }


def _scatter(shift: list[dict], in_set: dict[int, int]) -> dict:
    """Points of the Delta scatter: every candidate and set member, then the largest |Delta| of the
    rest up to SCATTER_MAX (a 131k-latent SAE would make a page of megabytes)."""
    must = [r for r in shift if r["latent"] in in_set or r.get("candidate_rank", -1) >= 0]
    rest = sorted((r for r in shift if r not in must),
                  key=lambda r: (-abs(r["delta"]), r["latent"]))
    shown = must + rest[:max(0, SCATTER_MAX - len(must))]
    return {"n_latents": len(shift), "n_shown": len(shown),
            "points": [[r["latent"], r["mean_base"], r["delta"],
                        1 if r["latent"] in in_set else 0,
                        1 if r.get("candidate_rank", -1) >= 0 else 0,
                        1 if r.get("dense") else 0] for r in shown],
            "columns": ["latent", "mean_base", "delta", "selected", "candidate", "dense"]}


def discovery_paths(set_path: Path) -> dict:
    """The files a set's cards read, by the workflow's layout (`<results>/latents/<set>.json`)."""
    set_path = Path(set_path)
    doc = json.loads(set_path.read_text())
    rule, name = doc.get("rule", ""), doc.get("name") or set_path.stem
    key = name[:-len(rule) - 1] if rule and name.endswith("-" + rule) else name
    results = set_path.parent.parent
    disc = results / "discovery" / key
    return {"key": key, "shift_path": disc / "shift.parquet",
            "screen_paths": sorted((disc / "screen").glob("*.parquet")),
            "calibration_path": disc / "calibration.parquet",
            "contexts_path": set_path.parent / "contexts.parquet",
            "unembed_path": set_path.parent / "unembed.parquet",
            "sae_dir": results / "sae" / "model"}


def cards_path(set_path: Path) -> Path:
    """`<set>.cards.json` beside `<set>.json`."""
    set_path = Path(set_path)
    return set_path.with_name(set_path.stem + ".cards.json")


def cards_stage(set_path: Path, out_html: Path, out_json: Path, **paths) -> None:
    """Write the cards JSON and the page of one latent set."""
    from blockem.io import atomic_path

    doc = build_cards(set_path, **paths)
    with atomic_path(out_json) as tmp:  # compact: the windows' numbers make an indented file big
        tmp.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")
    with atomic_path(out_html) as tmp:
        tmp.write_text(render_page(doc), encoding="utf-8")
    print(f"[latent_cards] {doc['set']}: {len(doc['latents'])} cards -> {out_html}",
          file=sys.stderr)


# --- terminal ---------------------------------------------------------------------------------

SPARK = "▁▂▃▄▅▆▇█"


def _f(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x else f"{x:.{digits}f}"
    return str(x)


def _spark(values) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return ""
    lo = min(vals)  # min-max: the shape of the curve (the numbers are printed beside it)
    span = max(max(vals) - lo, 1e-9)
    return "".join(SPARK[max(0, min(7, int((v - lo) / span * 7.999)))] if v is not None else " "
                   for v in values)


def format_summary(doc: dict) -> str:
    sae = doc["sae"]
    lines = [f"latent set {doc['set']}  (rule {doc['rule']}, domain {doc['domain']}, "
             f"layer {doc['layer']}, SAE {sae.get('id')}, activation {doc['activation']}, "
             f"scorer {doc['scorer']})",
             "funnel: " + " -> ".join(f"{f['stage']} {f['n']}" for f in doc["funnel"]),
             f"K+ {doc['K_pos']}  K- {doc['K_neg']}"]
    for mode, p in sorted(doc.get("unsteered", {}).items()):
        model = "base" if mode == "induce" else "misaligned"
        lines.append(f"unsteered {model}: EM {_f(p['em'])}  incoherence {_f(p['incoherence'])}")
    lines += [f"note: {n}" for n in doc.get("notes", [])]
    return "\n".join(lines)


def _window(c: dict, which: str) -> str:
    toks = [t.replace("\n", "\\n") for t in c["tokens"]]
    f = c["focus"]
    return ("".join(toks[:f]) + "[[" + toks[f] + "]]" + "".join(toks[f + 1:])).strip()


def format_card(card: dict, doc: dict) -> str:
    s1, cal, scr = card["stage1"], card["calibration"], card["screen"]
    out = [f"=== latent {card['latent']}  {card['group']}  (#{card['set_rank']} of {doc['set']})"
           + (f"  {card['neuronpedia']}" if card["neuronpedia"] else "")]
    if s1:
        rank = (f"#{s1['candidate_rank'] + 1} of {s1['pool_size']} "
                f"{'K+' if (s1['sign'] or 0) > 0 else 'K-'} candidates"
                if s1["candidate_rank"] >= 0 else "outside the candidate pool")
        out.append(f"stage 1: Delta {_f(s1['delta'])} (|Delta| rank {s1['abs_delta_rank']} of "
                   f"{s1['d_sae']}); mean base {_f(s1['mean_base'])} -> misaligned "
                   f"{_f(s1['mean_mis'])}; density {_f(s1['density_base'])} -> "
                   f"{_f(s1['density_mis'])}; dense {_f(s1['dense'])}; {rank}")
    if scr:
        out.append(f"stage 2: alpha {_f(scr['alpha'])}: induce gain {_f(scr['induce_gain'])}, "
                   f"repair gain {_f(scr['repair_gain'])}, IndPP {_f(scr['indpp'])} "
                   f"(rank {scr['indpp_rank']})")
    if cal:
        out.append(f"stage 3: alpha*_ind {_f(cal['alpha_ind'])}, "
                   f"alpha*_rep {_f(cal['alpha_rep'])}, "
                   f"ValidReduc score {_f(cal['score'])}"
                   + (f" (rank {cal['score_rank']} of {cal['n_valid']} valid)"
                      if cal.get("score_rank") else " (not valid)"))
    for mode in ("induce", "repair"):
        cv = card["curves"][mode]
        if cv["points"]:
            pts = ([cv["unsteered"]] if cv["unsteered"] else []) + cv["points"]
            label = "base steered +" if mode == "induce" else "misaligned steered -"
            out.append(f"  {mode:7s} ({label}alpha, {cv['source']}): alpha "
                       + " ".join(_f(p["alpha"], 2) for p in pts))
            out.append(f"          EM          {_spark([p['em'] for p in pts])}  "
                       + " ".join(_f(p["em"], 2) for p in pts))
            out.append(f"          incoherence {_spark([p['incoherence'] for p in pts])}  "
                       + " ".join(_f(p["incoherence"], 2) for p in pts))
    out.append("filters: " + "  ".join(f"{k} {'✓' if card['filters'].get(k) else '✗'}"
                                        for k in FILTERS))
    if card["unembed"]:
        for kind in ("promoted", "suppressed"):
            out.append(f"{kind}: " + ", ".join(f"{t['token']!r} {t['value']:+.2f}"
                                               for t in card["unembed"][kind][:8]))
    if card["contexts"]:
        for source in ("corpus", "core"):
            for ranking in ("base", "mis", "shift"):
                cs = (card["contexts"].get(source) or {}).get(ranking) or []
                if cs:
                    what = {"base": "base model", "mis": "misaligned model",
                            "shift": "largest shift"}[ranking]
                    out.append(f"top contexts ({source}, {what}):")
                    for c in cs[:3]:
                        out.append(f"  base {c['act_base']:6.2f}  mis {c['act_mis']:6.2f}  "
                                   f"{_window(c, ranking)}")
    g = card["generations"]
    if not g["available"]:
        out.append(f"generations: {g['reason']}")
    else:
        for mode in ("repair", "induce"):
            m = g[mode]
            who = "misaligned repaired" if mode == "repair" else "base induced"
            for s in m["samples"][:2]:
                out.append(f"  {who} (alpha {_f(m['alpha'], 2)}): {s['prompt']!r}")
                out.append(f"     unsteered [{'/'.join(map(str, s['unsteered_labels']))}] "
                           f"{s['unsteered']!r}")
                out.append(f"     steered   [{'/'.join(map(str, s['steered_labels']))}] "
                           f"{s['steered']!r}")
    return "\n".join(out)


def format_cards(doc: dict, latent: int | None = None) -> str:
    cards = doc["latents"]
    if latent is not None:
        cards = [c for c in cards if c["latent"] == latent]
        if not cards:
            raise ValueError(f"latent {latent} is not in set {doc['set']} "
                             f"(its latents: {[c['latent'] for c in doc['latents']]})")
    return "\n\n".join([format_summary(doc), *(format_card(c, doc) for c in cards)])


def latents_command(set_path: Path, latent: int | None = None) -> str:
    """What `python -m blockem latents` prints: the cards JSON beside the set, or cards built from
    the discovery files that exist (no contexts pass: that needs the models)."""
    set_path = Path(set_path)
    if not set_path.exists():
        raise FileNotFoundError(f"{set_path}: no latent set here")
    beside = cards_path(set_path)
    if beside.exists():
        doc = json.loads(beside.read_text())
    else:
        doc = build_cards(set_path, **discovery_paths(set_path))
        doc["notes"].append(f"{beside.name} not found: computed from the discovery files")
    return format_cards(doc, latent)
