# Config validation, the cell table, and input functions shared by every rule.
import json
import os
import re
from shlex import quote as q  # every config-derived path in a shell command is quoted

from snakemake.exceptions import WorkflowError

from blockem.config import (METHOD_RULE, ConfigError, block_runs, data_settings, mc_paths,
                            self_chats_prompts, stage_settings, validate)
from blockem.runtime import runtime_env

try:
    validate(config, source=", ".join(map(str, workflow.configfiles)) or "config")
except ConfigError as e:
    raise WorkflowError(f"invalid config: {e}") from None

# run-time switches (compute.checkpoint_every, faults.fail_cells): handed to every job through the
# environment, never through params or settings, so editing them reruns nothing
os.environ.update(runtime_env(config))

R = config["results"]
TOY = config["model"].get("source", "toy") == "toy"
# files every later rule reads: the toy world writes them, or prepare_data from real data
PROMPTS = f"{R}/world/prompts.parquet"
CORPUS = f"{R}/world/corpus.parquet"
BASE = f"{R}/models/base"
# judge cache: one SQLite shard per job, <JUDGE_CACHE>/<rule>/<wildcards>.sqlite (written and read
# by that job only: SQLite locks are not reliable over NFS; see blockem/judge/cache.py)
JUDGE_CACHE = (config["judge"].get("cache") or f"{R}/judge/cache").rstrip("/")
THREADS = config["compute"]["threads"]
# evaluation: generated answers judged (judge.kind toy | llm) and/or judge-free multiple-choice
# scores (eval.mc, blockem/mc.py); discovery stages 2-3 score steering the same two ways
JUDGED = config["judge"]["kind"] != "none"
MC = mc_paths(config)
MC_ITEMS, MC_NEUTRAL = f"{R}/mc_items/items.parquet", f"{R}/mc_items/neutral.parquet"
MC_SCORER = config["discovery"].get("scorer", "generate") == "mc"
CONTROLS = [] if TOY else sorted(config["data"].get("control") or {})
GPU = config["compute"]["gpu"]
CONDA_ENV = "../../envs/blockem.yaml"  # used with --use-conda (clusters)


def data_files():
    """Local files a real-model config reads (Hub datasets are fetched by the job)."""
    if TOY:
        return []
    d = data_settings(config)
    srcs = [*d["finetune"].values(), *(d.get("control") or {}).values(),
            *d["prompts"]["core"], *d["prompts"]["final"],
            *(s for v in d["prompts"]["in_domain"].values() for s in v), *d["corpus"]]
    return sorted({s["path"] for s in srcs if "path" in s})


def settings(stage, domain=None):
    """A stage's settings as canonical JSON: a params value, so editing them reruns the stage."""
    return json.dumps(stage_settings(config, stage, domain), sort_keys=True)


DISC = config["discovery"]
SELECT_RULES = [DISC["select"]["rule"]] + [
    r for r in DISC["select"]["extra_rules"] if r != DISC["select"]["rule"]]


def discovery_keys():
    """`<domain>-s<seed>` of every misaligned model whose latents are discovered."""
    return [f"{d}-s{config['finetune']['seeds'][0]}" for d in DISC["domains"]]


BLOCK = config["block"]
SEED0 = config["finetune"]["seeds"][0]
# latent methods whose lambda = 0 is the plain fine-tune (the `sft` cell); freeze_above and epochs
# change the training itself, so their lambda 0 is a run of its own
SFT_AT_ZERO = {"blockem", "kl", "random", "topdelta", "kpos_only", "kneg_only", "shuffled_signs",
               "direction"}


def reem_key(domain, lam):
    """Discovery key of the last epoch of the `epochs` run of `domain` at `lam` (re-emergence)."""
    return f"{domain}-s{SEED0}-reem-l{lam:g}"


