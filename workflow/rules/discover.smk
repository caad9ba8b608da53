# Latent discovery: SAE -> stage 1 shift -> stage 2 screen (one job per shard) -> stage 3
# calibration -> selection rules -> joint repair strength. One set of files per misaligned model
# `<domain>-s<seed>` listed in discovery.domains.

DKEY = "{domain}-s{seed}"
SELF_CHATS = f"{R}/sae/self_chats.parquet"
SAE_CORPUS = [SELF_CHATS, CORPUS] if self_chats_prompts(config) else [CORPUS]


rule self_chats:
    input:
        base=BASE,
        prompts=self_chats_prompts(config) or [],
    output:
        SELF_CHATS,
    params:
        settings=settings("self_chats") if self_chats_prompts(config) else "",
    log:
        f"{R}/logs/self_chats.log",
    benchmark:
        f"{R}/benchmarks/self_chats.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        mem_mb=grow(4000, real=32000),
        runtime=grow(30, real=120),
        **gpus(),
    shell:
        "python -m blockem self-chats --settings {params.settings:q} --threads {threads}"
        " --base {input.base:q} --prompts {input.prompts:q} --out {output:q} > {log:q} 2>&1"


rule sae:
    input:
        base=BASE,
        corpus=SAE_CORPUS,
    output:
        directory(f"{R}/sae/model"),
    params:
        settings=settings("sae"),
    log:
        f"{R}/logs/sae.log",
    benchmark:
        f"{R}/benchmarks/sae.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        mem_mb=grow(4000, real=32000),
        runtime=grow(60, real=240),
        **gpus(),
    shell:
        "python -m blockem sae --settings {params.settings:q} --threads {threads}"
        " --base {input.base:q} --corpus {input.corpus:q} --out {output:q} > {log:q} 2>&1"


rule sae_sanity:
    input:
        sae=rules.sae.output,
        corpus=CORPUS,
        base=BASE,
        mis=expand(f"{R}/models/sft/{{key}}", key=discovery_keys()),
    output:
        f"{R}/sae/sanity.parquet",
    params:
        settings=settings("sanity"),
        models=lambda w, input: " ".join(q(m) for m in [f"base={input.base}"] + [
            f"sft-{k}={m}" for k, m in zip(discovery_keys(), input.mis)]),
    log:
        f"{R}/logs/sae_sanity.log",
    benchmark:
        f"{R}/benchmarks/sae_sanity.tsv"
    conda:
        CONDA_ENV
    threads: 1  # off the critical path: runs beside other single-thread jobs
    resources:
        mem_mb=grow(4000, real=32000),
        runtime=grow(30, real=120),
        **gpus(),
    shell:
        "python -m blockem sae-sanity --settings {params.settings:q} --threads {threads}"
        " --sae {input.sae:q} --corpus {input.corpus:q} --model {params.models} --out {output:q}"
        " > {log:q} 2>&1"


rule shift:
    input:
        base=BASE,
        mis=mis_model,
        sae=rules.sae.output,
        prompts=PROMPTS,
    output:
        shift=f"{R}/discovery/{DKEY}/shift.parquet",
        direction=f"{R}/latents/{DKEY}-direction.safetensors",
    params:
        mis=mis_path,
        settings=lambda w: settings("shift", w.domain),
    log:
        f"{R}/logs/discovery/{DKEY}/shift.log",
    benchmark:
        f"{R}/benchmarks/discovery/{DKEY}/shift.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        mem_mb=grow(4000, real=48000),
        runtime=grow(30, real=120),
        **gpus(),
    shell:
        "python -m blockem shift --settings {params.settings:q} --threads {threads}"
        " --domain {wildcards.domain} --base {input.base:q} --mis {params.mis:q} --sae {input.sae:q}"
        " --prompts {input.prompts:q} --out {output.shift:q} --direction {output.direction:q}"
        " > {log:q} 2>&1"


