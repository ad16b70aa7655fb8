"""The package's rooms: every import path the docs show resolves, the paths plugin authors were
shown before the stage folders still work, and the top level holds only the API and the CLI."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOTTED = re.compile(r"\bsemibench(?:\.[A-Za-z_]\w*)+")
NOT_IMPORTS = {"semibench.status"}  # the status JSON's schema name, `semibench.status/1`


def documented_paths() -> list[str]:
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found = {m.group(0) for p in texts for m in DOTTED.finditer(p.read_text())}
    return sorted(found - NOT_IMPORTS)


def resolve(path: str):
    """Import the longest module prefix of ``path``, then read the rest as attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(path)


def test_the_docs_show_plugin_paths():
    paths = documented_paths()
    for expected in ("semibench.method", "semibench.checkmethod.check_method", "semibench.data.obtain.Recipe",
                     "semibench.data.prepared.PreparedWriter"):
        assert expected in paths


@pytest.mark.parametrize("path", documented_paths())
def test_every_documented_import_path_resolves(path):
    assert resolve(path) is not None


def test_plugin_api_names_import():
    from semibench.checkmethod import check_method  # noqa: F401
    from semibench.losses import softmax_mse  # noqa: F401
    from semibench.method import Batch, Method, MethodContext, StepInfo  # noqa: F401
    from semibench.obtain import ArchiveSpec, Recipe, SampleRef  # noqa: F401
    from semibench.prepared import PreparedDataset, PreparedWriter, Sample  # noqa: F401
    from semibench.registry import DATASETS, METHODS, register_dataset, register_method  # noqa: F401
    from semibench.report.stats import friedman, ranking_stability, run_families  # noqa: F401
    from semibench.testing import FakeContext, toy_config, write_toy_dataset  # noqa: F401


def test_old_dataset_paths_are_the_moved_modules_themselves():
    import semibench.data.obtain
    import semibench.data.prepared
    import semibench.obtain
    import semibench.prepared

    assert semibench.obtain is semibench.data.obtain
    assert semibench.prepared is semibench.data.prepared
    assert semibench.data.obtain.__spec__.name == "semibench.data.obtain"  # the alias did not rename it


def test_internal_modules_moved_without_shims():
    for old in ("semibench.engine", "semibench.evaluate.evaluate", "semibench.splits", "semibench.model"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)


def test_the_top_level_holds_the_api_and_the_command_line_only():
    top = {p.stem for p in (ROOT / "semibench").glob("*.py")}
    assert top == {"__init__", "__main__", "cli", "config", "layout", "atomic", "errors", "method", "registry",
                   "losses", "contract", "checkmethod", "testing"}
    stages = {p.name for p in (ROOT / "semibench").iterdir() if (p / "__init__.py").is_file()}
    assert stages == {"data", "train", "network", "evaluate", "report", "workflow"}
