# The model organism. Toy: world -> tokenizer -> pretrain -> instruct base; a real model:
# prepare_data (the user's files) and import_base (Hub id, local dir or GGUF). Then the misaligned
# fine-tunes, the same for both.

# aligned chats the `mix` defence interleaves into fine-tuning batches: the toy's instruct set
# (world/sft.parquet), or prepare_aligned's aligned/aligned.parquet when data.aligned is
# configured (None: a real config without data.aligned has none); blockem.grid.aligned_chats
ALIGNED_CHATS = grid.aligned_chats(config)


if TOY:
    include: "toy.smk"
else:
    include: "real.smk"


rule finetune:
    input:
        data=f"{R}/world/finetune/{{domain}}.parquet",
        base=BASE,
    output:
        directory(f"{R}/models/sft/{{domain}}-s{{seed}}"),
    params:
        settings=lambda w: settings("finetune", w.domain),
    log:
        f"{R}/logs/finetune/{{domain}}-s{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/finetune/{{domain}}-s{{seed}}.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        mem_mb=grow(4000, real=32000),
        runtime=grow(30, real=240),
        **gpus(),
    shell:
        "python -m blockem finetune --settings {params.settings:q} --threads {threads}"
        " --data {input.data:q} --base {input.base:q} --domain {wildcards.domain}"
        " --seed {wildcards.seed} --out {output:q} > {log:q} 2>&1"


rule finetune_control:
    # the matched control of a real organism (data.control: the same questions, safe answers)
    input:
        data=f"{R}/world/control/{{domain}}.parquet",
        base=BASE,
    output:
        directory(f"{R}/models/control/{{domain}}-s{{seed}}"),
    params:
        settings=lambda w: settings("finetune", w.domain),
    log:
        f"{R}/logs/finetune/control-{{domain}}-s{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/finetune/control-{{domain}}-s{{seed}}.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        mem_mb=grow(4000, real=32000),
        runtime=grow(30, real=240),
        **gpus(),
    shell:
        "python -m blockem finetune --settings {params.settings:q} --threads {threads}"
        " --data {input.data:q} --base {input.base:q} --domain {wildcards.domain}"
        " --seed {wildcards.seed} --cell control-{wildcards.domain}-s{wildcards.seed}"
        " --out {output:q} > {log:q} 2>&1"
