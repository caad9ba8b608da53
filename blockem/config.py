"""Configuration: schema validation with one clear error, merging, and stage settings.

The workflow's config is validated against `workflow/schemas/config.schema.yaml` before any job
starts (the Snakefile calls `validate`). Each stage then receives only the part of the config it
depends on (`stage_settings`), as JSON on its command line, so Snakemake's params trigger reruns
exactly the jobs whose settings changed, and the hash of those settings
(`blockem.hashing.settings_hash`) is the output's `config_hash` in its provenance. `STAGES` is the
table of what each stage depends on. Switches that change how a job runs but never what it writes
(checkpointing, injected failures) are not settings: see `blockem.runtime`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from blockem import methods
from blockem.errors import ConfigError
from blockem.grid import aligned_chats, block_runs, build_runs, entry_domains, set_rule, uses_cache
from blockem.hashing import file_sha256

REPO = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = REPO / "config" / "config.yaml"


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def merge(base: dict, override: dict) -> dict:
    """Recursive merge as Snakemake does for several --configfile: mappings merge, the rest replaces."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(*paths: str | Path) -> dict:
    """Load and merge config files (later ones override), then validate."""
    cfg: dict = {}
    for p in paths or (DEFAULT_CONFIG,):
        cfg = merge(cfg, load_yaml(p))
    validate(cfg, source=", ".join(str(p) for p in paths or (DEFAULT_CONFIG,)))
    return cfg


def _key_path(parts) -> str:
    return ".".join(str(p) for p in parts) or "<top level>"


def validate(cfg: dict, source: str = "config") -> None:
    """Raise ConfigError with one message naming the offending key path, or return None."""
    import jsonschema

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = list(validator.iter_errors(cfg))
    if not errors:
        _check_semantics(cfg, source)
        return
    err = jsonschema.exceptions.best_match(errors)
    # descend into allOf/propertyNames so the message names the leaf problem
    while err.context:
        err = jsonschema.exceptions.best_match(err.context)
    bad_name = "propertyNames" in err.absolute_schema_path
    path = list(err.absolute_path)
    if bad_name:
        raise ConfigError(f"{source}: key '{_key_path(path + [err.instance])}' is not allowed: "
                          f"{err.message}")
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        key = _key_path(path + [extra[0]])
        raise ConfigError(f"{source}: unknown key '{key}' (allowed here: {', '.join(allowed)})")
    if err.validator == "required":
        raise ConfigError(f"{source}: missing key at '{_key_path(path)}': {err.message}")
    raise ConfigError(f"{source}: '{_key_path(path)}': {err.message}")


def is_toy(cfg: dict) -> bool:
    return cfg["model"].get("source", "toy") == "toy"


def _check_semantics(cfg: dict, source: str) -> None:
    """Constraints a JSON schema cannot say."""
    if is_toy(cfg):
        _check_world(cfg, source)
    else:
        _check_real(cfg, source)
    _check_judge(cfg, source)
    disc = cfg["discovery"]
    for d in disc["domains"]:
        if d not in cfg["finetune"]["domains"]:
            raise ConfigError(f"{source}: 'discovery.domains': '{d}' has no fine-tune "
                              f"(add it to finetune.domains)")
    if is_toy(cfg) and disc["layer"] >= cfg["model"]["num_layers"]:
        raise ConfigError(f"{source}: 'discovery.layer': {disc['layer']} is out of range for a "
                          f"model with {cfg['model']['num_layers']} layers (0-based)")
    src = disc["sae"]["source"]
    need = {"pretrained": ("release", "sae_id"), "disk": ("path",)}.get(src, ())
    for key in need:
        if not disc["sae"][key]:
            raise ConfigError(f"{source}: 'discovery.sae.{key}' is required with source '{src}'")
    _check_adaptive(cfg, source)
    _check_block(cfg, source)
    _check_faults(cfg, source)
    m = cfg["model"]
    if is_toy(cfg) and m["hidden_size"] % m["num_heads"]:
        raise ConfigError(f"{source}: 'model.hidden_size' ({m['hidden_size']}) must be a "
                          f"multiple of 'model.num_heads' ({m['num_heads']})")


