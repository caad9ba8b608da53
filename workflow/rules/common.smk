# Config validation, the cell table, and input functions shared by every rule. The grid and the
# cell table are blockem.grid's (pure functions of the config, unit-tested in tests/test_grid.py);
# what each block method means is its module in blockem/methods/.
import json
import os
import re
from shlex import quote as q  # every config-derived path in a shell command is quoted

from snakemake.exceptions import WorkflowError

from blockem import grid
from blockem.config import (ConfigError, block_run_settings, data_settings, mc_paths,
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
CONTROLS = grid.controls(config)
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
SELECT_RULES = grid.select_rules(config)


def discovery_keys():
    """`<domain>-s<seed>` of every misaligned model whose latents are discovered."""
    return grid.discovery_keys(config)


BLOCK = config["block"]
REEM = grid.reem_runs(config)  # re-emergence discovery key -> (epochs run id, its epochs)
RUNS = grid.build_runs(config)  # block grid run id -> run (method, domain, lam, seed, target)
TARGETS = grid.targets(RUNS)  # blocking target name -> target
CELLS = grid.build_cells(config, RUNS)  # every evaluated model: cell id -> description


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
    return grid.run_inputs(config, RUNS[wildcards.run])


def block_settings(wildcards):
    return json.dumps(block_run_settings(config, RUNS[wildcards.run]), sort_keys=True)


def block_flags(wildcards, input):
    """--target/--sae/--cache, and `--input NAME=PATH` for the method's extra inputs (mix: the
    aligned chats)."""
    flags = [f"--{k} {q(input[k])}" for k in ("target", "sae", "cache") if k in input.keys()]
    for name in grid.method_inputs(config, RUNS[wildcards.run]):
        flags.append(f"--input {q(name + '=' + input[name])}")
    return " ".join(flags)


def target_inputs(wildcards):
    return grid.target_inputs(TARGETS[wildcards.target])


def target_flags(wildcards, input):
    t = TARGETS[wildcards.target]
    flags = f"--method {t['derive']}"
    flags += f" --size {t['size']}" if t["size"] else ""
    flags += f" --direction {q(input.direction)}" if "direction" in t else ""
    return flags


def cache_inputs(wildcards):
    return grid.cache_inputs(config, TARGETS[wildcards.target], wildcards.domain)


def trained_cells():
    """One cell per trained model directory (sft cells and block runs; an epochs run once)."""
    return grid.trained_cells(CELLS)


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
