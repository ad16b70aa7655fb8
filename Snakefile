# semibench: the CDCL paper's benchmark as a workflow.
#   snakemake --cores all --resources gpu=4              # full grid (config/config.yaml)
#   snakemake --cores 2 --configfile config/quick.yaml   # a few minutes on a CPU
#   snakemake --report report.html [--configfile ...]    # afterwards: one self-contained HTML report
#   snakemake runs ...                                   # train and evaluate only, no report
# Rules are thin: paths, resources and one `semibench <verb>` call each.

configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/report.smk"


rule all:
    input:
        REPORT_TARGETS,  # tables, stats and figures (rules/report.smk); feature maps if configured
    default_target: True


# `snakemake runs`: train and evaluate every run of the grid, no report (a study of a few
# methods that lacks the report's reference or baseline, or a cluster stage before the report).
rule runs:
    input:
        all_metrics(),
