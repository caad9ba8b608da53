# A real model (model.source: hub | gguf): the user's data files -> world/ tables, and the base.


def aligned_files():
    """The local files of data.aligned (one source, or a list of them), if configured."""
    src = data_settings(config).get("aligned") or []
    return sorted({s["path"] for s in (src if isinstance(src, list) else [src]) if "path" in s})


rule prepare_data:
    input:
        data_files(),
    output:
        corpus=CORPUS,
        prompts=PROMPTS,
        finetune=expand(f"{R}/world/finetune/{{d}}.parquet", d=sorted(config["data"]["finetune"])),
        control=expand(f"{R}/world/control/{{d}}.parquet", d=CONTROLS),
    params:
        settings=settings("prepare_data"),
        out=f"{R}/world",
    log:
        f"{R}/logs/prepare_data.log",
    benchmark:
        f"{R}/benchmarks/prepare_data.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=grow(4000),
        runtime=grow(30),
    shell:
        "python -m blockem prepare-data --settings {params.settings:q} --out {params.out:q}"
        " > {log:q} 2>&1"


if ALIGNED_CHATS:

    # the aligned chats of `mix` (data.aligned): the same stage with data.aligned, into aligned/
    # (whose aligned.parquet alone is read), so that configuring the defence leaves world/ and
    # every job after it as they were; the chats asking an evaluation question are dropped
    rule prepare_aligned:
        input:
            data_files(),
            aligned_files(),
        output:
            ALIGNED_CHATS,
        params:
            settings=settings("prepare_aligned"),
            out=os.path.dirname(ALIGNED_CHATS),
        log:
            f"{R}/logs/prepare_aligned.log",
        benchmark:
            f"{R}/benchmarks/prepare_aligned.tsv"
        conda:
            CONDA_ENV
        threads: 1
        resources:
            mem_mb=grow(4000),
            runtime=grow(30),
        shell:
            "python -m blockem prepare-data --settings {params.settings:q} --out {params.out:q}"
            " > {log:q} 2>&1"


rule import_base:
    output:
        directory(BASE),
    params:
        settings=settings("import_base"),
    log:
        f"{R}/logs/import_base.log",
    benchmark:
        f"{R}/benchmarks/import_base.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=grow(8000),
        runtime=grow(60),
    shell:
        "python -m blockem import-base --settings {params.settings:q} --out {output:q} > {log:q} 2>&1"
