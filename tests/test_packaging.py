"""Imports from a checkout without the editable install's finder (a normal install).

Snakemake puts the workflow directory (the checkout's root) first on sys.path, so the checkout's
``semibench/`` shadows an installed package; ``semibench.methods`` and ``semibench.datasets`` must
then still resolve to the checkout's top-level ``methods/`` and ``datasets/``.
"""
import json
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_without_site(code: str) -> str:
    # -S: no site processing, so no .pth file installs the editable finder; site-packages are
    # added as plain path entries (torch etc. import, the editable mapping does not exist)
    prelude = (f"import sys; sys.path[:0] = [{str(ROOT)!r}]; "
               f"sys.path += {site.getsitepackages()!r}; ")
    out = subprocess.run([sys.executable, "-S", "-c", prelude + code], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_subpackages_resolve_to_the_checkout_folders():
    out = run_without_site(
        "import json, semibench.methods as m, semibench.datasets as d; "
        "print(json.dumps([m.__file__, d.__file__]))")
    methods_init, datasets_init = json.loads(out)
    assert Path(methods_init) == ROOT / "methods" / "__init__.py"
    assert Path(datasets_init) == ROOT / "datasets" / "__init__.py"


def test_registries_discover_every_file_from_a_checkout():
    out = run_without_site(
        "import json; from semibench.registry import METHODS, DATASETS; "
        "print(json.dumps([METHODS.names(), DATASETS.names()]))")
    methods, datasets = json.loads(out)
    files = sorted(p.stem for p in (ROOT / "methods").glob("*.py") if not p.stem.startswith("_"))
    assert set(files) <= set(methods)
    assert {"dsb2018", "monuseg", "synthetic"} <= set(datasets)