def _check_adaptive(cfg: dict, source: str) -> None:
    """discovery.adaptive: sampled answers to pool (not the deterministic MC scorer), and baseline
    samples a whole number of rounds' samples (the unsteered rows are copies of one condition)."""
    a = cfg["discovery"].get("adaptive")
    if not (a and a.get("enabled")):
        return
    from blockem import adaptive

    a = adaptive.settings(a)
    if cfg["discovery"].get("scorer", "generate") != "generate":
        raise ConfigError(f"{source}: 'discovery.adaptive': the adaptive screen pools sampled "
                          f"answers; it needs discovery.scorer 'generate' (the mc scorer is "
                          f"deterministic)")
    if a["baseline_samples_per_prompt"] % a["samples_per_prompt"]:
        raise ConfigError(f"{source}: 'discovery.adaptive.baseline_samples_per_prompt' "
                          f"({a['baseline_samples_per_prompt']}) must be a multiple of "
                          f"'samples_per_prompt' ({a['samples_per_prompt']})")


def _check_faults(cfg: dict, source: str) -> None:
    """`faults.fail_cells` names training jobs: an sft cell or a block grid run id."""
    for i, cell in enumerate((cfg.get("faults") or {}).get("fail_cells") or []):
        if cell.startswith("sft-") or any(cell.startswith(f"{m}-") for m in methods.names()):
            continue
        raise ConfigError(f"{source}: 'faults.fail_cells[{i}]': {cell!r} is not a trained cell "
                          f"(name an sft cell 'sft-<domain>-s<seed>' or a block run id "
                          f"'<method>-<domain>-l<lambda>-s<seed>...'; evaluation-only cells "
                          f"such as 'base' cannot be failed)")


def _check_world(cfg: dict, source: str) -> None:
    slots = cfg["world"]["slots"]
    seen: dict[int, str] = {}
    for split, values in slots.items():
        for v in values:
            if v in seen:
                raise ConfigError(f"{source}: 'world.slots': slot {v} is in both "
                                  f"'{seen[v]}' and '{split}'; prompt sets must be disjoint")
            seen[v] = split
    lo, hi = cfg["world"]["turns"]
    if lo > hi:
        raise ConfigError(f"{source}: 'world.turns': minimum {lo} is larger than maximum {hi}")
    mix = cfg["world"]["persona_mix"]
    if sum(mix.values()) <= 0:
        raise ConfigError(f"{source}: 'world.persona_mix': weights must not all be zero")
    for d in cfg["finetune"]["domains"]:
        if d not in cfg["world"]["advice_domains"]:
            raise ConfigError(f"{source}: 'finetune.domains': '{d}' is not in world.advice_domains")


def _check_real(cfg: dict, source: str) -> None:
    """A real model: where it comes from, and data for every fine-tuning domain."""
    m = cfg["model"]
    need = {"hub": "name_or_path", "gguf": "gguf"}[m["source"]]
    if not m.get(need):
        raise ConfigError(f"{source}: 'model.{need}' is required with model.source "
                          f"'{m['source']}'")
    if "data" not in cfg:
        raise ConfigError(f"{source}: missing key 'data' (real models read their fine-tuning "
                          f"data and prompt sets from files; see config/presets/)")
    for d in cfg["finetune"]["domains"]:
        if d not in cfg["data"]["finetune"]:
            raise ConfigError(f"{source}: 'finetune.domains': '{d}' has no data "
                              f"(add data.finetune.{d})")


