# BLOCK-EM training grid (stage 4): blocking targets -> cached base latents (reference `cache`) ->
# one training job per grid run (method x domain x lambda x seed) -> the evaluation of
# evaluate.smk, like every other cell. Run ids come from common.smk's RUNS (blockem.grid), their
# settings from blockem.config.block_run_settings; what a method does is blockem/methods/<name>.py.


rule block_target:
    input:
        unpack(target_inputs),
    output:
        f"{R}/block/targets/{{target}}.json",
    params:
        settings=settings("block_target"),
        flags=target_flags,
    log:
        f"{R}/logs/block/target/{{target}}.log",
    benchmark:
        f"{R}/benchmarks/block/target/{{target}}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=grow(1000),
        runtime=grow(10),
    shell:
        "python -m blockem block-target --settings {params.settings:q} --set {input.set:q}"
        " {params.flags} --out {output:q} > {log:q} 2>&1"


rule block_cache:
    input:
        unpack(cache_inputs),
    output:
        f"{R}/block/cache/{{domain}}/{{target}}.safetensors",
    params:
        settings=settings("block_cache"),
        sae=lambda w, input: f"--sae {q(input.sae)}" if "sae" in input.keys() else "",
    log:
        f"{R}/logs/block/cache/{{domain}}/{{target}}.log",
    benchmark:
        f"{R}/benchmarks/block/cache/{{domain}}/{{target}}.tsv"
    conda:
        CONDA_ENV
    threads: BLOCK["threads"]
    resources:
        mem_mb=grow(4000, real=32000),
        runtime=grow(30, real=120),
        **gpus(),
    shell:
        "python -m blockem block-cache --settings {params.settings:q} --threads {threads}"
        " --data {input.data:q} --base {input.base:q} --target {input.target:q} {params.sae}"
        " --out {output:q} > {log:q} 2>&1"


rule block_train:
    input:
        unpack(block_inputs),
    output:
        directory(f"{R}/models/block/{{run}}"),
    params:
        settings=block_settings,
        flags=block_flags,
        seed=lambda w: RUNS[w.run]["seed"],
    log:
        f"{R}/logs/block/train/{{run}}.log",
    benchmark:
        f"{R}/benchmarks/block/train/{{run}}.tsv"
    conda:
        CONDA_ENV
    threads: BLOCK["threads"]
    resources:
        mem_mb=grow(4000, real=48000),
        runtime=grow(60, real=480),
        **gpus(),
    shell:
        "python -m blockem block --settings {params.settings:q} --threads {threads}"
        " --data {input.data:q} --base {input.base:q} --seed {params.seed:q} {params.flags}"
        " --out {output:q} > {log:q} 2>&1"


rule train_logs:
    input:
        list(trained_cells()),
    output:
        f"{R}/metrics/train_logs.parquet",
    params:
        cells=lambda w, input: json.dumps(dict(zip(input, trained_cells().values()))),
    log:
        f"{R}/logs/train_logs.log",
    benchmark:
        f"{R}/benchmarks/train_logs.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=grow(1000),
        runtime=grow(10),
    shell:
        "python -m blockem train-logs --cells {params.cells:q} --out {output:q} > {log:q} 2>&1"
