# Tables from the metrics of every run in the grid.


localrules:
    report,


rule report:
    input:
        all_metrics(),
    output:
        TABLES,
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
        convention=(config.get("report") or {}).get("convention", "per_image_mean"),
    log:
        "logs/report/table1.log",
    threads: 1
    conda:
        "../envs/semibench.yaml"
    shell:
        "semibench report --metrics {input:q} --out {params.out_dir:q}"
        " --convention {params.convention} > {log:q} 2>&1"