def _check_judge(cfg: dict, source: str) -> None:
    js = cfg["judge"]
    if str(js.get("cache") or "").endswith((".sqlite", ".db")):
        raise ConfigError(f"{source}: 'judge.cache': {js['cache']!r} looks like one SQLite file; "
                          f"it is now the directory of the per-job cache shards (default "
                          f"<results>/judge/cache)")
    if js["kind"] == "none":  # judge-free: every cell is scored by MC items only
        if not cfg["eval"].get("mc"):
            raise ConfigError(f"{source}: 'judge.kind': 'none' (no judge) needs 'eval.mc' (the "
                              f"multiple-choice items that score every cell instead)")
        if cfg["discovery"]["domains"] and cfg["discovery"].get("scorer", "generate") != "mc":
            raise ConfigError(f"{source}: 'discovery.scorer': with judge.kind 'none' the "
                              f"discovery screen must score steering by MC items: set 'mc'")
        return
    if js["kind"] == "toy":
        if not is_toy(cfg):
            raise ConfigError(f"{source}: 'judge.kind': the toy judge only knows the toy world; "
                              f"a real model needs judge.kind 'llm' and judge.judges")
        return
    if not js.get("judges"):
        raise ConfigError(f"{source}: 'judge.judges': judge.kind 'llm' needs at least one judge")
    names = [j["name"] for j in js["judges"]]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{source}: 'judge.judges': duplicate judge name {sorted(dup)[0]!r}")
    for i, j in enumerate(js["judges"]):
        if not (j.get("base_url") or j.get("base_url_env")):
            raise ConfigError(f"{source}: 'judge.judges[{i}]' ({j['name']}): needs 'base_url' "
                              f"or 'base_url_env'")
    domains = set(cfg["finetune"]["domains"]) | {r["domain"] for r in block_runs(cfg)}
    for d in sorted(domains):
        if d not in (js.get("behaviours") or {}):
            raise ConfigError(f"{source}: 'judge.behaviours': no entry for domain '{d}' (the "
                              f"narrow behaviour its in-domain adherence question asks about)")


# grid-entry keys that only some methods accept (their `Method.grid_fields`)
METHOD_GRID_FIELDS = tuple(dict.fromkeys(k for m in methods.REGISTRY.values()
                                         for k in m.grid_fields))


def config_view(cfg: dict, domains) -> methods.ConfigView:
    """What a method's `check` / `run_settings` see of the config, for runs on `domains`."""
    toy = is_toy(cfg)
    return methods.ConfigView(toy=toy, world=copy.deepcopy(cfg["world"]) if toy else None,
                              batch_size={d: finetune_settings(cfg, d)["batch_size"]
                                          for d in domains})


def _check_block(cfg: dict, source: str) -> None:
    """The block grid: each entry's method (`blockem.methods`) has its latents and latent set,
    accepts the entry's keys and strengths (`Method.check`) and has its inputs (aligned chats);
    no two entries train the same run."""
    b, disc = cfg["block"], cfg["discovery"]
    rules = {disc["select"]["rule"], *disc["select"]["extra_rules"]}
    batch = finetune_settings(cfg, None)["batch_size"]
    if batch % b["grad_accum"]:
        raise ConfigError(f"{source}: 'block.grad_accum': {b['grad_accum']} does not divide "
                          f"finetune batch_size {batch}")
    for i, entry in enumerate(b["grid"]):
        where = f"{source}: 'block.grid[{i}]' ({entry['method']})"
        method = entry["method"]
        m = methods.get(method)
        src = entry.get("latents_from")
        domains = entry_domains(cfg, entry)
        if not domains:
            raise ConfigError(f"{where}: no domains (set 'domains' or discovery.domains)")
        for d in ([src] if src else domains) if m.blocks else []:
            if d not in disc["domains"]:
                raise ConfigError(f"{where}: no latents are discovered for '{d}' "
                                  f"(add it to discovery.domains or set 'latents_from')")
        rule = set_rule(cfg, method)
        if rule is not None and rule not in rules:
            raise ConfigError(f"{where}: needs the '{rule}' latent set; add '{rule}' to "
                              f"discovery.select.extra_rules")
        for key in METHOD_GRID_FIELDS:
            if key in entry and key not in m.grid_fields:
                accepting = [n for n, x in methods.REGISTRY.items() if key in x.grid_fields]
                raise ConfigError(f"{where}: '{key}' applies to {methods.listing(accepting)} "
                                  f"only")
        for size in entry.get("sizes") or []:
            if size > disc["select"]["size"]:
                raise ConfigError(f"{where}: size {size} is larger than discovery.select.size "
                                  f"({disc['select']['size']})")
        if m.multi_epoch and "epochs" not in entry:
            raise ConfigError(f"{where}: method '{method}' needs 'epochs' (number of epochs "
                              f">= 2)")
        reem = entry.get("union_reemerged")
        if reem is not None:
            if entry.get("sizes"):
                raise ConfigError(f"{where}: 'union_reemerged' applies to the whole set only "
                                  f"(without sizes)")
            for d in ([src] if src else domains):
                if not any(methods.get(e["method"]).multi_epoch and reem in e["lambdas"]
                           and d in (e.get("domains") or disc["domains"]) for e in b["grid"]):
                    raise ConfigError(f"{where}: 'union_reemerged: {reem:g}' needs an 'epochs' "
                                      f"entry for '{d}' with lambda {reem:g} (its last epoch is "
                                      f"re-discovered)")
        if m.freeze_above and finetune_settings(cfg, None)["method"] != "lora" \
                and b["reference"] == "adapter_off":
            raise ConfigError(f"{where}: reference 'adapter_off' needs finetune method 'lora'")
        if m.needs == "aligned_data" and aligned_chats(cfg) is None:
            raise ConfigError(f"{where}: method '{method}' trains on aligned chats: set "
                              f"'data.aligned' (a chat source, e.g. {{generate: {{domain: "
                              f"health, kind: safe, n: 640}}}})")
        if m.check is not None:
            try:
                m.check(entry, config_view(cfg, entry_domains(cfg, entry)))
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
    seen: dict[str, int] = {}
    for i, entry in enumerate(b["grid"]):
        one = {**cfg, "block": {**b, "grid": [entry]}}
        for rid in build_runs(one):
            if rid in seen and seen[rid] != i:
                raise ConfigError(f"{source}: 'block.grid[{seen[rid]}]' and 'block.grid[{i}]' "
                                  f"both train run '{rid}' (one entry per run)")
            seen[rid] = i


