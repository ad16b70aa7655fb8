# Data: obtain -> verify -> prepare -> split (see docs/design.md for the paths).


# obtain may download: keep it on the submitting host (compute nodes are often offline)
localrules:
    obtain,


rule obtain:
    output:
        f"{DATA_DIR}/raw/{{dataset}}/archives.json",
    params:
        cfg=dataset_config_json,
    log:
        "logs/obtain/{dataset}.log",
    threads: 1
    conda:
        "../envs/semibench.yaml"
    shell:
        "semibench obtain --dataset {wildcards.dataset} --config-json {params.cfg:q} > {log:q} 2>&1"


rule verify:
    input:
        f"{DATA_DIR}/raw/{{dataset}}/archives.json",
    output:
        f"{DATA_DIR}/raw/{{dataset}}/verified.json",
    params:
        cfg=dataset_config_json,
    log:
        "logs/verify/{dataset}.log",
    threads: 1
    conda:
        "../envs/semibench.yaml"
    shell:
        "semibench verify --dataset {wildcards.dataset} --config-json {params.cfg:q} > {log:q} 2>&1"


rule prepare:
    input:
        f"{DATA_DIR}/raw/{{dataset}}/verified.json",
    output:
        f"{DATA_DIR}/prepared/{{dataset}}/manifest.json",
    params:
        cfg=dataset_config_json,
    log:
        "logs/prepare/{dataset}.log",
    threads: threads_for("prepare", 2)
    conda:
        "../envs/semibench.yaml"
    shell:
        "semibench prepare --dataset {wildcards.dataset} --config-json {params.cfg:q}"
        " --workers {threads} > {log:q} 2>&1"


# The shipped split files (results/splits/, seeds 0-2) are authoritative: ancient() keeps a newer
# prepared manifest from re-running (and, on failure, deleting) them; a missing file is rebuilt,
# byte-identical (tests/test_realdata.py).
rule split:
    input:
        ancient(f"{DATA_DIR}/prepared/{{dataset}}/manifest.json"),
    output:
        f"{SPLITS_DIR}/{SPLIT_FILE}",
    params:
        cfg=dataset_config_json,
    log:
        f"{LOGS_DIR}/split/{SPLIT_KEY}.log",
    threads: 1
    conda:
        "../envs/semibench.yaml"
    shell:
        "semibench split --dataset {wildcards.dataset} --seed {wildcards.seed}"
        " --config-json {params.cfg:q} --out {output:q} > {log:q} 2>&1"
