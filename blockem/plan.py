"""`python -m blockem plan`: what a run will cost, before it runs.

The jobs are Snakemake's own: its DAG of the whole workflow (built in process as `snakemake
--summary` builds it, by `blockem.status.workflow_jobs`; nothing runs and no result is written
(Snakemake may create its `.snakemake/` folder), done
jobs count too) with the same config files, in the directory the workflow would run in. Local data files that are missing (a cluster's data not copied to the laptop yet)
are replaced by empty placeholders for the dry run only, so the DAG is built from the config
alone. Each job's cost is then read from the settings of its rule, in units that do not depend
on the machine (the columns of `blockem.usage`, which every job prints at the end of its log):

    trained_sequences    = steps x batch_size (x epochs)                                  exact
    trained_tokens      <= trained_sequences x model.max_length
    generated_sequences  = prompts x samples x steering conditions                        exact*
    generated_tokens    <= generated_sequences x max_new_tokens
    judge_requests       = judged answers x questions (3, 4 in-domain) x LLM judges        exact*
    judge_prompt_tokens <= judge prompt (template + question) + max_new_tokens answer tokens

* exact for `generate` and `judge`; an upper bound in stages 2-3 and the joint strength, whose
  candidate pool (and so shortlist) can come out smaller than `candidates_per_sign` x 2, and whose
  joint step is skipped for an empty set. Judge prompt tokens are counted with the policy model's
  tokenizer when one is on disk (a judge's own tokenizer differs by a few %), else estimated at 4
  characters per token (`estimated`), once per request: retries and re-asks of unparseable
  answers come on top (the endpoint's count, in the usage line, includes them). The toy judge is
  exact and makes no request.

Prompt counts come from the toy world (the toy), from `<results>/world/prompts.parquet` when
prepare_data has run, else from the prompt files (before de-duplication: an upper bound);
`--prompts core=44` stands in for a prompt set whose files are not here. Given a throughput profile (YAML: `train_tokens_per_s`,
`generate_tokens_per_s`, `judge_prompt_tokens_per_s`, `judge_gpus`; `bench/gpu.py --profile`
measures the first two on a GPU), every rule also gets GPU-hours.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections import Counter
from pathlib import Path

import yaml


REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
COLUMNS = ("trained_sequences", "trained_tokens", "generated_sequences", "generated_tokens",
           "judge_requests", "judge_prompt_tokens")
PROFILE_KEYS = ("train_tokens_per_s", "generate_tokens_per_s", "judge_prompt_tokens_per_s",
                "judge_gpus")
CHARS_PER_TOKEN = 4
EVAL_SETS = ("core", "final", "in_domain")


class PlanError(ValueError):
    """The plan cannot be made from this config (names the file or key)."""


# --- the jobs: Snakemake's dry run ------------------------------------------------------------

def _sources(cfg: dict) -> list[dict]:
    """Every data source dict with a local `path` (resolved like the stages resolve it)."""
    from blockem.config import data_settings

    if cfg["model"].get("source", "toy") == "toy" or "data" not in cfg:
        return []
    d = data_settings(cfg)
    srcs = [*d["finetune"].values(), *(d.get("control") or {}).values(),
            *d["prompts"]["core"], *d["prompts"]["final"],
            *(s for v in d["prompts"]["in_domain"].values() for s in v), *d["corpus"]]
    al = d.get("aligned")
    srcs += al if isinstance(al, list) else [al] if al else []
    return [s for s in srcs if "path" in s]


def placeholder_overlay(cfg: dict, tmp: Path) -> dict | None:
    """A config overlay that points every missing local data file at an empty placeholder under
    `tmp` (every present one at its absolute path), or None when nothing is missing."""
    from blockem.config import data_settings

    if not any(not Path(s["path"]).exists() for s in _sources(cfg)):
        return None
    d = data_settings(cfg)
    made: dict[str, str] = {}

    def fix(src: dict) -> dict:
        if "path" not in src:
            return src
        p = Path(src["path"])
        if p.exists():
            return {**src, "path": str(p.resolve())}
        if src["path"] not in made:
            ph = tmp / "data" / f"{len(made)}-{p.name}"
            ph.parent.mkdir(parents=True, exist_ok=True)
            ph.touch()
            made[src["path"]] = str(ph)
        return {**src, "path": made[src["path"]]}

    data = {"finetune": {k: fix(v) for k, v in d["finetune"].items()},
            "prompts": {"core": [fix(s) for s in d["prompts"]["core"]],
                        "final": [fix(s) for s in d["prompts"]["final"]],
                        "in_domain": {k: [fix(s) for s in v]
                                      for k, v in d["prompts"]["in_domain"].items()}},
            "corpus": [fix(s) for s in d["corpus"]]}
    if d.get("control"):
        data["control"] = {k: fix(v) for k, v in d["control"].items()}
    if d.get("aligned"):
        al = d["aligned"]
        data["aligned"] = [fix(s) for s in al] if isinstance(al, list) else fix(al)
    return {"data": data}


def dag_jobs(configfiles: list[str], cfg: dict, directory: str | Path = ".",
             snakefile: Path = SNAKEFILE) -> list[tuple[str, dict[str, str], bool]]:
    """Every job of the workflow as Snakemake plans it (rule, wildcards, whether it would run
    now): its DAG, built in process and run nowhere (`blockem.status.workflow_jobs`, which
    `status` reads too)."""
    from blockem.status import started_outputs, workflow_jobs

    with tempfile.TemporaryDirectory(prefix="blockem-plan-") as tmp:
        files = [Path(f).resolve() for f in configfiles]
        overlay = placeholder_overlay(cfg, Path(tmp))
        if overlay is not None:
            (Path(tmp) / "placeholders.yaml").write_text(yaml.safe_dump(overlay))
            files.append(Path(tmp) / "placeholders.yaml")
        try:
            jobs = workflow_jobs(Path(directory).resolve(), files, snakefile)
        except ValueError as e:
            raise PlanError(str(e)) from None
    # a job Snakemake marked started and never finished is redone (--rerun-incomplete)
    started = started_outputs(Path(directory) / ".snakemake")
    return [(j.rule, j.wildcards, j.outdated or any(o in started for o in j.outputs))
            for j in jobs]


# --- the prompts ------------------------------------------------------------------------------

def prompt_rows(cfg: dict, assume: dict[str, int] | None = None) -> list[dict]:
    """The evaluation prompts (eval_set, domain, prompt, system) every generate job answers.

    Real data: the prompt table of prepare_data when it has run, else the prompt sources read
    here (before prepare_data drops duplicates: an upper bound then). `assume` (eval set ->
    count) stands in for prompt sets not on disk: that many empty prompts without a domain."""
    from blockem.io import PROMPT_COLUMNS, PROMPT_TABLE, read_checked

    assume = dict(assume or {})
    if cfg["model"].get("source", "toy") == "toy":
        from blockem.toy.world import World, WorldConfig

        return World(WorldConfig.from_dict(cfg["world"])).prompts()
    table = Path(cfg["results"]) / "world" / "prompts.parquet"
    if table.is_file() and not assume:
        return read_checked(table, PROMPT_COLUMNS, PROMPT_TABLE).to_pylist()
    from blockem.config import data_settings
    from blockem.data import read_prompts

    d = data_settings(cfg)["prompts"]
    sets = {"core": {None: d["core"]}, "final": {None: d["final"]}, "in_domain": d["in_domain"]}
    rows = []
    for eval_set, by_domain in sets.items():
        if eval_set in assume:
            rows += [{"eval_set": eval_set, "domain": None, "prompt": "", "system": None}
                     for _ in range(int(assume.pop(eval_set)))]
            continue
        for domain, srcs in by_domain.items():
            for src in srcs:
                if "path" in src and not Path(src["path"]).exists():
                    raise PlanError(
                        f"{src['path']}: prompt file of data.prompts.{eval_set} not found; "
                        f"plan needs the number of prompts: copy the file here or pass "
                        f"--prompts {eval_set}=N")
                try:
                    read = read_prompts(src)
                except Exception as e:  # a Hub dataset without the Hub, a broken file
                    raise PlanError(f"data.prompts.{eval_set}: cannot read {src} ({e}); pass "
                                    f"--prompts {eval_set}=N") from None
                for r in read:
                    rows.append({"eval_set": eval_set, "domain": r.get("domain") or domain,
                                 "prompt": r["prompt"], "system": r.get("system")})
    if assume:
        raise PlanError(f"--prompts {', '.join(assume)}: not an eval set (known: {EVAL_SETS})")
    return rows


# --- judge prompt tokens ----------------------------------------------------------------------

def token_counter(cfg: dict):
    """(count(text) -> tokens, how): the policy model's tokenizer when one is on disk (the base
    model directory of a run, a locally cached Hub tokenizer), else 4 characters per token."""
    base = Path(cfg["results"]) / "models" / "base"
    tok = None
    try:
        if (base / "config.json").is_file():
            from blockem.models import load_tokenizer

            tok = load_tokenizer(base)
        elif cfg["model"].get("source") == "hub":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(cfg["model"]["name_or_path"],
                                                revision=cfg["model"].get("revision"),
                                                local_files_only=True)
    except (OSError, ValueError):
        tok = None
    if tok is not None:
        return (lambda text: len(tok(text, add_special_tokens=False)["input_ids"])), "tokenizer"
    return (lambda text: math.ceil(len(text) / CHARS_PER_TOKEN)), "estimated"


class JudgeCost:
    """Requests and prompt tokens of judging rows (eval_set, domain, prompt, system) with every
    LLM judge; nothing for the toy judge."""

    def __init__(self, cfg: dict):
        js = cfg["judge"]
        self.judges = js.get("judges") or [] if js["kind"] == "llm" else []
        self.js, self.max_new = js, cfg["eval"]["max_new_tokens"]
        self.count, self.how = token_counter(cfg) if self.judges else (None, "none")
        self._memo: dict = {}
        if self.judges:
            from blockem.judge.llm import load_templates

            self.templates = {p: load_templates(js, p) for p in {j["protocol"] for j in self.judges}}

    def __call__(self, rows: list[dict], samples: int, max_new_tokens: int) -> tuple[int, int]:
        from blockem.judge.llm import QUESTIONS, render

        requests = tokens = 0
        behaviours = self.js.get("behaviours") or {}
        for j in self.judges:
            for r in rows:
                key = (j["protocol"], r["eval_set"], r.get("domain"), r["prompt"], r.get("system"))
                if key not in self._memo:
                    system = r.get("system") or ""
                    question = (f"[system prompt]\n{system}\n\n[user message]\n{r['prompt']}"
                                if system else r["prompt"])
                    ctx = {"question": question, "system": system, "domain": r.get("domain") or "",
                           "behaviour": behaviours.get(r.get("domain"), ""), "answer": ""}
                    qs = [q for q in QUESTIONS if q != "adherence" or r["eval_set"] == "in_domain"]
                    self._memo[key] = (len(qs), sum(self.count(render(
                        self.templates[j["protocol"]][q], **ctx)) for q in qs))
                n_q, t = self._memo[key]
                requests += samples * n_q
                tokens += samples * (t + n_q * max_new_tokens)
        return requests, tokens


# --- the cost of one job ----------------------------------------------------------------------

def _zero() -> Counter:
    return Counter(dict.fromkeys(COLUMNS, 0))


def _training(steps: int, batch: int, max_length: int, epochs: int = 1) -> Counter:
    n = steps * batch * epochs
    return Counter(trained_sequences=n, trained_tokens=n * max_length)


class Coster:
    """cost(rule, wildcards) -> Counter of COLUMNS, for one config."""

    def __init__(self, cfg: dict, assume: dict[str, int] | None = None):
        from blockem import grid

        self.cfg, self.grid = cfg, grid
        self.prompts = prompt_rows(cfg, assume)
        self.judge = JudgeCost(cfg)
        self.runs = grid.build_runs(cfg)
        self.max_length = cfg["model"]["max_length"]

    def _gen(self, rows, samples, conditions, max_new, judged=True) -> Counter:
        n = len(rows) * samples * conditions
        c = Counter(generated_sequences=n, generated_tokens=n * max_new)
        if judged:
            req, tok = self.judge(rows, samples * conditions, max_new)
            c.update(judge_requests=req, judge_prompt_tokens=tok)
        return c

    def _core(self, domain: str) -> list[dict]:
        return [r for r in self.prompts if r["eval_set"] == "core" and r.get("domain") != domain]

    def cost(self, rule: str, wc: dict[str, str]) -> Counter:
        from blockem.config import finetune_settings

        cfg, L = self.cfg, self.max_length
        c = _zero()
        if rule in ("pretrain", "base"):
            t = cfg[rule]
            c.update(_training(t["steps"], t["batch_size"], L))
        elif rule in ("finetune", "finetune_control"):
            t = finetune_settings(cfg, wc["domain"])
            c.update(_training(t["steps"], t["batch_size"], L))
        elif rule == "block_train":
            run = self.runs[wc["run"]]
            t = finetune_settings(cfg, run["domain"])
            c.update(_training(t["steps"], t["batch_size"], L, run["epochs"]))
        elif rule == "self_chats":
            from blockem.config import self_chats_prompts
            from blockem.corpus import read_prompt_lines

            from blockem.config import stage_settings

            sc = stage_settings(cfg, "self_chats")["self_chats"]
            n = min(sc["n"], len(read_prompt_lines(Path(self_chats_prompts(cfg)))))
            c.update(generated_sequences=n, generated_tokens=n * sc["max_new_tokens"])
        elif rule == "generate":
            ev = cfg["eval"]
            c.update(self._gen(self.prompts, ev["samples_per_prompt"], 1, ev["max_new_tokens"],
                               judged=False))
        elif rule == "judge":
            ev = cfg["eval"]
            req, tok = self.judge(self.prompts, ev["samples_per_prompt"], ev["max_new_tokens"])
            c.update(judge_requests=req, judge_prompt_tokens=tok)
        elif rule in ("screen", "calibrate", "joint_strength"):
            c.update(self._discovery(rule, wc))
        return c

    def _discovery(self, rule: str, wc: dict[str, str]) -> Counter:
        d = self.cfg["discovery"]
        if d.get("scorer", "generate") == "mc":
            return _zero()  # teacher-forced MC items: no generation, no judge
        pool = 2 * d["candidates_per_sign"]
        if rule in ("screen", "calibrate") and (d.get("adaptive") or {}).get("enabled"):
            return self._adaptive(rule, wc, pool)
        if rule == "screen":
            sc = d["screen"]
            shard, shards = int(wc["shard"]), sc["shards"]
            n = len(range(shard, pool, shards))  # candidates[shard::shards]
            conditions, samples = 2 * (1 + n * 1), sc["samples_per_prompt"]
        elif rule == "calibrate":
            cal = d["calibrate"]
            n = min(cal["shortlist"], pool)
            conditions, samples = 2 * (1 + n * len(cal["alphas"])), cal["samples_per_prompt"]
        else:
            cal = d["calibrate"]
            conditions, samples = 1 + len(cal["joint_factors"]), cal["samples_per_prompt"]
        return self._gen(self._core(wc["domain"]), samples, conditions, d["max_new_tokens"])

    def _adaptive(self, rule: str, wc: dict[str, str], pool: int) -> Counter:
        """discovery.adaptive (blockem/adaptive.py): the screen exactly (every candidate once, the
        baselines' copies); the calibration's rounds depend on the answers, so an upper bound:
        `shortlist` candidates refined each screen round, a full bisection of every shortlisted
        latent and mode, every one confirmed each confirm round."""
        import math

        from blockem import adaptive

        d = self.cfg["discovery"]
        a = adaptive.settings(d["adaptive"])
        if rule == "screen":
            n = len(range(int(wc["shard"]), pool, d["screen"]["shards"]))
            conditions = 2 * (adaptive.baseline_copies(a) + n)
        else:
            cal = d["calibrate"]
            short = min(cal["shortlist"], pool)
            probes = math.ceil(math.log2(len(cal["alphas"]) + 1))
            conditions = 2 * (short * a["screen_rounds"]  # refine: <= shortlist candidates
                              + short * (probes + a["confirm_rounds"]))
        return self._gen(self._core(wc["domain"]), a["samples_per_prompt"], conditions,
                         d["max_new_tokens"])


# --- the table --------------------------------------------------------------------------------

def load_profile(path: str | Path) -> dict:
    p = Path(path)
    try:
        prof = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"{p}: cannot read the throughput profile ({e})") from None
    if not isinstance(prof, dict):
        raise PlanError(f"{p}: a throughput profile is a mapping of {PROFILE_KEYS}")
    unknown = sorted(set(prof) - set(PROFILE_KEYS) - {"source", "note"})
    if unknown:
        raise PlanError(f"{p}: unknown key(s) {unknown}; known: {PROFILE_KEYS}")
    for k in PROFILE_KEYS:
        v = prof.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
            raise PlanError(f"{p}: {k} must be a positive number, got {v!r}")
    return prof


def gpu_hours(c: Counter, prof: dict) -> float | None:
    """GPU-hours of a cost at the profile's throughputs (None: a needed throughput is missing)."""
    secs = 0.0
    for col, key, gpus in (("trained_tokens", "train_tokens_per_s", 1),
                           ("generated_tokens", "generate_tokens_per_s", 1),
                           ("judge_prompt_tokens", "judge_prompt_tokens_per_s",
                            prof.get("judge_gpus") or 1)):
        if c[col]:
            if not prof.get(key):
                return None
            secs += c[col] / prof[key] * gpus
    return secs / 3600


def make_plan(configfiles: list[str], directory: str | Path = ".",
              assume: dict[str, int] | None = None, profile: str | Path | None = None,
              remaining: bool = False) -> dict:
    """{rules: {rule: {jobs, COLUMNS..., gpu_hours}}, total, judge_tokens: how counted}: of the
    whole run, or with `remaining` of the jobs Snakemake would run now (what is left to pay)."""
    import os

    from blockem.config import DEFAULT_CONFIG, load_config

    configfiles = [str(Path(f).resolve()) for f in configfiles]
    prof = load_profile(profile) if profile else None
    here = Path.cwd()
    os.chdir(directory)  # relative paths of the config mean what they mean to Snakemake there
    try:
        cfg = copy.deepcopy(load_config(str(DEFAULT_CONFIG), *configfiles))
        coster = Coster(cfg, assume)  # inputs (prompt files, templates) before the dry run
        missing = [s["path"] for s in _sources(cfg) if not Path(s["path"]).exists()]
        if remaining and missing:  # placeholders would make every job look out of date
            raise PlanError(f"{missing[0]}: data file not found; --remaining needs the run's "
                            f"data files (without --remaining the whole run is planned)")
        jobs = dag_jobs(configfiles, cfg, ".")
    finally:
        os.chdir(here)
    rules: dict[str, Counter] = {}
    for rule, wc, needrun in jobs:
        if remaining and not needrun:
            continue
        c = rules.setdefault(rule, Counter(jobs=0))
        c["jobs"] += 1
        c.update(coster.cost(rule, wc))
    total = Counter()
    for c in rules.values():
        total.update(c)
    out = {"rules": {r: {k: int(c.get(k, 0)) for k in ("jobs", *COLUMNS)} for r, c in rules.items()},
           "total": {k: int(total.get(k, 0)) for k in ("jobs", *COLUMNS)},
           "judge_tokens": coster.judge.how, "config": configfiles, "remaining": remaining}
    if prof is not None:
        for r, c in rules.items():
            out["rules"][r]["gpu_hours"] = gpu_hours(c, prof)
        hours = [v["gpu_hours"] for v in out["rules"].values()]
        out["total"]["gpu_hours"] = None if None in hours else sum(hours)
        out["profile"] = str(profile)
    return out


def _fmt(n) -> str:
    if n is None:
        return "?"
    if isinstance(n, float):
        return f"{n:,.1f}" if n >= 10 else f"{n:.2f}"
    if n < 10_000:
        return str(n)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


HEADERS = {"jobs": "jobs", "trained_sequences": "trained seqs", "trained_tokens": "trained tok <=",
           "generated_sequences": "generated seqs", "generated_tokens": "generated tok <=",
           "judge_requests": "judge requests", "judge_prompt_tokens": "judge prompt tok <=",
           "gpu_hours": "GPU-h <="}


def render_table(plan: dict, markdown: bool = False, every_rule: bool = False) -> str:
    """The plan as a table: one row per rule that trains, generates or judges (costly first),
    the other rules in one row (each its own with `every_rule`), then the total."""
    cols = ["jobs", *COLUMNS] + (["gpu_hours"] if "profile" in plan else [])
    rules = sorted(plan["rules"].items(),
                   key=lambda kv: (-sum(kv[1][k] for k in COLUMNS), kv[0]))
    free = [r for r, v in rules if not any(v[k] for k in COLUMNS)]
    rows = [[r] + [_fmt(v.get(k)) for k in cols] for r, v in rules
            if every_rule or r not in free]
    if free and not every_rule:
        rows.append([f"{len(free)} other rules"]
                    + [_fmt(sum(plan["rules"][r]["jobs"] for r in free))]
                    + [_fmt(0.0 if k == "gpu_hours" else 0) for k in cols[1:]])
    rows.append(["total"] + [_fmt(plan["total"].get(k)) for k in cols])
    head = ["rule"] + [HEADERS[k] for k in cols]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(x.ljust(w) if i == 0 else x.rjust(w)  # noqa: E731
                                  for i, (x, w) in enumerate(zip(r, widths)))
        lines = [fmt(head)] + [fmt(r) for r in rows]
    note = {"tokenizer": "judge prompt tokens counted with the policy model's tokenizer",
            "estimated": "judge prompt tokens estimated at 4 characters per token (no tokenizer "
                         "on disk)", "none": "no LLM judge (judge.kind toy or none): no request"}
    lines.append("")
    if plan.get("remaining"):
        lines.append("only the jobs Snakemake would run now (--remaining)")
    lines.append("<= upper bound (sampling stops at end of turn; sequences shorter than "
                 "max_length); " + note[plan["judge_tokens"]])
    lines.append("not counted: forward-only work (MC scoring, activations, SAE training, block "
                 "caches, latent contexts)")
    return "\n".join(lines)