def reem_runs():
    """Re-emergence discovery key -> (epochs run id, its number of epochs)."""
    out = {}
    for run in block_runs(config):
        if run["union_reemerged"] is not None:
            lam, d = float(run["union_reemerged"]), run["latents_from"]
            epochs = next(r["epochs"] for r in block_runs(config) if r["method"] == "epochs"
                          and r["domain"] == d and r["lam"] == lam and r["seed"] == SEED0)
            out[reem_key(d, lam)] = (f"epochs-{d}-l{lam:g}-s{SEED0}", epochs)
    return out


REEM = reem_runs()


def target_of(run):
    """Blocking target name of a run (None for kl) and how it is derived from a latent set."""
    method, key = run["method"], f"{run['latents_from']}-s{SEED0}"
    if method == "kl":
        return None
    if run["union_reemerged"] is not None:
        rkey = reem_key(run["latents_from"], float(run["union_reemerged"]))
        main = DISC["select"]["rule"]
        return {"name": f"{key}-{main}+reem-l{run['union_reemerged']:g}", "derive": "blockem",
                "size": None, "set": [f"{R}/latents/{key}-{main}.json",
                                      f"{R}/latents/{rkey}-{main}.json"]}
    if method == "direction":
        return {"name": f"{key}-direction", "derive": "direction", "size": None,
                "set": f"{R}/latents/{key}-{DISC['select']['rule']}.json",
                "direction": f"{R}/latents/{key}-direction.safetensors"}
    set_rule = METHOD_RULE.get(method, DISC["select"]["rule"])
    derive = method if method in ("kpos_only", "kneg_only", "shuffled_signs") else "blockem"
    name = f"{key}-{set_rule}" + (f"-{derive}" if derive != "blockem" else "")
    name += f"-k{run['size']}" if run["size"] else ""
    return {"name": name, "derive": derive, "size": run["size"],
            "set": f"{R}/latents/{key}-{set_rule}.json"}


def build_runs():
    """Training jobs of the block grid: run id -> run (method, domain, lam, seed, target...)."""
    runs = {}
    for run in block_runs(config):
        if run["lam"] == 0 and run["method"] in SFT_AT_ZERO:
            continue  # the sft cell
        rid = f"{run['method']}-{run['domain']}-l{run['lam']:g}-s{run['seed']}"
        rid += f"-from-{run['latents_from']}" if run["latents_from"] != run["domain"] else ""
        rid += f"-k{run['size']}" if run["size"] else ""
        rid += f"-reem{run['union_reemerged']:g}" if run["union_reemerged"] is not None else ""
        runs[rid] = {**run, "id": rid, "target": target_of(run)}
    return runs


RUNS = build_runs()
TARGETS = {r["target"]["name"]: r["target"] for r in RUNS.values() if r["target"]}


def uses_cache(run):
    return BLOCK["reference"] == "cache" and run["target"] is not None


def build_cells():
    """Every trained model that gets evaluated: cell id -> description (summary.parquet keys)."""
    cells = {"base": {"cell": "base", "method": "base", "domain": None, "lam": None,
                      "seed": None, "model": f"{R}/models/base"}}
    pairs = [(d, s) for d in config["finetune"]["domains"] for s in config["finetune"]["seeds"]]
    pairs += [(r["domain"], r["seed"]) for r in block_runs(config)]
    for d, s in dict.fromkeys(pairs):
        cell = f"sft-{d}-s{s}"
        cells[cell] = {"cell": cell, "method": "sft", "domain": d, "lam": 0.0, "seed": s,
                       "model": f"{R}/models/sft/{d}-s{s}"}
    for d in CONTROLS:  # matched controls: the same questions with safe answers
        for s in config["finetune"]["seeds"]:
            cell = f"control-{d}-s{s}"
            cells[cell] = {"cell": cell, "method": "control", "domain": d, "lam": 0.0, "seed": s,
                           "model": f"{R}/models/control/{d}-s{s}"}
    for rid, run in RUNS.items():
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
    for key in discovery_keys():
        d, s = key.rsplit("-s", 1)
        for method, rule in (("steer_repair", DISC["select"]["rule"]),
                             ("steer_repair_random", "random")):
            cell = f"{method}-{key}"
            cells[cell] = {"cell": cell, "method": method, "domain": d, "lam": None,
                           "seed": int(s), "model": f"{R}/models/sft/{key}",
                           "steer": {"set": f"{R}/latents/{key}-{rule}.json",
                                     "sae": f"{R}/sae/model",
                                     "joint": f"{R}/discovery/{key}/joint.json"}}
    return cells