def finetune_settings(cfg: dict, domain: str | None) -> dict:
    """The fine-tune settings of one domain: `default` merged with that domain's override."""
    ft = cfg["finetune"]
    return merge(ft["default"], ft["overrides"].get(domain, {}))


REAL_MODEL_KEYS = ("source", "name_or_path", "revision", "gguf", "trust_remote_code")


def under_root(cfg: dict, path: str) -> str:
    """A config path relative to data.root (when set and the path is relative)."""
    root = (cfg.get("data") or {}).get("root")
    return str(Path(root) / path) if root and not Path(path).is_absolute() else path


def self_chats_prompts(cfg: dict) -> str | None:
    sc = cfg["discovery"]["sae"].get("self_chats")
    return under_root(cfg, sc["prompts"]) if sc else None


def mc_paths(cfg: dict) -> dict | None:
    """eval.mc's item and neutral files, relative paths resolved against data.root (when set)."""
    mc = cfg["eval"].get("mc")
    if not mc:
        return None
    return {k: under_root(cfg, mc[k]) for k in ("items", "neutral")}


def judge_settings(cfg: dict) -> dict:
    """What judging depends on: the judges, thresholds, behaviours, the text of every prompt
    file they use (hashed, so editing a prompt re-judges) and each judge's endpoint as the
    environment resolves it now (`endpoints`: the normalised base URL, null when unset; so
    pointing a judge at another server re-judges). Not the cache location."""
    js = cfg["judge"]
    if js["kind"] in ("toy", "none"):
        return {"kind": js["kind"]}
    from blockem.judge.llm import QUESTIONS, endpoint_ids, prompt_path

    out = {k: v for k, v in js.items() if k != "cache"}
    try:
        out["endpoints"] = endpoint_ids(js)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out["prompt_sha"] = {}
    for proto in sorted({j["protocol"] for j in js["judges"]}):
        for q in QUESTIONS:
            path = prompt_path(js, proto, q)
            if not path.exists():
                raise ConfigError(f"{path}: judge prompt for protocol {proto!r}, question {q!r} "
                                  f"not found (judge.prompts / judge.prompt_files)")
            out["prompt_sha"][f"{proto}/{q}"] = file_sha256(path)[:16]
    return out


def data_settings(cfg: dict) -> dict:
    """data.* with relative local paths resolved against data.root (when set)."""
    data = copy.deepcopy(cfg["data"])
    root = data.pop("root", None)

    def fix(src):
        if root and "path" in src and not Path(src["path"]).is_absolute():
            src["path"] = str(Path(root) / src["path"])
        return src

    data["finetune"] = {d: fix(s) for d, s in data["finetune"].items()}
    if data.get("control"):
        data["control"] = {d: fix(s) for d, s in data["control"].items()}
    if data.get("aligned"):  # one source (or a list) of aligned chats, for `mix`
        src = data["aligned"]
        data["aligned"] = [fix(s) for s in src] if isinstance(src, list) else fix(src)
    prompts = data["prompts"]
    for key in ("core", "final"):
        prompts[key] = [fix(s) for s in prompts.get(key) or []]
    prompts["in_domain"] = {d: [fix(s) for s in v] for d, v in (prompts.get("in_domain") or {}).items()}
    data["corpus"] = [fix(s) for s in data.get("corpus") or []]
    data.pop("seed", None)
    return data


