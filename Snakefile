# BLOCK-EM workflow. Run the embedded default with `snakemake --cores 2`; see README.md.
# Every rule calls the package through `python -m blockem <stage>`; the config is validated
# against workflow/schemas/config.schema.yaml before any job starts.

import os

configfile: os.path.join(workflow.basedir, "config", "config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/organism.smk"
include: "workflow/rules/discover.smk"
include: "workflow/rules/block.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/cards.smk"


rule all:
    input:
        summary_outputs(),
        card_outputs(),  # cards.smk: the latent cards of every selected set
    default_target: True