rule screen:
    input:
        unpack(mc_inputs),
        shift=rules.shift.output.shift,
        base=BASE,
        mis=mis_model,
        sae=rules.sae.output,
        prompts=PROMPTS,
    output:
        f"{R}/discovery/{DKEY}/screen/{{shard}}.parquet",
    params:
        mc=mc_flags,
        mis=mis_path,
        settings=lambda w: settings("screen", w.domain),
        judge_cache=f"{JUDGE_CACHE}/screen/{{domain}}-s{{seed}}-{{shard}}.sqlite",
    log:
        f"{R}/logs/discovery/{DKEY}/screen-{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/discovery/{DKEY}/screen-{{shard}}.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        mem_mb=grow(4000, real=48000),
        runtime=grow(60, real=480),
        **gpus(),
    shell:
        "python -m blockem screen --settings {params.settings:q} --threads {threads}"
        " --domain {wildcards.domain} --shard {wildcards.shard} --shift {input.shift:q}"
        " --base {input.base:q} --mis {params.mis:q} --sae {input.sae:q} --prompts {input.prompts:q}"
        " --out {output:q} --judge-cache {params.judge_cache:q} {params.mc} > {log:q} 2>&1"


rule calibrate:
    input:
        unpack(mc_inputs),
        shift=rules.shift.output.shift,
        screens=screen_shards,
        base=BASE,
        mis=mis_model,
        sae=rules.sae.output,
        prompts=PROMPTS,
    output:
        f"{R}/discovery/{DKEY}/calibration.parquet",
    params:
        mc=mc_flags,
        mis=mis_path,
        settings=lambda w: settings("calibrate", w.domain),
        judge_cache=f"{JUDGE_CACHE}/calibrate/{{domain}}-s{{seed}}.sqlite",
    log:
        f"{R}/logs/discovery/{DKEY}/calibrate.log",
    benchmark:
        f"{R}/benchmarks/discovery/{DKEY}/calibrate.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        mem_mb=grow(4000, real=48000),
        runtime=grow(120, real=720),
        **gpus(),
    shell:
        "python -m blockem calibrate --settings {params.settings:q} --threads {threads}"
        " --domain {wildcards.domain} --shift {input.shift:q} --screens {input.screens:q}"
        " --base {input.base:q} --mis {params.mis:q} --sae {input.sae:q} --prompts {input.prompts:q}"
        " --out {output:q} --judge-cache {params.judge_cache:q} {params.mc} > {log:q} 2>&1"


rule select:
    input:
        shift=rules.shift.output.shift,
        screens=screen_shards,
        calibration=rules.calibrate.output,
        sae=rules.sae.output,
    output:
        expand(R + "/latents/{{domain}}-s{{seed}}-{rule}.json", rule=SELECT_RULES),
    params:
        settings=lambda w: settings("select", w.domain),
        out_dir=f"{R}/latents",
    log:
        f"{R}/logs/discovery/{DKEY}/select.log",
    benchmark:
        f"{R}/benchmarks/discovery/{DKEY}/select.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=grow(2000),
        runtime=grow(10),
    shell:
        "python -m blockem select --settings {params.settings:q} --domain {wildcards.domain}"
        " --name {wildcards.domain}-s{wildcards.seed} --shift {input.shift:q}"
        " --screens {input.screens:q} --calibration {input.calibration:q} --sae {input.sae:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule joint_strength:
    input:
        unpack(mc_inputs),
        set=R + "/latents/{domain}-s{seed}-" + DISC["select"]["rule"] + ".json",
        base=BASE,
        mis=mis_model,
        sae=rules.sae.output,
        prompts=PROMPTS,
    output:
        f"{R}/discovery/{DKEY}/joint.json",
    params:
        mc=mc_flags,
        mis=mis_path,
        settings=lambda w: settings("joint", w.domain),
        judge_cache=f"{JUDGE_CACHE}/joint_strength/{{domain}}-s{{seed}}.sqlite",
    log:
        f"{R}/logs/discovery/{DKEY}/joint.log",
    benchmark:
        f"{R}/benchmarks/discovery/{DKEY}/joint.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        mem_mb=grow(4000, real=48000),
        runtime=grow(30, real=240),
        **gpus(),
    shell:
        "python -m blockem joint-strength --settings {params.settings:q} --threads {threads}"
        " --domain {wildcards.domain} --set {input.set:q} --base {input.base:q} --mis {params.mis:q}"
        " --sae {input.sae:q} --prompts {input.prompts:q} --out {output:q}"
        " --judge-cache {params.judge_cache:q} {params.mc} > {log:q} 2>&1"