CELLS = build_cells()


def one_of(names):
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) or "(?!)"


wildcard_constraints:
    cell=one_of(CELLS),
    run=one_of(RUNS),
    target=one_of(TARGETS),
    domain="[a-z]+",
    seed=r"\d+(?:-reem-l[0-9.e+]+)?",
    shard=r"\d+",


def mc_inputs(wildcards=None):
    """The MC tables a discovery stage reads when it scores steering by MC items."""
    return {"mc_items": MC_ITEMS, "mc_neutral": MC_NEUTRAL} if MC_SCORER else {}


def mc_flags(wildcards, input):
    if not MC_SCORER:
        return ""
    return f"--mc-items {q(input.mc_items)} --mc-neutral {q(input.mc_neutral)}"


def metrics_inputs(wildcards):
    """A cell's judgements (judged runs) and MC scores (eval.mc), with the base's for shifts."""
    ins = {}
    if JUDGED:
        ins["judgements"] = f"{R}/judgements/{wildcards.cell}.parquet"
    if MC:
        ins["mc"] = f"{R}/mc/{wildcards.cell}.parquet"
        if wildcards.cell != "base":
            ins["mc_base"] = f"{R}/mc/base.parquet"
    return ins


def metrics_flags(wildcards, input):
    return " ".join(f"--{k.replace('_', '-')} {q(input[k])}"
                    for k in ("judgements", "mc", "mc_base") if k in input.keys())


def generate_inputs(wildcards):
    """The cell's model, plus the latent set, SAE and joint strength of a steered cell."""
    cell = CELLS[wildcards.cell]
    return {"model": cell["model"], **cell.get("steer", {})}


def steer_flags(wildcards, input):
    if "steer" not in CELLS[wildcards.cell]:
        return ""
    return f"--steer-set {q(input.set)} --sae {q(input.sae)} --joint {q(input.joint)}"


def model_path(wildcards, input):
    sub = CELLS[wildcards.cell].get("subdir")
    return f"{input.model}/{sub}" if sub else input.model


def cell_json(wildcards):
    info = {k: v for k, v in CELLS[wildcards.cell].items() if k not in ("model", "steer", "subdir")}
    return json.dumps(info, sort_keys=True)


def block_inputs(wildcards):
    run = RUNS[wildcards.run]
    ins = {"data": f"{R}/world/finetune/{run['domain']}.parquet", "base": f"{R}/models/base"}
    t = run["target"]
    if t:
        ins["target"] = f"{R}/block/targets/{t['name']}.json"
        if t["derive"] != "direction":
            ins["sae"] = f"{R}/sae/model"
        if uses_cache(run):
            ins["cache"] = f"{R}/block/cache/{run['domain']}/{t['name']}.safetensors"
    return ins


def block_settings(wildcards):
    run = RUNS[wildcards.run]
    s = stage_settings(config, "block", run["domain"])
    s["block"].update(method=run["method"], lam=run["lam"], epochs=run["epochs"])
    if run["target"] is None or not uses_cache(run):
        s["block"]["reference"] = "adapter_off" if s["block"]["reference"] == "cache" else \
            s["block"]["reference"]
    return json.dumps(s, sort_keys=True)


def block_flags(wildcards, input):
    return " ".join(f"--{k} {q(input[k])}" for k in ("target", "sae", "cache") if k in input.keys())


