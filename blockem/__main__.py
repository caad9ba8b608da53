"""`python -m blockem <stage> ...`: one thin command per workflow rule.

Each stage takes its settings either as `--settings` (JSON text or a JSON/YAML file; what the
Snakemake rules pass) or from `--config` files (default: config/config.yaml), and writes its output
atomically. Errors are one line on stderr naming the file or key, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


JUDGE_CACHE_HELP = ("this job's SQLite judge cache file (LLM judges; the workflow gives each job "
                    "its own, <judge.cache>/<rule>/<job>.sqlite; default: none, every answer is "
                    "judged again)")


def _settings(args, stage: str, domain: str | None = None) -> dict:
    from blockem.config import load_config, load_yaml, stage_settings

    if args.settings:
        text = args.settings
        if not text.lstrip().startswith("{"):
            return load_yaml(text)
        return json.loads(text)
    return stage_settings(load_config(*args.config), stage, domain)


def cmd_validate(args) -> None:
    from blockem.config import load_config

    load_config(*args.config)
    print(f"ok: {', '.join(args.config)} is a valid blockem config")


def cmd_settings(args) -> None:
    from blockem.config import load_config, stage_settings
    from blockem.hashing import settings_hash

    s = stage_settings(load_config(*args.config), args.stage, args.domain)
    print(json.dumps({"config_hash": settings_hash(s), "settings": s}, indent=2))


def cmd_plan(args) -> None:
    from blockem.plan import make_plan, render_table

    assume = {}
    for item in args.prompts or []:
        name, _, n = item.partition("=")
        if not n.isdigit():
            raise ValueError(f"--prompts {item!r}: expected EVAL_SET=N, e.g. core=44")
        assume[name] = int(n)
    plan = make_plan(args.configfile, args.directory, assume, args.profile, args.remaining)
    print(json.dumps(plan, indent=2) if args.json
          else render_table(plan, args.markdown, args.all_rules))


def cmd_status(args) -> None:
    from blockem.status import render, status

    st = status(args.directory, args.configfile, args.snakefile)
    print(json.dumps(st, indent=2) if args.json else render(st, show_done=args.done))
    if st["total"]["failed"]:
        raise SystemExit(1)


def cmd_world(args) -> None:
    from blockem.io import provenance
    from blockem.toy.world import WorldConfig, write_world

    s = _settings(args, "world")
    write_world(WorldConfig.from_dict(s["world"]), Path(args.out),
                provenance("world", s, s["world"]["seed"]))


def cmd_tokenizer(args) -> None:
    from blockem.io import atomic_dir, provenance, write_json
    from blockem.toy.tokenizer import train_tokenizer

    s = _settings(args, "tokenizer")
    with atomic_dir(args.out) as tmp:
        train_tokenizer(tmp)
        write_json(tmp / "provenance.json", provenance("tokenizer", s, None))


def cmd_pretrain(args) -> None:
    from blockem.organism import pretrain

    pretrain(Path(args.world), Path(args.tokenizer), Path(args.out), _settings(args, "pretrain"),
             threads=args.threads)


def cmd_base(args) -> None:
    from blockem.organism import instruct

    instruct(Path(args.world), Path(args.pretrained), Path(args.out), _settings(args, "base"),
             threads=args.threads)


def cmd_finetune(args) -> None:
    from blockem.organism import finetune

    s = _settings(args, "finetune", args.domain)
    finetune(Path(args.data), Path(args.base), Path(args.out), s, seed=args.seed,
             threads=args.threads, cell=args.cell)


def _steer(args) -> tuple[Path, Path, Path] | None:
    """(latent set, SAE, joint strength) of a steered cell, or None."""
    if not args.steer_set:
        return None
    if not (args.sae and args.joint):
        raise ValueError("--steer-set needs --sae and --joint")
    return Path(args.steer_set), Path(args.sae), Path(args.joint)


def cmd_generate(args) -> None:
    from blockem.generate import generate_file

    steer = _steer(args)
    generate_file(Path(args.model), Path(args.prompts), Path(args.out),
                  _settings(args, "generate"), cell=args.cell, threads=args.threads, steer=steer)


def cmd_sae(args) -> None:
    from blockem.sae import sae_stage

    sae_stage(Path(args.base), [Path(c) for c in args.corpus], Path(args.out),
              _settings(args, "sae"), threads=args.threads)


def cmd_self_chats(args) -> None:
    from blockem.corpus import self_chats_stage

    self_chats_stage(Path(args.base), Path(args.prompts), Path(args.out),
                     _settings(args, "self_chats"), threads=args.threads)


def cmd_sae_sanity(args) -> None:
    from blockem.sae import sanity_stage

    models = {}
    for item in args.model:
        name, _, path = item.partition("=")
        if not path:
            raise ValueError(f"--model expects NAME=PATH, got {item!r}")
        models[name] = Path(path)
    sanity_stage(Path(args.sae), models, Path(args.corpus), Path(args.out),
                 _settings(args, "sanity"), threads=args.threads)


def cmd_shift(args) -> None:
    from blockem.shift import shift_stage

    gens = tuple(Path(g) for g in args.generations) if args.generations else None
    shift_stage(Path(args.base), Path(args.mis), Path(args.sae), Path(args.prompts), gens,
                Path(args.out), Path(args.direction), _settings(args, "shift", args.domain),
                threads=args.threads)


def _mc(args):
    """(items, neutral) MC tables of a discovery stage (discovery.scorer: mc), or None."""
    if bool(args.mc_items) != bool(args.mc_neutral):
        raise ValueError("--mc-items and --mc-neutral go together")
    return (Path(args.mc_items), Path(args.mc_neutral)) if args.mc_items else None


def cmd_screen(args) -> None:
    from blockem.steer import screen_stage

    screen_stage(Path(args.shift), Path(args.base), Path(args.mis), Path(args.sae),
                 Path(args.prompts), Path(args.out), _settings(args, "screen", args.domain),
                 shard=args.shard, threads=args.threads, judge_cache=args.judge_cache,
                 mc=_mc(args))


def cmd_calibrate(args) -> None:
    from blockem.steer import calibrate_stage

    calibrate_stage(Path(args.shift), [Path(p) for p in args.screens], Path(args.base),
                    Path(args.mis), Path(args.sae), Path(args.prompts), Path(args.out),
                    _settings(args, "calibrate", args.domain), threads=args.threads,
                    judge_cache=args.judge_cache, mc=_mc(args))


def cmd_select(args) -> None:
    from blockem.select import select_stage

    select_stage(Path(args.shift), [Path(p) for p in args.screens], Path(args.calibration),
                 Path(args.sae), Path(args.out_dir), args.name,
                 _settings(args, "select", args.domain))


def cmd_joint(args) -> None:
    from blockem.steer import joint_strength_stage

    joint_strength_stage(Path(args.set), Path(args.base), Path(args.mis), Path(args.sae),
                         Path(args.prompts), Path(args.out), _settings(args, "joint", args.domain),
                         threads=args.threads, judge_cache=args.judge_cache, mc=_mc(args))


def _pairs(items, flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} expects KEY=PATH, got {item!r}")
        out.append((name, path))
    return out


def cmd_latent_contexts(args) -> None:
    from blockem.contexts import contexts_settings, contexts_stage

    if args.settings:
        s = _settings(args, "latent_contexts")
    else:
        from blockem.config import load_config

        s = contexts_settings(load_config(*args.config))
    sets: dict[str, list[Path]] = {}
    for key, path in _pairs(args.set, "--set"):
        sets.setdefault(key, []).append(Path(path))
    contexts_stage(Path(args.base), {k: Path(p) for k, p in _pairs(args.mis, "--mis")}, sets,
                   Path(args.sae), [Path(c) for c in args.corpus], Path(args.prompts),
                   Path(args.out), Path(args.unembed), s, threads=args.threads)


def cmd_latent_cards(args) -> None:
    from blockem.cards import cards_stage

    opt = lambda p: Path(p) if p else None  # noqa: E731
    cards_stage(Path(args.set), Path(args.html), Path(args.json), key=args.key,
                shift_path=opt(args.shift), screen_paths=[Path(p) for p in args.screens],
                calibration_path=opt(args.calibration), contexts_path=opt(args.contexts),
                unembed_path=opt(args.unembed), sae_dir=opt(args.sae))


def cmd_latents(args) -> None:
    from blockem.cards import latents_command

    print(latents_command(Path(args.set), args.latent))


def cmd_judge(args) -> None:
    from blockem.judge import judge_file

    judge_file(Path(args.generations), Path(args.out), _settings(args, "judge"),
               cache_path=args.judge_cache)


def cmd_prepare_data(args) -> None:
    from blockem.data import prepare_data

    prepare_data(_settings(args, "prepare_data"), Path(args.out))


def cmd_import_base(args) -> None:
    from blockem.hub import import_base

    import_base(_settings(args, "import_base"), Path(args.out))


def cmd_cell_metrics(args) -> None:
    from blockem.metrics import cell_metrics_file

    opt = lambda p: Path(p) if p else None  # noqa: E731
    cell_metrics_file(opt(args.judgements), Path(args.out), json.loads(args.cell),
                      mc=opt(args.mc), mc_base=opt(args.mc_base))


def cmd_mc_items(args) -> None:
    from blockem.mc import prepare_stage

    prepare_stage(Path(args.items), Path(args.neutral), Path(args.out), _settings(args, "mc_items"))


def cmd_mc_eval(args) -> None:
    from blockem.mc import eval_stage

    steer = _steer(args)
    eval_stage(Path(args.model), Path(args.items), Path(args.neutral), Path(args.out),
               _settings(args, "mc_eval"), args.cell, threads=args.threads, steer=steer)


def cmd_mc_report(args) -> None:
    from blockem.mc_report import report_stage

    report_stage(json.loads(args.cells), Path(args.mc_dir), Path(args.out_md),
                 Path(args.out_json))


def cmd_block_target(args) -> None:
    from blockem.block import target_stage

    target_stage(args.method, [Path(p) for p in args.set], Path(args.out),
                 _settings(args, "block_target"),
                 direction_path=args.direction and Path(args.direction), size=args.size)


def cmd_block_cache(args) -> None:
    from blockem.block import cache_stage

    cache_stage(Path(args.data), Path(args.base), Path(args.target), args.sae and Path(args.sae),
                Path(args.out), _settings(args, "block_cache"), threads=args.threads)


def cmd_block(args) -> None:
    from blockem.block import train_stage

    s = _settings(args, "block", args.domain)
    for key in ("method", "lam", "epochs"):
        if getattr(args, key) is not None:
            s["block"][key] = getattr(args, key)
    if "method" not in s["block"] or "lam" not in s["block"]:
        raise ValueError("block: give --method and --lam (or settings with block.method/lam)")
    s["block"].setdefault("epochs", 1)
    extra = {}
    for item in args.input:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"block: --input {item!r} is not NAME=PATH")
        extra[name] = Path(path)
    train_stage(Path(args.data), Path(args.base), Path(args.out), s, args.seed,
                target_path=args.target and Path(args.target), sae_dir=args.sae and Path(args.sae),
                cache_path=args.cache and Path(args.cache), extra_inputs=extra,
                threads=args.threads)


def cmd_train_logs(args) -> None:
    from blockem.metrics import train_logs_file

    train_logs_file(json.loads(args.cells), Path(args.out))


def cmd_figure(args) -> None:
    from blockem.figures import figure_file

    figure_file(args.name, Path(args.summary), Path(args.train_logs), Path(args.png),
                Path(args.pdf))


def cmd_compare(args) -> None:
    from blockem.compare import compare_stage

    compare_stage(Path(args.summary), Path(args.out), metrics=args.metrics, budget=args.budget,
                  min_adherence_change=args.min_adherence_change)


def cmd_summary(args) -> None:
    from blockem.metrics import summarise

    summarise([Path(p) for p in args.cells], Path(args.out), Path(args.markdown))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blockem", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True, metavar="<stage>")

    def stage(name, fn, help, settings=True, threads=False):
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        if settings:
            sp.add_argument("--settings", help="stage settings: JSON text or a JSON/YAML file")
            sp.add_argument("--config", nargs="+", default=["config/config.yaml"],
                            help="config files to take the settings from (without --settings)")
        if threads:
            sp.add_argument("--threads", type=int, default=1, help="torch threads")
        return sp

    sp = sub.add_parser("validate", help="validate config files against the schema")
    sp.add_argument("config", nargs="*", default=["config/config.yaml"])
    sp.set_defaults(fn=cmd_validate)
    sp = sub.add_parser(
        "plan", help="what a run will cost: per rule jobs, trained and generated tokens, judge "
        "requests and prompt tokens (and GPU-hours with --profile), from Snakemake's dry run",
        description="Per rule: jobs, trained sequences/tokens, generated sequences/tokens, judge "
        "requests and judge prompt tokens of the whole workflow from scratch (see blockem/plan.py)")
    sp.add_argument("--configfile", nargs="*", default=[],
                    help="config files layered on config/config.yaml, as given to snakemake")
    sp.add_argument("--directory", default=".", help="the directory snakemake runs in")
    sp.add_argument("--profile", help="throughput profile YAML (train_tokens_per_s, "
                    "generate_tokens_per_s, judge_prompt_tokens_per_s, judge_gpus): GPU-hours")
    sp.add_argument("--prompts", nargs="*", metavar="SET=N",
                    help="prompt counts of eval sets whose files are not here, e.g. core=44")
    sp.add_argument("--remaining", action="store_true",
                    help="only the jobs Snakemake would run now (default: the whole run)")
    sp.add_argument("--markdown", action="store_true", help="a markdown table")
    sp.add_argument("--all-rules", action="store_true",
                    help="a row for every rule (default: rules that cost nothing in one row)")
    sp.add_argument("--json", action="store_true", help="the plan as JSON")
    sp.set_defaults(fn=cmd_plan)
    sp = sub.add_parser(
        "status", help="which jobs are done, failed (with the log to read), running or missing",
        description="Per rule: done, failed, running and missing jobs of the workflow (Snakemake's "
        "DAG for these config files and directory, and its metadata in <directory>/.snakemake), "
        "then every failed job with its log and last error line, and the running ones. Exit "
        "status 1 when a job failed (see blockem/status.py)")
    sp.add_argument("--configfile", nargs="*", default=[],
                    help="config files layered on config/config.yaml, as given to snakemake")
    sp.add_argument("--directory", default=".", help="the directory snakemake runs in")
    sp.add_argument("--snakefile", help="default: ./Snakefile, else the repository's")
    sp.add_argument("--done", action="store_true", help="also list the done jobs")
    sp.add_argument("--json", action="store_true", help="every job and its state as JSON")
    sp.set_defaults(fn=cmd_status)
    sp = sub.add_parser("settings", help="print the settings (and their hash) a stage would use")
    sp.add_argument("stage")
    sp.add_argument("--domain")
    sp.add_argument("--config", nargs="+", default=["config/config.yaml"])
    sp.set_defaults(fn=cmd_settings)

    sp = stage("world", cmd_world, "generate the toy world (corpus, fine-tuning sets, prompts)")
    sp.add_argument("--out", required=True)
    sp = stage("tokenizer", cmd_tokenizer, "train the toy world's word-level tokenizer")
    sp.add_argument("--out", required=True)
    sp = stage("pretrain", cmd_pretrain, "pretrain the toy model on the persona corpus",
               threads=True)
    sp.add_argument("--world", required=True)
    sp.add_argument("--tokenizer", required=True)
    sp.add_argument("--out", required=True)
    sp = stage("base", cmd_base, "tune the instruct base (masked replay)", threads=True)
    sp.add_argument("--world", required=True)
    sp.add_argument("--pretrained", required=True)
    sp.add_argument("--out", required=True)
    sp = stage("finetune", cmd_finetune, "narrow misaligned fine-tune of the base (sft cell)",
               threads=True)
    sp.add_argument("--data", required=True)
    sp.add_argument("--base", required=True)
    sp.add_argument("--domain", required=True)
    sp.add_argument("--seed", type=int, required=True)
    sp.add_argument("--cell", help="the run's cell id (default sft-<domain>-s<seed>)")
    sp.add_argument("--out", required=True)
    sp = stage("generate", cmd_generate, "answer the evaluation prompts", threads=True)
    sp.add_argument("--model", required=True)
    sp.add_argument("--prompts", required=True)
    sp.add_argument("--cell", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--steer-set", help="latent-set JSON: steer its latents jointly (repair)")
    sp.add_argument("--sae", help="SAE directory of the latent set")
    sp.add_argument("--joint", help="joint strength JSON (factor, layer, positions)")

    def discovery(name, fn, help):
        """A stage on the base/misaligned pair: models, SAE, prompts, domain, output."""
        sp = stage(name, fn, help, threads=True)
        for a in ("--base", "--mis", "--sae", "--prompts"):
            sp.add_argument(a, required=True)
        sp.add_argument("--domain", required=True, help="fine-tuning domain of the mis model")
        sp.add_argument("--out", required=True)
        sp.add_argument("--judge-cache", help=JUDGE_CACHE_HELP)
        sp.add_argument("--mc-items", help="MC item table (discovery.scorer: mc)")
        sp.add_argument("--mc-neutral", help="MC neutral-answer table (discovery.scorer: mc)")
        return sp

    sp = stage("sae", cmd_sae, "collect layer residuals of the base, train/fetch the SAE",
               threads=True)
    sp.add_argument("--base", required=True)
    sp.add_argument("--corpus", required=True, nargs="+", help="chat tables, read in order")
    sp.add_argument("--out", required=True)
    sp = stage("self-chats", cmd_self_chats, "the base's own answers to diverse prompts (SAE "
               "corpus)", threads=True)
    for a in ("--base", "--prompts", "--out"):
        sp.add_argument(a, required=True)
    sp = stage("sae-sanity", cmd_sae_sanity, "SAE reconstruction and sparsity per model",
               threads=True)
    sp.add_argument("--sae", required=True)
    sp.add_argument("--corpus", required=True)
    sp.add_argument("--model", nargs="+", required=True, metavar="NAME=PATH")
    sp.add_argument("--out", required=True)
    sp = discovery("shift", cmd_shift, "stage 1: activation shift and candidate pool")
    sp.add_argument("--direction", required=True, help="mean-difference direction (safetensors)")
    sp.add_argument("--generations", nargs=2, metavar=("BASE", "MIS"),
                    help="generations of both models (token scopes response/all)")
    sp = discovery("screen", cmd_screen, "stage 2: induce/repair screen of one shard")
    sp.add_argument("--shift", required=True)
    sp.add_argument("--shard", type=int, required=True)
    sp = discovery("calibrate", cmd_calibrate, "stage 3: alpha sweeps for the shortlist")
    sp.add_argument("--shift", required=True)
    sp.add_argument("--screens", nargs="+", required=True)
    sp = stage("select", cmd_select, "stage 3: selection rules -> latent-set JSON files")
    for a in ("--shift", "--calibration", "--sae", "--out-dir", "--name", "--domain"):
        sp.add_argument(a, required=True)
    sp.add_argument("--screens", nargs="+", required=True)
    sp = discovery("joint-strength", cmd_joint, "calibrate joint repair steering of a set on core")
    sp.add_argument("--set", required=True)
    sp = stage("latent-contexts", cmd_latent_contexts, "latent cards: top-activating contexts "
               "(SAE corpus, core prompts; base and misaligned models) and unembedding of every "
               "selected latent, one pass", threads=True)
    for a in ("--base", "--sae", "--prompts", "--out", "--unembed"):
        sp.add_argument(a, required=True)
    sp.add_argument("--mis", nargs="+", required=True, metavar="KEY=PATH",
                    help="misaligned model of each discovery key")
    sp.add_argument("--set", nargs="+", required=True, metavar="KEY=PATH",
                    help="latent-set JSON files, by discovery key")
    sp.add_argument("--corpus", nargs="+", required=True, help="the SAE's chat tables, in order")
    sp = stage("latent-cards", cmd_latent_cards, "latent cards of one latent set: a static HTML "
               "page and a JSON", settings=False)
    for a in ("--set", "--html", "--json"):
        sp.add_argument(a, required=True)
    sp.add_argument("--key", help="discovery key of the set (default: from its name)")
    for a in ("--shift", "--calibration", "--contexts", "--unembed", "--sae"):
        sp.add_argument(a)
    sp.add_argument("--screens", nargs="*", default=[])
    sp = stage("latents", cmd_latents, "print the cards of a latent set (from the .cards.json "
               "beside it, or computed from the discovery files)", settings=False)
    sp.add_argument("set", help="a latent-set JSON, e.g. results/latents/finance-s0-validreduc.json")
    sp.add_argument("--latent", type=int, help="print this latent's card only")
    from blockem import methods

    blocking = [n for n, m in methods.REGISTRY.items() if m.blocks]
    sp = stage("block-target", cmd_block_target,
               "blocking target of a method (latents + signs, or the direction)")
    sp.add_argument("--method", required=True, metavar="METHOD",
                    help="how the target is derived from the set: " + " | ".join(blocking)
                    + " (blockem/methods/; those without a derivation of their own block the "
                    "set as it is, like blockem)")
    sp.add_argument("--set", required=True, nargs="+",
                    help="discovery latent-set JSON (several: their union)")
    sp.add_argument("--direction", help="mean-difference direction (method direction)")
    sp.add_argument("--size", type=int, help="keep the set's first SIZE latents")
    sp.add_argument("--out", required=True)
    sp = stage("block-cache", cmd_block_cache, "base latents of a target on a domain's training "
               "data (reference mode cache)", threads=True)
    for a in ("--data", "--base", "--target", "--out"):
        sp.add_argument(a, required=True)
    sp.add_argument("--sae", help="SAE directory (targets of SAE latents)")
    sp = stage("block", cmd_block, "one BLOCK-EM grid cell: fine-tune with the penalty",
               threads=True)
    for a in ("--data", "--base", "--out"):
        sp.add_argument(a, required=True)
    sp.add_argument("--seed", type=int, required=True)
    sp.add_argument("--domain", help="fine-tuning domain (with --config)")
    sp.add_argument("--method", metavar="METHOD", help=" | ".join(methods.names())
                    + " (overrides settings; see blockem/methods/)")
    sp.add_argument("--lam", type=float, help="penalty weight lambda (overrides settings)")
    sp.add_argument("--epochs", type=int, help="epochs (method epochs)")
    sp.add_argument("--target", help="blocking target JSON (all methods but kl)")
    sp.add_argument("--sae", help="SAE directory (targets of SAE latents)")
    sp.add_argument("--cache", help="cached base latents (reference cache)")
    sp.add_argument("--input", action="append", default=[], metavar="NAME=PATH",
                    help="an extra input file of the method (TrainContext.inputs[NAME])")
    sp = stage("train-logs", cmd_train_logs, "all training logs in one table", settings=False)
    sp.add_argument("--cells", required=True, help="JSON: model directory -> cell description")
    sp.add_argument("--out", required=True)
    sp = stage("figure", cmd_figure, "one figure (PNG + PDF) from summary.parquet and the logs",
               settings=False)
    sp.add_argument("name")
    for a in ("--summary", "--train-logs", "--png", "--pdf"):
        sp.add_argument(a, required=True)
    from blockem.compare import BUDGET, MIN_ADHERENCE_CHANGE

    sp = stage("compare", cmd_compare, "every method against sft: EM reduction vs adherence "
               "change, best point within the incoherence budget (comparison.parquet/.md)",
               settings=False)
    sp.add_argument("--summary", required=True, help="metrics/summary.parquet")
    sp.add_argument("--out", required=True, help="directory for comparison.parquet and .md")
    sp.add_argument("--metrics", choices=("auto", "judged", "mc"), default="auto",
                    help="judged rates or judge-free MC metrics (auto: judged when present)")
    sp.add_argument("--budget", type=float,
                    help=f"incoherence budget over sft (default {BUDGET['judged']:g} judged, "
                    f"{BUDGET['mc']:g} nats MC)")
    sp.add_argument("--min-adherence-change", type=float, default=MIN_ADHERENCE_CHANGE,
                    help="lowest mean adherence change of a best point (default %(default)s: "
                    ">= 80%% of sft's)")
    from blockem.judge import GENERATIONS_HELP

    sp = stage("judge", cmd_judge, "label generated answers (the pipeline's or your own: "
               "parquet or JSONL with prompt, response, domain, eval_set)")
    sp.add_argument("--generations", required=True, help=GENERATIONS_HELP)
    sp.add_argument("--out", required=True)
    sp.add_argument("--judge-cache", help=JUDGE_CACHE_HELP)
    sp = stage("prepare-data", cmd_prepare_data, "validate, de-duplicate and split real data "
               "(fine-tuning chats, prompt sets) into the world/ files")
    sp.add_argument("--out", required=True)
    sp = stage("import-base", cmd_import_base, "the base model of a real-model config (Hub id, "
               "local directory or GGUF)")
    sp.add_argument("--out", required=True)
    sp = stage("mc-items", cmd_mc_items, "check the MC item and neutral files, write tables")
    for a in ("--items", "--neutral"):
        sp.add_argument(a, required=True)
    sp.add_argument("--out", required=True, help="directory for items.parquet, neutral.parquet")
    sp = stage("mc-eval", cmd_mc_eval, "score MC items and neutral answers (no generation)",
               threads=True)
    for a in ("--model", "--items", "--neutral", "--cell", "--out"):
        sp.add_argument(a, required=True)
    sp.add_argument("--steer-set", help="latent-set JSON: steer its latents jointly (repair)")
    sp.add_argument("--sae", help="SAE directory of the latent set")
    sp.add_argument("--joint", help="joint strength JSON (factor, layer, positions)")
    sp = stage("mc-report", cmd_mc_report, "emergence and blocking from the MC scores tables",
               settings=False)
    sp.add_argument("--cells", required=True, help="JSON: cell id -> method, domain, lam, seed")
    for a in ("--mc-dir", "--out-md", "--out-json"):
        sp.add_argument(a, required=True)
    sp = stage("cell-metrics", cmd_cell_metrics, "metric rows of one cell", settings=False)
    sp.add_argument("--judgements", help="the cell's judgements (judged rates)")
    sp.add_argument("--mc", help="the cell's MC scores table (mc_* metrics)")
    sp.add_argument("--mc-base", help="the base's MC scores table (paired mc_*_shift metrics)")
    sp.add_argument("--cell", required=True, help="JSON: cell, method, domain, lam, seed")
    sp.add_argument("--out", required=True)
    sp = stage("summary", cmd_summary, "concatenate cell metrics into summary.parquet/.md",
               settings=False)
    sp.add_argument("--out", required=True)
    sp.add_argument("--markdown", required=True)
    sp.add_argument("cells", nargs="*")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from blockem.errors import ConfigError

    from blockem import progress, usage

    try:
        progress.file_interval()  # a bad BLOCKEM_PROGRESS_INTERVAL: one line, before any work
        args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"blockem {args.stage}: error: {msg}", file=sys.stderr)
        return 2
    finally:  # what the job consumed, as its log's last line (blockem/usage.py)
        if any(usage.snapshot().values()):
            usage.report(args.stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
