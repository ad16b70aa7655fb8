"""semibench: a reproducible benchmark for semi-supervised nuclei segmentation."""

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Maps ``semibench.methods``/``semibench.datasets`` to a checkout's top-level folders.

    pyproject's ``package-dir`` puts them under ``semibench`` only in an installed package. When
    ``semibench`` itself is imported from a checkout (Snakemake puts the workflow directory, the
    checkout's root, first on ``sys.path``), this folder shadows the installed package and has no
    such subfolders; without this finder a normal (non-editable) install fails inside the workflow.
    """

    def __init__(self, mapping: dict[str, Path]):
        self.mapping = mapping

    def find_spec(self, fullname, path=None, target=None):
        where = self.mapping.get(fullname)
        if where is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, where / "__init__.py", submodule_search_locations=[str(where)])


def _map_source_tree() -> None:
    here = Path(__file__).resolve().parent
    root = here.parent
    if (here / "methods").is_dir() or not (root / "pyproject.toml").is_file():
        return  # an installed package: setuptools laid the subpackages out already
    mapping = {f"semibench.{name}": root / name for name in ("methods", "datasets")
               if (root / name / "__init__.py").is_file()}
    if mapping and not any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceTreeFinder(mapping))  # before an editable install's finder


_map_source_tree()


# Import paths that docs before the stage folders showed plugin authors (a dataset recipe's base
# class and writer); they stay valid as aliases of the moved modules, the same module objects.
PLUGIN_ALIASES = {
    "semibench.obtain": "semibench.data.obtain",
    "semibench.prepared": "semibench.data.prepared",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self.own_spec  # import set it to the alias's; the module ran already


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in PLUGIN_ALIASES:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(PLUGIN_ALIASES[fullname]))


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.append(_AliasFinder())
