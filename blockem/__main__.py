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
    from blockem.config import load_config, settings_hash, stage_settings

    s = stage_settings(load_config(*args.config), args.stage, args.domain)
    print(json.dumps({"config_hash": settings_hash(s), "settings": s}, indent=2))


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
             threads=args.threads)


def cmd_generate(args) -> None:
    from blockem.generate import generate_file

    generate_file(Path(args.model), Path(args.prompts), Path(args.out),
                  _settings(args, "generate"), cell=args.cell, threads=args.threads)


def cmd_judge(args) -> None:
    from blockem.judge import judge_file

    judge_file(Path(args.generations), Path(args.out), _settings(args, "judge"))


def cmd_cell_metrics(args) -> None:
    from blockem.metrics import cell_metrics_file

    cell_metrics_file(Path(args.judgements), Path(args.out), json.loads(args.cell))


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
    sp.add_argument("--out", required=True)
    sp = stage("generate", cmd_generate, "answer the evaluation prompts", threads=True)
    sp.add_argument("--model", required=True)
    sp.add_argument("--prompts", required=True)
    sp.add_argument("--cell", required=True)
    sp.add_argument("--out", required=True)
    sp = stage("judge", cmd_judge, "label generated answers")
    sp.add_argument("--generations", required=True)
    sp.add_argument("--out", required=True)
    sp = stage("cell-metrics", cmd_cell_metrics, "metric rows of one cell", settings=False)
    sp.add_argument("--judgements", required=True)
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
    from blockem.config import ConfigError

    try:
        args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"blockem {args.stage}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
