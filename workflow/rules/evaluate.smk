# One evaluation pattern for every cell: generate -> judge -> cell metrics -> summary table.


rule generate:
    input:
        unpack(generate_inputs),
        prompts=PROMPTS,
    output:
        f"{R}/generations/{{cell}}.parquet",
    params:
        settings=settings("generate"),
        steer=steer_flags,
        model=model_path,
    log:
        f"{R}/logs/generate/{{cell}}.log",
    benchmark:
        f"{R}/benchmarks/generate/{{cell}}.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        mem_mb=grow(4000, real=32000),
        runtime=grow(30, real=240),
        **gpus(),
    shell:
        "python -m blockem generate --settings {params.settings:q} --threads {threads}"
        " --model {params.model} --prompts {input.prompts} --cell {wildcards.cell}"
        " {params.steer} --out {output} > {log} 2>&1"


rule judge:
    input:
        rules.generate.output,
    output:
        f"{R}/judgements/{{cell}}.parquet",
    params:
        settings=settings("judge"),
        judge_cache=JUDGE_CACHE,
    log:
        f"{R}/logs/judge/{{cell}}.log",
    benchmark:
        f"{R}/benchmarks/judge/{{cell}}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=grow(1000, real=4000),
        runtime=grow(10, real=240),
    shell:
        "python -m blockem judge --settings {params.settings:q} --generations {input}"
        " --out {output} --judge-cache {params.judge_cache} > {log} 2>&1"


rule cell_metrics:
    input:
        rules.judge.output,
    output:
        f"{R}/metrics/cells/{{cell}}.parquet",
    params:
        cell=cell_json,
    log:
        f"{R}/logs/metrics/{{cell}}.log",
    benchmark:
        f"{R}/benchmarks/metrics/{{cell}}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=grow(1000),
        runtime=grow(10),
    shell:
        "python -m blockem cell-metrics --cell {params.cell:q} --judgements {input}"
        " --out {output} > {log} 2>&1"


rule summary:
    input:
        expand(f"{R}/metrics/cells/{{cell}}.parquet", cell=CELLS),
    output:
        parquet=f"{R}/metrics/summary.parquet",
        markdown=f"{R}/metrics/summary.md",
    log:
        f"{R}/logs/summary.log",
    benchmark:
        f"{R}/benchmarks/summary.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=grow(1000),
        runtime=grow(10),
    shell:
        "python -m blockem summary --out {output.parquet} --markdown {output.markdown}"
        " {input} > {log} 2>&1"
