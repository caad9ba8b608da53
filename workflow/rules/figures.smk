# The paper's figures: one rule per figure, from summary.parquet and train_logs.parquet only.
# Only figures the configured grid can draw are requested (blockem.figures.NEEDS); each lands in
# `snakemake --report` with the caption in workflow/report/<figure>.rst. A grid of two or more
# methods also gets the method comparison table (rule compare, blockem/compare.py).

from blockem.compare import requested as comparison_requested
from blockem.figures import available

FIGURES = available(grid.grid_methods(config)) if RUNS else []
COMPARE = bool(RUNS) and comparison_requested(grid.grid_methods(config))


def comparison_outputs():
    """metrics/comparison.parquet and .md when the grid has two or more methods."""
    return [f"{R}/metrics/comparison.parquet", f"{R}/metrics/comparison.md"] if COMPARE else []


def figure_outputs():
    """The figures (and the comparison table) rule all asks for (common.smk's summary_outputs)."""
    figs = expand(f"{R}/figures/{{name}}.{{ext}}", name=FIGURES, ext=("png", "pdf"))
    return figs + comparison_outputs()


for _fig in FIGURES:

    rule:
        name:
            f"figure_{_fig}"
        input:
            summary=rules.summary.output.parquet,
            logs=rules.train_logs.output,
        output:
            png=report(f"{R}/figures/{_fig}.png", caption=f"../report/{_fig}.rst",
                       category="Figures"),
            pdf=f"{R}/figures/{_fig}.pdf",
        params:
            name=_fig,
        log:
            f"{R}/logs/figures/{_fig}.log",
        benchmark:
            f"{R}/benchmarks/figures/{_fig}.tsv"
        conda:
            CONDA_ENV
        threads: 1
        resources:
            mem_mb=grow(1000),
            runtime=grow(10),
        shell:
            "python -m blockem figure {params.name:q} --summary {input.summary:q}"
            " --train-logs {input.logs:q} --png {output.png:q} --pdf {output.pdf:q} > {log:q} 2>&1"


rule compare:
    # every method against sft: normalised EM reduction vs adherence change, each method's best
    # point within the incoherence budget (defaults of blockem/compare.py)
    input:
        summary=rules.summary.output.parquet,
    output:
        parquet=f"{R}/metrics/comparison.parquet",
        markdown=f"{R}/metrics/comparison.md",
    params:
        out=lambda wildcards, output: os.path.dirname(output.parquet),
    log:
        f"{R}/logs/compare.log",
    benchmark:
        f"{R}/benchmarks/compare.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=grow(1000),
        runtime=grow(10),
    shell:
        "python -m blockem compare --summary {input.summary:q} --out {params.out:q} > {log:q} 2>&1"