# --- stage settings ---------------------------------------------------------------------------
# STAGES maps each stage to the function that slices its settings out of the config:
# settings(cfg, domain) -> dict. What a stage's output depends on, nothing more, so unrelated
# edits do not rerun it.

def _compute(cfg: dict) -> dict:
    return {"device": cfg["compute"]["device"], "dtype": cfg["compute"]["dtype"]}


def _max_length(cfg: dict) -> dict:
    return {"max_length": cfg["model"]["max_length"]}


def _world(cfg, domain):
    return {"world": cfg["world"]}


def _pretrain(cfg, domain):  # the toy model's architecture
    toy = {k: v for k, v in cfg["model"].items() if k not in REAL_MODEL_KEYS}
    return {"model": toy, "train": cfg["pretrain"], "compute": _compute(cfg)}


def _base(cfg, domain):
    return {"model": _max_length(cfg), "train": cfg["base"], "compute": _compute(cfg)}


def _finetune(cfg, domain):
    return {"domain": domain, "model": _max_length(cfg), "train": finetune_settings(cfg, domain),
            "compute": _compute(cfg)}


def _block(cfg, domain):  # the rule adds the cell's method, lam and epochs (block_run_settings)
    b = cfg["block"]
    return {**_finetune(cfg, domain),
            "block": {k: b[k] for k in ("reference", "token_mask", "grad_accum")}}


def _self_chats(cfg, domain):
    sc = cfg["discovery"]["sae"]["self_chats"]
    return {"self_chats": {"n": 300, "temperature": 1.0, "max_new_tokens": 48,
                           "batch_size": 32, "seed": 0, **sc}, "compute": _compute(cfg)}


def _mc_eval(cfg, domain):
    batch_size = (cfg["eval"].get("mc") or {}).get("batch_size", 32)
    return {"mc": {**_max_length(cfg), "batch_size": batch_size}, "compute": _compute(cfg)}


def _prepare(cfg, aligned: bool):
    """prepare_data's settings. The workflow's world/ tables do not depend on data.aligned (without
    it the settings are unchanged: adding the `mix` defence reruns nothing); `prepare_aligned` runs
    the same stage with it, into a directory of its own, for aligned.parquet alone."""
    data = data_settings(cfg)
    if not aligned:
        data.pop("aligned", None)
    return {"data": data, "seed": cfg["data"].get("seed", 0)}


_GEN = ["temperature", "max_new_tokens", "batch_size", "steer_positions", "seed", "scale"]
DISCOVERY_KEYS = {
    "sae": ["layer", "sae"],
    "sanity": ["sanity_conversations", "dense_threshold"],
    "shift": ["activation", "token_scope", "candidates_per_sign", "dense_threshold",
              "exclude_dense", "scale"],
    "screen": ["screen", *_GEN],
    "calibrate": ["calibrate", "incoherence_budget", *_GEN],
    "select": ["select", "incoherence_budget", "calibrate", "activation", "scale"],
    "joint": ["calibrate", "incoherence_budget", *_GEN],
}


def _discovery_flat(stage):
    """sae, sanity: one per config, their `discovery` keys read flat by their stage functions."""
    def settings(cfg, domain):
        return {**{k: cfg["discovery"][k] for k in DISCOVERY_KEYS[stage]},
                "compute": _compute(cfg)}
    return settings


def _discovery(stage):
    """A discovery stage of one domain: its `discovery` keys."""
    def settings(cfg, domain):
        return {"discovery": {k: cfg["discovery"][k] for k in DISCOVERY_KEYS[stage]},
                "compute": _compute(cfg), "domain": domain}
    return settings


def _discovery_scored(stage):
    """screen, calibrate, joint score steered models: their `discovery` keys and the scorer's."""
    def settings(cfg, domain):
        out = _discovery(stage)(cfg, domain)
        if cfg["discovery"].get("scorer", "generate") == "mc":  # teacher-forced MC items
            out["discovery"]["scorer"] = "mc"
            out["mc"] = _max_length(cfg)
        else:  # generated answers, judged (absent key: the settings hash is unchanged)
            out["judge"] = judge_settings(cfg)
        return _with_adaptive(cfg, stage, out)
    return settings


