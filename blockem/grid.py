"""The block grid and the cell table, expanded from the config: pure functions of the config dict.

`block.grid` entries (method x domains x lambdas x sizes x seeds) become training runs
(`build_runs`: run id -> run), each with the blocking target it trains against (`target_of`);
every trained model that gets evaluated is a cell (`build_cells`: cell id -> description, the keys
of summary.parquet). What a method means (which latent set, how its target is derived, whether
lambda 0 is the plain `sft` cell) is its registry entry (`blockem.methods`). The workflow
(`workflow/rules/common.smk`) is a thin layer over these functions; every id and path here is a
file name of the workflow, so they never change for an unchanged config.

    run id    <method>-<domain>-l<lambda>-s<seed>[-from-<latents_from>][-k<size>][-reem<lambda>]
    target    <latents_from>-s<seed0>-<rule>[-<derive>][-k<size>]   (or -direction, +reem-l<lambda>)
    cells     base, sft-<domain>-s<seed>, control-<domain>-s<seed>, <run id>[-e<epoch>],
              steer_repair[_random]-<domain>-s<seed0>
"""

from __future__ import annotations

from blockem import methods

# the name a target derived "as is" from its latent set is written under (`block-target --method`):
# BLOCK-EM's own; a method with a `derive` function has targets of its own name
AS_IS = "blockem"
# the name the mean-difference direction target is written under (every method that needs the
# direction trains against the same file)
DIRECTION = "direction"
# grid-entry keys the grid expands into runs (one run per size, ...); a method's other
# grid_fields are handed to its runs as `options` (`Method.run_settings`)
EXPANDED = ("sizes", "epochs", "union_reemerged")


def seed0(cfg: dict) -> int:
    """The fine-tune seed whose models are diffed by discovery (finetune.seeds[0])."""
    return cfg["finetune"]["seeds"][0]


def main_rule(cfg: dict) -> str:
    return cfg["discovery"]["select"]["rule"]


def select_rules(cfg: dict) -> list[str]:
    """Every selection rule discovery writes a latent set for, the main rule first."""
    return [main_rule(cfg)] + [r for r in cfg["discovery"]["select"]["extra_rules"]
                               if r != main_rule(cfg)]


def discovery_keys(cfg: dict) -> list[str]:
    """`<domain>-s<seed0>` of every misaligned model whose latents are discovered."""
    return [f"{d}-s{seed0(cfg)}" for d in cfg["discovery"]["domains"]]


def controls(cfg: dict) -> list[str]:
    """Domains with matched control data (real models only: the same questions, safe answers)."""
    if cfg["model"].get("source", "toy") == "toy":
        return []
    return sorted(cfg["data"].get("control") or {})


def entry_domains(cfg: dict, entry: dict) -> list[str]:
    """The fine-tune domains a grid entry trains: `domains`, else `latents_from`'s, else
    discovery.domains."""
    return entry.get("domains") or ([entry["latents_from"]] if entry.get("latents_from")
                                    else cfg["discovery"]["domains"])


def block_runs(cfg: dict) -> list[dict]:
    """Every training job of the block grid: method, domain, lam, seed, latents_from, size, epochs,
    and `options` (the entry's values of the method's other grid_fields, e.g. `system`).

    lambda 0 of a latent method is the plain fine-tune (`sft` cell), not a separate job."""
    b = cfg["block"]
    runs = []
    for entry in b["grid"]:
        method = entry["method"]
        fields = methods.get(method).grid_fields
        options = {k: entry[k] for k in fields if k in entry and k not in EXPANDED}
        for d in entry_domains(cfg, entry):
            for lam in entry["lambdas"]:
                for size in entry.get("sizes") or [None]:
                    for seed in entry.get("seeds") or b["seeds"]:
                        runs.append({"method": method, "domain": d, "lam": float(lam),
                                     "seed": seed, "latents_from": entry.get("latents_from") or d,
                                     "size": size, "epochs": entry.get("epochs", 1),
                                     "union_reemerged": entry.get("union_reemerged"),
                                     "options": dict(options)})
    return runs


def reem_key(cfg: dict, domain: str, lam: float) -> str:
    """Discovery key of the last epoch of the `epochs` run of `domain` at `lam` (re-emergence)."""
    return f"{domain}-s{seed0(cfg)}-reem-l{lam:g}"


