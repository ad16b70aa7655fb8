# The report: statistics, tables and figures as separate rules (a failing figure never blocks a
# table), every HTML/PNG output marked for `snakemake --report report.html`.
from semibench.report.build import STATS_FILES, TABLE_FILES
from semibench.report.figures import FIGURES

REPORT_OPTIONS = config.get("report") or {}
STATS = [f"results/stats/{name}" for name in STATS_FILES]
TABLES = [f"results/tables/{name}" for name in TABLE_FILES]
FIGURE_FILES = [f"results/figures/{n}.{s}" for n in FIGURES for s in ("png", "pdf")]
FEATURE_MAPS = ["results/figures/feature_maps.png", "results/figures/feature_maps.pdf"]
REPORT_TARGETS = TABLES + STATS + FIGURE_FILES + (
    FEATURE_MAPS if REPORT_OPTIONS.get("feature_maps") else []
)


localrules:
    stats,
    tables,
    figures,


rule stats:
    input:
        metrics=all_metrics(),
        per_image=all_per_image(),
    output:
        report("results/stats/comparisons.html", caption="../report/stats.rst",
               category="Significance tests", labels={"file": "pairwise comparisons"}),
        [f for f in STATS if not f.endswith(".html")],
    params:
        cfg=report_config_json(),
    log:
        "logs/report/stats.log",
    conda:
        "../envs/semibench.yaml"
    shell:
        "semibench report --metrics {input.metrics:q} --config-json {params.cfg:q} --out results"
        " --step stats --strict > {log:q} 2>&1"


rule tables:
    input:
        metrics=all_metrics(),
        comparisons="results/stats/comparisons.csv",
    output:
        report("results/tables/table1.html", caption="../report/table1.rst", category="Table 1",
               labels={"table": "Table 1"}),
        report("results/tables/table2.html", caption="../report/table2.rst", category="Table 2",
               labels={"table": "Table 2"}),
        report("results/tables/paper_delta.html", caption="../report/paper_delta.rst",
               category="Paper comparison", labels={"table": "ours - paper"}),
        [f for f in TABLES if f.rsplit("/", 1)[1] not in
         ("table1.html", "table2.html", "paper_delta.html")],
    params:
        cfg=report_config_json(),
    log:
        "logs/report/tables.log",
    conda:
        "../envs/semibench.yaml"
    shell:
        "semibench report --metrics {input.metrics:q} --config-json {params.cfg:q} --out results"
        " --step tables > {log:q} 2>&1"


rule figures:
    input:
        metrics=all_metrics(),
        per_image=all_per_image(),
        stats=STATS,
        data=grid_manifests(),
    output:
        [report(f"results/figures/{n}.png", caption=f"../report/fig_{n}.rst", category="Figures",
                labels={"figure": n.replace("_", " ")}) for n in FIGURES],
        [f"results/figures/{n}.pdf" for n in FIGURES],
    params:
        cfg=report_config_json(),
    log:
        "logs/report/figures.log",
    conda:
        "../envs/semibench.yaml"
    shell:
        "MPLBACKEND=Agg semibench report --metrics {input.metrics:q} --config-json {params.cfg:q}"
        " --out results --step figures > {log:q} 2>&1"


rule feature_maps:
    # Figure 4: needs model inference (four checkpoints, one image), so it is its own optional
    # rule: `report: {feature_maps: true}` adds it to `all`, or ask for its file by name.
    input:
        metrics=all_metrics(),
        data=grid_manifests(),
    output:
        report("results/figures/feature_maps.png", caption="../report/fig_feature_maps.rst",
               category="Figures", labels={"figure": "feature maps"}),
        "results/figures/feature_maps.pdf",
    params:
        cfg=report_config_json(),
    log:
        "logs/report/feature_maps.log",
    threads: 1
    conda:
        "../envs/semibench.yaml"
    shell:
        "MPLBACKEND=Agg semibench report --metrics {input.metrics:q} --config-json {params.cfg:q}"
        " --out results --step features --threads {threads} > {log:q} 2>&1"
