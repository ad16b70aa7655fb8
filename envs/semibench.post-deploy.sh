#!/usr/bin/env bash
# Snakemake runs this inside the freshly created conda env, from the workflow's working directory
# (the semibench checkout): install that checkout into the env (dependencies come from the yaml).
set -euo pipefail
if ! grep -qs '^name = "semibench"' pyproject.toml; then
    echo "semibench post-deploy: run snakemake from the semibench checkout (no pyproject.toml here)" >&2
    exit 1
fi
python -m pip install --no-deps -e .
