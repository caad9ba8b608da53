# One evaluation pattern for every cell: generate -> judge and/or MC scores (eval.mc) -> cell
# metrics -> summary table.


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
        " --model {params.model:q} --prompts {input.prompts:q} --cell {wildcards.cell}"
        " {params.steer} --out {output:q} > {log:q} 2>&1"


rule judge:
    input:
        rules.generate.output,
    output:
        f"{R}/judgements/{{cell}}.parquet",
    params:
        settings=settings("judge"),
        judge_cache=f"{JUDGE_CACHE}/judge/{{cell}}.sqlite",
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
        "python -m blockem judge --settings {params.settings:q} --generations {input:q}"
        " --out {output:q} --judge-cache {params.judge_cache:q} > {log:q} 2>&1"


rule mc_items:
    input:
        mc_items=(MC or {}).get("items", []),
        mc_neutral=(MC or {}).get("neutral", []),
    output:
        mc_items=MC_ITEMS,
        mc_neutral=MC_NEUTRAL,
    params:
        settings=settings("mc_items"),
        out=f"{R}/mc_items",
    log:
        f"{R}/logs/mc_items.log",
    benchmark:
        f"{R}/benchmarks/mc_items.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=grow(1000),
        runtime=grow(10),
    shell:
        "python -m blockem mc-items --settings {params.settings:q} --items {input.mc_items:q}"
        " --neutral {input.mc_neutral:q} --out {params.out:q} > {log:q} 2>&1"


rule mc_eval:
    input:
        unpack(generate_inputs),
        mc_items=MC_ITEMS,
        mc_neutral=MC_NEUTRAL,
    output:
        f"{R}/mc/{{cell}}.parquet",
    params:
        settings=settings("mc_eval"),
        steer=steer_flags,
        model=model_path,
    log:
        f"{R}/logs/mc/{{cell}}.log",
    benchmark:
        f"{R}/benchmarks/mc/{{cell}}.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        mem_mb=grow(4000, real=32000),
        runtime=grow(30, real=120),
        **gpus(),
    shell:
        "python -m blockem mc-eval --settings {params.settings:q} --threads {threads}"
        " --model {params.model:q} --items {input.mc_items:q} --neutral {input.mc_neutral:q}"
        " --cell {wildcards.cell} {params.steer} --out {output:q} > {log:q} 2>&1"


rule cell_metrics:
    input:
        unpack(metrics_inputs),
    output:
        f"{R}/metrics/cells/{{cell}}.parquet",
    params:
        cell=cell_json,
        inputs=metrics_flags,
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
        "python -m blockem cell-metrics --cell {params.cell:q} {params.inputs}"
        " --out {output:q} > {log:q} 2>&1"


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
        "python -m blockem summary --out {output.parquet:q} --markdown {output.markdown:q}"
        " {input:q} > {log:q} 2>&1"


rule mc_report:
    # judge-free organisms: emergence (sft vs base and control) and blocking, paired by item
    input:
        expand(f"{R}/mc/{{cell}}.parquet", cell=CELLS),
    output:
        md=f"{R}/metrics/mc_report.md",
        json=f"{R}/metrics/mc_report.json",
    params:
        cells=lambda w: json.dumps({c: {k: v for k, v in d.items() if k in
                                        ("method", "domain", "lam", "seed")}
                                    for c, d in CELLS.items()}, sort_keys=True),
        mc_dir=f"{R}/mc",
    log:
        f"{R}/logs/mc_report.log",
    benchmark:
        f"{R}/benchmarks/mc_report.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=grow(1000),
        runtime=grow(10),
    shell:
        "python -m blockem mc-report --cells {params.cells:q} --mc-dir {params.mc_dir:q}"
        " --out-md {output.md:q} --out-json {output.json:q} > {log:q} 2>&1"