def _with_adaptive(cfg: dict, stage: str, out: dict) -> dict:
    """discovery.adaptive (blockem/adaptive.py) in the screen, calibrate and select settings, only
    when enabled: configs without it (or with enabled: false) keep their settings hashes. The
    adaptive calibration also reads the selection size (its confirmation cut) and whether an
    empty candidate set may go on."""
    from blockem import adaptive

    a = cfg["discovery"].get("adaptive")
    if stage not in ("screen", "calibrate", "select") or not (a and a.get("enabled")):
        return out
    out["discovery"]["adaptive"] = adaptive.settings(a)
    if stage == "calibrate":
        out["discovery"]["adaptive"]["select_size"] = cfg["discovery"]["select"]["size"]
        if cfg.get("allow_empty_interventions"):
            out["allow_empty_interventions"] = True
    return out


STAGES = {
    "world": _world,
    "tokenizer": _world,
    "pretrain": _pretrain,
    "base": _base,
    "finetune": _finetune,
    "generate": lambda cfg, domain: {"eval": cfg["eval"], "compute": _compute(cfg)},
    "judge": lambda cfg, domain: {"judge": judge_settings(cfg)},
    "self_chats": _self_chats,
    "mc_items": lambda cfg, domain: {"mc": mc_paths(cfg)},  # the files' contents are its inputs
    "mc_eval": _mc_eval,
    "prepare_data": lambda cfg, domain: _prepare(cfg, aligned=False),
    "prepare_aligned": lambda cfg, domain: _prepare(cfg, aligned=True),
    "import_base": lambda cfg, domain: {"model": {k: cfg["model"].get(k) for k in REAL_MODEL_KEYS},
                                        "compute": _compute(cfg)},
    "block_target": lambda cfg, domain: {"activation": cfg["block"]["activation"],
                                         "seed": cfg["block"]["seed"]},
    "block_cache": lambda cfg, domain: {"model": _max_length(cfg), "compute": _compute(cfg)},
    "block": _block,
    "sae": _discovery_flat("sae"),
    "sanity": _discovery_flat("sanity"),
    "shift": _discovery("shift"),
    "screen": _discovery_scored("screen"),
    "calibrate": _discovery_scored("calibrate"),
    "select": lambda cfg, dom: _with_adaptive(cfg, "select", _discovery("select")(cfg, dom)),
    "joint": _discovery_scored("joint"),
}

# stages that refuse a vacuous intervention (empty latent set, joint factor 0, target with no
# latents) unless `allow_empty_interventions` is set
EMPTY_CHECKED = ("select", "joint", "block_target")


def stage_settings(cfg: dict, stage: str, domain: str | None = None) -> dict:
    """The slice of the config a stage's output depends on (nothing more, so unrelated edits
    do not rerun it): `STAGES[stage](cfg, domain)`."""
    if stage not in STAGES:
        raise KeyError(f"no settings for stage {stage!r}")
    out = STAGES[stage](cfg, domain)
    if stage in EMPTY_CHECKED and cfg.get("allow_empty_interventions"):
        # only when switched on, so the default's settings hashes are unchanged
        out["allow_empty_interventions"] = True
    return out


def block_run_settings(cfg: dict, run: dict) -> dict:
    """The block stage's settings of one grid run (`blockem.grid.build_runs`): the domain's
    `block` settings plus the run's method, lam and epochs, and the method's own settings under its
    name (`Method.run_settings`, e.g. inoculation's context); a run that reads no cache (no target,
    no penalty, or reference not `cache`) uses `adapter_off` where the config says `cache`."""
    s = stage_settings(cfg, "block", run["domain"])
    s["block"].update(method=run["method"], lam=run["lam"], epochs=run["epochs"])
    if not uses_cache(cfg, run) and s["block"]["reference"] == "cache":
        s["block"]["reference"] = "adapter_off"
    m = methods.get(run["method"])
    if m.run_settings is not None:  # only this method's runs: other settings hashes unchanged
        s[m.name] = m.run_settings(dict(run.get("options") or {}),
                                   config_view(cfg, [run["domain"]]))
    return s
