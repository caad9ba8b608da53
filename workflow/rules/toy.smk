# The toy organism: world -> tokenizer -> pretrain -> instruct base (model.source: toy).


rule world:
    output:
        corpus=f"{R}/world/corpus.parquet",
        sft=f"{R}/world/sft.parquet",
        prompts=f"{R}/world/prompts.parquet",
        finetune=expand(f"{R}/world/finetune/{{d}}.parquet", d=config["world"]["advice_domains"]),
    params:
        settings=settings("world"),
        out=f"{R}/world",
    log:
        f"{R}/logs/world.log",
    benchmark:
        f"{R}/benchmarks/world.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=grow(2000),
        runtime=grow(10),
    shell:
        "python -m blockem world --settings {params.settings:q} --out {params.out:q} > {log:q} 2>&1"


rule tokenizer:
    output:
        directory(f"{R}/models/tokenizer"),
    params:
        settings=settings("tokenizer"),
    log:
        f"{R}/logs/tokenizer.log",
    benchmark:
        f"{R}/benchmarks/tokenizer.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=grow(2000),
        runtime=grow(10),
    shell:
        "python -m blockem tokenizer --settings {params.settings:q} --out {output:q} > {log:q} 2>&1"


rule pretrain:
    input:
        world=rules.world.output.corpus,
        tokenizer=rules.tokenizer.output,
    output:
        directory(f"{R}/models/pretrained"),
    params:
        settings=settings("pretrain"),
        world=f"{R}/world",
    log:
        f"{R}/logs/pretrain.log",
    benchmark:
        f"{R}/benchmarks/pretrain.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        mem_mb=grow(4000),
        runtime=grow(60),
        **gpus(),
    shell:
        "python -m blockem pretrain --settings {params.settings:q} --threads {threads}"
        " --world {params.world:q} --tokenizer {input.tokenizer:q} --out {output:q} > {log:q} 2>&1"


rule base:
    input:
        sft=rules.world.output.sft,
        pretrained=rules.pretrain.output,
    output:
        directory(f"{R}/models/base"),
    params:
        settings=settings("base"),
        world=f"{R}/world",
    log:
        f"{R}/logs/base.log",
    benchmark:
        f"{R}/benchmarks/base.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        mem_mb=grow(4000),
        runtime=grow(30),
        **gpus(),
    shell:
        "python -m blockem base --settings {params.settings:q} --threads {threads}"
        " --world {params.world:q} --pretrained {input.pretrained:q} --out {output:q} > {log:q} 2>&1"
