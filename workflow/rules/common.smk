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


def build_cells():
    """Every trained model that gets evaluated: cell id -> description (summary.parquet keys)."""
    cells = {"base": {"cell": "base", "method": "base", "domain": None, "lam": None,
                      "seed": None, "model": f"{R}/models/base"}}
    for d in config["finetune"]["domains"]:
        for s in config["finetune"]["seeds"]:
            cell = f"sft-{d}-s{s}"
            cells[cell] = {"cell": cell, "method": "sft", "domain": d, "lam": 0.0, "seed": s,
                           "model": f"{R}/models/sft/{d}-s{s}"}
    return cells


CELLS = build_cells()


wildcard_constraints:
    cell="|".join(CELLS),
    domain="[a-z]+",
    seed=r"\d+",


def cell_model(wildcards):
    return CELLS[wildcards.cell]["model"]


def cell_json(wildcards):
    info = {k: v for k, v in CELLS[wildcards.cell].items() if k != "model"}
    return json.dumps(info, sort_keys=True)


def summary_outputs():
    return [f"{R}/metrics/summary.parquet", f"{R}/metrics/summary.md"]
