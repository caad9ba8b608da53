# The paper's figures: one rule per figure, from summary.parquet and train_logs.parquet only.
# Only figures the configured grid can draw are requested (blockem.figures.NEEDS); each lands in
# `snakemake --report` with the caption in workflow/report/<figure>.rst.

from blockem.figures import available

FIGURES = available(grid.grid_methods(config)) if RUNS else []


def figure_outputs():
    return expand(f"{R}/figures/{{name}}.{{ext}}", name=FIGURES, ext=("png", "pdf"))


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
