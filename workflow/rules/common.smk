# Config validation, the cell table, and input functions shared by every rule.
import json

from snakemake.exceptions import WorkflowError

from blockem.config import ConfigError, stage_settings, validate

try:
    validate(config, source=", ".join(map(str, workflow.configfiles)) or "config")
except ConfigError as e:
    raise WorkflowError(f"invalid config: {e}") from None

R = config["results"]
THREADS = config["compute"]["threads"]
GPU = config["compute"]["gpu"]
CONDA_ENV = "../../envs/blockem.yaml"  # used with --use-conda (clusters)


def settings(stage, domain=None):
    """A stage's settings as canonical JSON: a params value, so editing them reruns the stage."""
    return json.dumps(stage_settings(config, stage, domain), sort_keys=True)


DISC = config["discovery"]
SELECT_RULES = [DISC["select"]["rule"]] + [
    r for r in DISC["select"]["extra_rules"] if r != DISC["select"]["rule"]]


def discovery_keys():
    """`<domain>-s<seed>` of every misaligned model whose latents are discovered."""
    return [f"{d}-s{config['finetune']['seeds'][0]}" for d in DISC["domains"]]


def build_cells():
    """Every trained model that gets evaluated: cell id -> description (summary.parquet keys)."""
    cells = {"base": {"cell": "base", "method": "base", "domain": None, "lam": None,
                      "seed": None, "model": f"{R}/models/base"}}
    for d in config["finetune"]["domains"]:
        for s in config["finetune"]["seeds"]:
            cell = f"sft-{d}-s{s}"
            cells[cell] = {"cell": cell, "method": "sft", "domain": d, "lam": 0.0, "seed": s,
                           "model": f"{R}/models/sft/{d}-s{s}"}
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


wildcard_constraints:
    cell="|".join(CELLS),
    domain="[a-z]+",
    seed=r"\d+",
    shard=r"\d+",


def generate_inputs(wildcards):
    """The cell's model, plus the latent set, SAE and joint strength of a steered cell."""
    cell = CELLS[wildcards.cell]
    return {"model": cell["model"], **cell.get("steer", {})}


def steer_flags(wildcards, input):
    if "steer" not in CELLS[wildcards.cell]:
        return ""
    return f"--steer-set {input.set} --sae {input.sae} --joint {input.joint}"


def cell_json(wildcards):
    info = {k: v for k, v in CELLS[wildcards.cell].items() if k not in ("model", "steer")}
    return json.dumps(info, sort_keys=True)


def mis_model(wildcards):
    return f"{R}/models/sft/{wildcards.domain}-s{wildcards.seed}"


def screen_shards(wildcards):
    return expand(f"{R}/discovery/{wildcards.domain}-s{wildcards.seed}/screen/{{shard}}.parquet",
                  shard=range(DISC["screen"]["shards"]))


def summary_outputs():
    outs = [f"{R}/metrics/summary.parquet", f"{R}/metrics/summary.md"]
    if DISC["domains"]:
        outs.append(f"{R}/sae/sanity.parquet")
        outs += expand(f"{R}/latents/{{key}}-{{rule}}.json", key=discovery_keys(), rule=SELECT_RULES)
        outs += expand(f"{R}/latents/{{key}}-direction.safetensors", key=discovery_keys())
    return outs