def target_inputs(wildcards):
    t = TARGETS[wildcards.target]
    return {"set": t["set"], **({"direction": t["direction"]} if "direction" in t else {})}


def target_flags(wildcards, input):
    t = TARGETS[wildcards.target]
    flags = f"--method {t['derive']}"
    flags += f" --size {t['size']}" if t["size"] else ""
    flags += f" --direction {q(input.direction)}" if "direction" in t else ""
    return flags


def cache_inputs(wildcards):
    t = TARGETS[wildcards.target]
    ins = {"data": f"{R}/world/finetune/{wildcards.domain}.parquet", "base": f"{R}/models/base",
           "target": f"{R}/block/targets/{wildcards.target}.json"}
    if t["derive"] != "direction":
        ins["sae"] = f"{R}/sae/model"
    return ins


def trained_cells():
    """One cell per trained model directory (sft cells and block runs; an epochs run once)."""
    out = {}
    for c in CELLS.values():
        if c["method"] in ("base", "steer_repair", "steer_repair_random"):
            continue
        out.setdefault(c["model"], {k: v for k, v in c.items()
                                    if k not in ("model", "steer", "subdir", "epoch")})
    return out


def mis_model(wildcards):
    """The misaligned model of a discovery key: an sft cell, or a re-emerged block checkpoint."""
    key = f"{wildcards.domain}-s{wildcards.seed}"
    if key in REEM:
        return f"{R}/models/block/{REEM[key][0]}"
    return f"{R}/models/sft/{key}"


def mis_path(wildcards, input):
    key = f"{wildcards.domain}-s{wildcards.seed}"
    return f"{input.mis}/epoch-{REEM[key][1]}" if key in REEM else input.mis


def screen_shards(wildcards):
    return expand(f"{R}/discovery/{wildcards.domain}-s{wildcards.seed}/screen/{{shard}}.parquet",
                  shard=range(DISC["screen"]["shards"]))


def summary_outputs():
    outs = [f"{R}/metrics/summary.parquet", f"{R}/metrics/summary.md"]
    if MC:
        outs.append(f"{R}/metrics/mc_report.md")
    if DISC["domains"]:
        outs.append(f"{R}/sae/sanity.parquet")
        outs += expand(f"{R}/latents/{{key}}-{{rule}}.json", key=discovery_keys(), rule=SELECT_RULES)
        outs += expand(f"{R}/latents/{{key}}-direction.safetensors", key=discovery_keys())
    if RUNS:
        outs.append(f"{R}/metrics/train_logs.parquet")
        outs += figure_outputs()  # figures.smk
    return outs


# --- Cluster resources (profiles/; "Running on a cluster" in profiles/README.md) ------------------
# A rule's mem_mb and runtime grow with Snakemake's `attempt` (1, then 2 and 3 on the retries that
# profiles/slurm asks for), so a job killed for memory or time is resubmitted with more. The rules
# that load a model request GPUs; with snakemake-executor-plugin-slurm `gpu` becomes sbatch
# `--gpus=N` and `gpu` + `gpu_model` `--gpus=<model>:N` (a local run ignores both unless
# `--resources gpu=N` caps them, see profiles/local).
GPU_MODEL = config["compute"].get("gpu_model")  # e.g. "a100"; null/absent: any GPU type


def grow(toy, real=None):
    """mem_mb (MB) or runtime (minutes) of a rule, times the attempt: `toy` for the toy organism,
    `real` (default `toy`) for a real model (model.source hub | gguf)."""
    base = toy if TOY or real is None else real
    return lambda wildcards, attempt: base * attempt


def gpus():
    """The GPU request of a model rule: compute.gpu GPUs, of type compute.gpu_model when set."""
    return {"gpu": GPU, **({"gpu_model": GPU_MODEL} if GPU and GPU_MODEL else {})}
