# semibench: the CDCL paper's benchmark as a workflow.
#   snakemake --cores all --resources gpu=4              # full grid (config/config.yaml)
#   snakemake --cores 2 --configfile config/quick.yaml   # a few minutes on a CPU
#   snakemake --report report.html [--configfile ...]    # afterwards: one self-contained HTML report
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
