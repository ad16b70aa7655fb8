"""The registries list names from the modules' source without importing them; what they read
must be what the modules register when imported."""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest

from semibench.errors import ConfigError
from semibench.registry import DATASETS, METHODS, Registry, scan_source


@pytest.mark.parametrize("registry", [METHODS, DATASETS], ids=["methods", "datasets"])
def test_names_read_from_source_are_the_registered_ones(registry):
    fresh = Registry(registry.kind, registry.package, registry.group, registry.static_attrs)
    catalog = fresh.catalog()  # the source alone
    for module in sorted(set(catalog.values())):
        importlib.import_module(module)
    registered = {n: obj.__module__ for n, obj in registry._items.items()
                  if obj.__module__.startswith(registry.package + ".")}
    assert registered == catalog
    assert registry.names() == sorted(catalog)


def test_static_fixed_ratio_matches_the_classes():
    fresh = Registry("method", "semibench.methods", "semibench.methods", ("fixed_ratio",))
    assert fresh.static("fullsup", "fixed_ratio") == 1
    assert fresh.static("suponly", "fixed_ratio") is None
    assert fresh.static("cdcl-scheme4", "fixed_ratio") is None  # registered in a loop
    for name in fresh.names():
        assert fresh.static(name, "fixed_ratio") == getattr(METHODS.get(name), "fixed_ratio", None)


def test_listing_imports_no_model_library():
    code = ("import sys\nfrom semibench import cli\ncli.main(['methods'])\ncli.main(['datasets'])\n"
            "cli.main(['status', '--config', 'config/quick.yaml', '--runs-dir', 'no/such/dir'])\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'pandas', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=__import__("pathlib").Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "cdcl-scheme6" in out.stdout and "synthetic" in out.stdout


def test_scan_source_forms():
    src = textwrap.dedent('''
        from semibench.registry import register_method

        @register_method("a")
        class A:
            fixed_ratio: int = 1
            other = 3

        class B(A):
            pass

        register_method("b")(B)

        def _make(name):
            return register_method(name)(type(name, (A,), {}))
    ''')
    found, dynamic = scan_source(src, "register_method", ("fixed_ratio",))
    assert found == {"a": {"fixed_ratio": 1}, "b": {}} and dynamic
    declared = src + '\nREGISTERED_NAMES = ("c", "d")\n'
    found, dynamic = scan_source(declared, "register_method", ("fixed_ratio",))
    assert set(found) == {"a", "b", "c", "d"} and not dynamic
    # computed classes may state their static attributes beside their names (methods/cdcl.py)
    declared = src + '\nREGISTERED_NAMES = {"c": {"fixed_ratio": 4, "other": 1}, "d": {}}\n'
    found, dynamic = scan_source(declared, "register_method", ("fixed_ratio",))
    assert found == {"a": {"fixed_ratio": 1}, "b": {}, "c": {"fixed_ratio": 4}, "d": {}} and not dynamic


FAKE = Registry("fake", "fakepkg_registry", "semibench.none", ("fixed_ratio",))


def test_inherited_static_attribute_is_refused(tmp_path, monkeypatch):
    """B inherits fixed_ratio = 1, which the source reader cannot see: using B says how to fix it."""
    pkg = tmp_path / "fakepkg_registry"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mods.py").write_text(textwrap.dedent('''
        from tests.test_registry import FAKE
        register_fake = FAKE.register

        @register_fake("a")
        class A:
            fixed_ratio = 1

        @register_fake("b")
        class B(A):
            pass
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert FAKE.names() == ["a", "b"]
    assert FAKE.static("b", "fixed_ratio") is None  # what the source shows
    assert FAKE.get("a").fixed_ratio == 1
    with pytest.raises(ConfigError, match=r"fake 'b' .* has fixed_ratio = 1 but its class body "
                                          r"does not state it \(default None\): state fixed_ratio"):
        FAKE.get("b")


def test_temporarily_registers_inside_the_block_only():
    class Extra:
        name = "_test_extra"
    before = METHODS.names()
    with METHODS.temporarily({"_test_extra": Extra}):
        assert METHODS.get("_test_extra") is Extra and "_test_extra" in METHODS.names()
    assert METHODS.names() == before
    with pytest.raises(ConfigError, match="unknown method '_test_extra'"):
        METHODS.get("_test_extra")
    with pytest.raises(ConfigError, match="method suponly already registered"):
        with METHODS.temporarily({"suponly": Extra}):
            pass
    assert METHODS.get("suponly") is not Extra


def test_method_metadata_defaults_are_the_base_class_s_and_every_method_states_its_own():
    from semibench.method import Method
    from semibench.registry import METHOD_STATIC_ATTRS
    assert {a: getattr(Method, a) for a in METHOD_STATIC_ATTRS} == METHOD_STATIC_ATTRS
    fresh = Registry(METHODS.kind, METHODS.package, METHODS.group, METHODS.static_attrs)
    for name in fresh.names():  # read from source, then checked against the imported class
        stated = {a: fresh.static(name, a) for a in METHOD_STATIC_ATTRS}
        assert {a: getattr(METHODS.get(name), a) for a in METHOD_STATIC_ATTRS} == stated
    assert fresh.static("cdcl-scheme3", "display_name") == "Scheme.3"
    assert fresh.static("fixmatch", "in_paper") is False and fresh.static("cdcl", "in_paper") is True
