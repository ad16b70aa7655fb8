# Training and evaluation: one GPU each (the job takes a free GPU id itself, semibench/workflow/gpu.py).


rule train:
    input:
        split=f"{SPLITS_DIR}/{SPLIT_FILE}",
        data=f"{DATA_DIR}/prepared/{{dataset}}/manifest.json",
    output:
        best=f"{RUN_DIR}/best.pt",
        done=f"{RUN_DIR}/train_done.json",
    params:
        cfg=run_config_json,
        run_dir=run_dir,
    log:
        f"{LOGS_DIR}/train/{RUN_KEY}.log",
    threads: threads_for("train", 4)
    resources:
        gpu=1,
    conda:
        "../envs/semibench.yaml"
    shell:
        "semibench train --config-json {params.cfg:q} --dataset {wildcards.dataset}"
        " --method {wildcards.method} --ratio {wildcards.ratio} --seed {wildcards.seed}"
        " --out {params.run_dir:q} --threads {threads} > {log:q} 2>&1"


rule evaluate:
    input:
        best=f"{RUN_DIR}/best.pt",
        done=f"{RUN_DIR}/train_done.json",
    output:
        metrics=f"{RUN_DIR}/metrics.json",
        per_image=f"{RUN_DIR}/per_image.csv",
    params:
        run_dir=run_dir,
        instances=config.get("evaluate", {}).get("instances", "components"),
        min_object_size=config.get("evaluate", {}).get("min_object_size", 0),
    log:
        f"{LOGS_DIR}/evaluate/{RUN_KEY}.log",
    threads: threads_for("evaluate", 2)
    resources:
        gpu=1,
    conda:
        "../envs/semibench.yaml"
    shell:
        "semibench evaluate --run {params.run_dir:q} --threads {threads}"
        " --instances {params.instances:q} --min-object-size {params.min_object_size}"
        " > {log:q} 2>&1"