def reem_runs(cfg: dict) -> dict[str, tuple[str, int]]:
    """Re-emergence discovery key -> (epochs run id, its number of epochs)."""
    out = {}
    runs = block_runs(cfg)
    for run in runs:
        if run["union_reemerged"] is not None:
            lam, d = float(run["union_reemerged"]), run["latents_from"]
            ep = next(r for r in runs if methods.get(r["method"]).multi_epoch
                      and r["domain"] == d and r["lam"] == lam and r["seed"] == seed0(cfg))
            out[reem_key(cfg, d, lam)] = (f"{ep['method']}-{d}-l{lam:g}-s{seed0(cfg)}",
                                          ep["epochs"])
    return out


def set_rule(cfg: dict, method: str) -> str | None:
    """The selection rule of the latent set a method blocks (None: it blocks no set)."""
    ls = methods.get(method).latent_set
    return main_rule(cfg) if ls == "main" else ls


def target_of(cfg: dict, run: dict) -> dict | None:
    """Blocking target of a run (None for a method with no target, e.g. kl): its name, the
    latent-set file(s) it is derived from, how (`derive`: the `block-target --method`), `size`."""
    m = methods.get(run["method"])
    if not m.blocks:
        return None
    R, key, main = cfg["results"], f"{run['latents_from']}-s{seed0(cfg)}", main_rule(cfg)
    if run["union_reemerged"] is not None:
        rkey = reem_key(cfg, run["latents_from"], float(run["union_reemerged"]))
        return {"name": f"{key}-{main}+reem-l{run['union_reemerged']:g}", "derive": AS_IS,
                "size": None, "set": [f"{R}/latents/{key}-{main}.json",
                                      f"{R}/latents/{rkey}-{main}.json"]}
    if m.needs == "direction":
        return {"name": f"{key}-direction", "derive": DIRECTION, "size": None,
                "set": f"{R}/latents/{key}-{main}.json",
                "direction": f"{R}/latents/{key}-direction.safetensors"}
    rule = set_rule(cfg, m.name)
    derive = m.name if m.derive is not None else AS_IS
    name = f"{key}-{rule}" + (f"-{derive}" if derive != AS_IS else "")
    name += f"-k{run['size']}" if run["size"] else ""
    return {"name": name, "derive": derive, "size": run["size"],
            "set": f"{R}/latents/{key}-{rule}.json"}


def run_id(run: dict) -> str:
    rid = f"{run['method']}-{run['domain']}-l{run['lam']:g}-s{run['seed']}"
    rid += f"-from-{run['latents_from']}" if run["latents_from"] != run["domain"] else ""
    rid += f"-k{run['size']}" if run["size"] else ""
    rid += f"-reem{run['union_reemerged']:g}" if run["union_reemerged"] is not None else ""
    return rid


def build_runs(cfg: dict) -> dict[str, dict]:
    """Training jobs of the block grid: run id -> run (method, domain, lam, seed, target...).
    Strength 0 of a method with `sft_at_zero` is the sft cell, not a run."""
    runs = {}
    for run in block_runs(cfg):
        if run["lam"] == 0 and methods.get(run["method"]).sft_at_zero:
            continue  # the sft cell
        rid = run_id(run)
        runs[rid] = {**run, "id": rid, "target": target_of(cfg, run)}
    return runs


def targets(runs: dict[str, dict]) -> dict[str, dict]:
    """Blocking targets of the runs: target name -> target (one job each)."""
    return {r["target"]["name"]: r["target"] for r in runs.values() if r["target"]}


def uses_cache(cfg: dict, run: dict) -> bool:
    """Whether a run reads its base latents from a cache (reference `cache`, a target, and the
    BLOCK-EM penalty: a method that trains with plain SFT inside a hook reads none)."""
    return (cfg["block"]["reference"] == "cache" and run["target"] is not None
            and methods.get(run["method"]).objective == "block")


def aligned_chats(cfg: dict) -> str | None:
    """The aligned chats of the `mix` defence: the toy's instruct set, or, when data.aligned is
    configured, the aligned.parquet of the `prepare_aligned` job (prepare_data with data.aligned,
    in aligned/: world/ stays as it was) (None: a real config without data.aligned)."""
    R = cfg["results"]
    if cfg["model"].get("source", "toy") == "toy":
        return f"{R}/world/sft.parquet"
    return f"{R}/aligned/aligned.parquet" if (cfg.get("data") or {}).get("aligned") else None


def method_inputs(cfg: dict, run: dict) -> dict[str, str]:
    """A run's extra input files by name (`block --input NAME=PATH`, TrainContext.inputs): the
    aligned chats of a method that needs them."""
    if methods.get(run["method"]).needs == "aligned_data":
        path = aligned_chats(cfg)
        if path is None:
            raise ValueError(f"{run_id(run)}: method {run['method']!r} needs aligned chats: "
                             f"set data.aligned")
        return {"aligned": path}
    return {}


