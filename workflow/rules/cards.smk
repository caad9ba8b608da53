# Latent cards (blockem/cards.py): what the selected latents are. One pass over the SAE corpus and
# the core prompts for the union of every selected set's latents (latent_contexts: top-activating
# contexts in the base and each misaligned model, and the unembedding of each decoder direction),
# then one cheap job per set (latent_cards: a self-contained HTML page, in `snakemake --report`,
# and a JSON beside the set). `card_outputs()` lists them for rule all.

import json as _json
from types import SimpleNamespace as _NS

from blockem.contexts import contexts_settings

CARD_SETS = [(k, r) for k in discovery_keys() for r in SELECT_RULES] if DISC["domains"] else []
CARDS = f"{R}/latents/{DKEY}-{{selrule}}"


wildcard_constraints:
    selrule=one_of(SELECT_RULES),


def card_outputs():
    """Every selected set's card page and JSON (none without discovery)."""
    return [f"{R}/latents/{k}-{r}.{ext}" for k, r in CARD_SETS for ext in ("html", "cards.json")]


def _key_wildcards(key):
    domain, seed = key.split("-s", 1)
    return _NS(domain=domain, seed=seed)


def contexts_inputs(wildcards):
    keys = discovery_keys()
    return {"base": BASE, "sae": rules.sae.output[0], "corpus": SAE_CORPUS, "prompts": PROMPTS,
            "mis": [mis_model(_key_wildcards(k)) for k in keys],
            "sets": [f"{R}/latents/{k}-{r}.json" for k, r in CARD_SETS]}


def contexts_flags(wildcards, input):
    keys = discovery_keys()
    mis = [mis_path(_key_wildcards(k), _NS(mis=m)) for k, m in zip(keys, input.mis)]
    return " ".join(["--mis", *(q(f"{k}={m}") for k, m in zip(keys, mis)),
                     "--set", *(q(f"{k}={s}") for (k, _), s in zip(CARD_SETS, input.sets))])


rule latent_contexts:
    input:
        unpack(contexts_inputs),
    output:
        contexts=f"{R}/latents/contexts.parquet",
        unembed=f"{R}/latents/unembed.parquet",
    params:
        settings=_json.dumps(contexts_settings(config), sort_keys=True),
        flags=contexts_flags,
    log:
        f"{R}/logs/latent_contexts.log",
    benchmark:
        f"{R}/benchmarks/latent_contexts.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        mem_mb=grow(4000, real=48000),
        runtime=grow(30, real=240),
        **gpus(),
    shell:
        "python -m blockem latent-contexts --settings {params.settings:q} --threads {threads}"
        " --base {input.base:q} --sae {input.sae:q} --corpus {input.corpus:q}"
        " --prompts {input.prompts:q} {params.flags} --out {output.contexts:q}"
        " --unembed {output.unembed:q} > {log:q} 2>&1"


rule latent_cards:
    input:
        set=f"{R}/latents/{DKEY}-{{selrule}}.json",
        shift=rules.shift.output.shift,
        screens=screen_shards,
        calibration=rules.calibrate.output,
        contexts=rules.latent_contexts.output.contexts,
        unembed=rules.latent_contexts.output.unembed,
        sae=rules.sae.output,
    output:
        html=report(f"{CARDS}.html", caption="../report/latent_cards.rst",
                    category="Latent cards"),
        json=f"{CARDS}.cards.json",
    log:
        f"{R}/logs/latent_cards/{DKEY}-{{selrule}}.log",
    benchmark:
        f"{R}/benchmarks/latent_cards/{DKEY}-{{selrule}}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=grow(2000),
        runtime=grow(10),
    shell:
        "python -m blockem latent-cards --set {input.set:q} --key {wildcards.domain}-s{wildcards.seed}"
        " --shift {input.shift:q} --screens {input.screens:q} --calibration {input.calibration:q}"
        " --contexts {input.contexts:q} --unembed {input.unembed:q} --sae {input.sae:q}"
        " --html {output.html:q} --json {output.json:q} > {log:q} 2>&1"