def run_inputs(cfg: dict, run: dict) -> dict[str, str]:
    """Input files of a run's training job: data, base, its target, SAE and cache, and its
    method's extra inputs (`method_inputs`)."""
    R = cfg["results"]
    ins = {"data": f"{R}/world/finetune/{run['domain']}.parquet", "base": f"{R}/models/base"}
    t = run["target"]
    if t:
        ins["target"] = f"{R}/block/targets/{t['name']}.json"
        if "direction" not in t:
            ins["sae"] = f"{R}/sae/model"
        if uses_cache(cfg, run):
            ins["cache"] = f"{R}/block/cache/{run['domain']}/{t['name']}.safetensors"
    return {**ins, **method_inputs(cfg, run)}


def target_inputs(target: dict) -> dict:
    """Input files of a target's job: the latent set(s), and the direction of a direction one."""
    return {"set": target["set"],
            **({"direction": target["direction"]} if "direction" in target else {})}


def cache_inputs(cfg: dict, target: dict, domain: str) -> dict[str, str]:
    """Input files of the base-latent cache of a target on a domain's training data."""
    R = cfg["results"]
    ins = {"data": f"{R}/world/finetune/{domain}.parquet", "base": f"{R}/models/base",
           "target": f"{R}/block/targets/{target['name']}.json"}
    if "direction" not in target:
        ins["sae"] = f"{R}/sae/model"
    return ins


def build_cells(cfg: dict, runs: dict[str, dict] | None = None) -> dict[str, dict]:
    """Every trained model that gets evaluated: cell id -> description (summary.parquet keys)."""
    R = cfg["results"]
    runs = build_runs(cfg) if runs is None else runs
    ft = cfg["finetune"]
    cells = {"base": {"cell": "base", "method": "base", "domain": None, "lam": None,
                      "seed": None, "model": f"{R}/models/base"}}
    pairs = [(d, s) for d in ft["domains"] for s in ft["seeds"]]
    pairs += [(r["domain"], r["seed"]) for r in block_runs(cfg)]
    for d, s in dict.fromkeys(pairs):
        cell = f"sft-{d}-s{s}"
        cells[cell] = {"cell": cell, "method": "sft", "domain": d, "lam": 0.0, "seed": s,
                       "model": f"{R}/models/sft/{d}-s{s}"}
    for d in controls(cfg):  # matched controls: the same questions with safe answers
        for s in ft["seeds"]:
            cell = f"control-{d}-s{s}"
            cells[cell] = {"cell": cell, "method": "control", "domain": d, "lam": 0.0, "seed": s,
                           "model": f"{R}/models/control/{d}-s{s}"}
    for rid, run in runs.items():
        source = run["latents_from"]  # the set's discovery domain (+ re-emergence latents)
        if run["union_reemerged"] is not None:
            source += f"+reem-l{run['union_reemerged']:g}"
        info = {"method": run["method"], "domain": run["domain"], "lam": run["lam"],
                "seed": run["seed"], "latents_from": source,
                "k_size": run["size"], "model": f"{R}/models/block/{rid}"}
        if run["epochs"] > 1:
            for e in range(1, run["epochs"] + 1):
                cells[f"{rid}-e{e}"] = {"cell": f"{rid}-e{e}", **info, "epoch": e,
                                        "subdir": f"epoch-{e}"}
        else:
            cells[rid] = {"cell": rid, **info}
    for key in discovery_keys(cfg):
        d, s = key.rsplit("-s", 1)
        for method, rule in (("steer_repair", main_rule(cfg)), ("steer_repair_random", "random")):
            cell = f"{method}-{key}"
            cells[cell] = {"cell": cell, "method": method, "domain": d, "lam": None,
                           "seed": int(s), "model": f"{R}/models/sft/{key}",
                           "steer": {"set": f"{R}/latents/{key}-{rule}.json",
                                     "sae": f"{R}/sae/model",
                                     "joint": f"{R}/discovery/{key}/joint.json"}}
    return cells


def trained_cells(cells: dict[str, dict]) -> dict[str, dict]:
    """One cell per trained model directory (sft cells and block runs; an epochs run once):
    model directory -> cell description."""
    out = {}
    for c in cells.values():
        if c["method"] in ("base", "steer_repair", "steer_repair_random"):
            continue
        out.setdefault(c["model"], {k: v for k, v in c.items()
                                    if k not in ("model", "steer", "subdir", "epoch")})
    return out


def grid_methods(cfg: dict) -> set[str]:
    """The grid's methods, plus '<method>:sizes' for a size sweep (`blockem.figures.available`)."""
    grid = cfg["block"]["grid"]
    return {e["method"] for e in grid} | {f"{e['method']}:sizes" for e in grid if e.get("sizes")}
