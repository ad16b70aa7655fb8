"""Methods and datasets by name: modules in the built-in packages register themselves with a
decorator, third-party packages through entry points (groups ``semibench.methods`` and
``semibench.datasets``). Nothing is listed by hand.

Listing names imports nothing: the built-in modules are read as source (:mod:`ast`) for their
``register_method("name")`` / ``register_dataset("name")`` calls, and entry points are listed by
name. A module is imported only when one of its names is asked for (:meth:`Registry.get`), so
``semibench methods`` and ``semibench status`` never load torch (about 2 s on its own). A module
that registers names computed at import time lists them in a module-level literal
``REGISTERED_NAMES = (...)``; without it the module is imported to learn its names. The class
attributes that ``semibench status`` and the grid need (``fixed_ratio``) are read the same way
from the registered class's body, and checked against the imported class whenever it is used.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from semibench.errors import ConfigError, describe

T = TypeVar("T")
DECLARED = "REGISTERED_NAMES"
_UNKNOWN = object()


def _literal(node):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        return _UNKNOWN


def scan_source(source: str, decorator: str, attrs: tuple[str, ...]) -> tuple[dict, bool]:
    """({name: {attr: literal value}} registered by ``decorator("name")`` in ``source``, and
    whether the module also registers names this cannot read). An attribute missing from the
    registered class's body is left out (the base class's default applies)."""
    tree = ast.parse(source)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    found: dict[str, dict] = {}
    dynamic = False
    declared = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == DECLARED
                                                for t in node.targets):
            declared = _literal(node.value)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == decorator):
            continue
        name = _literal(node.args[0]) if node.args else _UNKNOWN
        if not isinstance(name, str):
            dynamic = True
            continue
        found.setdefault(name, {})
    # which class each literal name registers: a decorator, or register_x("name")(Cls)
    targets: dict[str, str] = {}
    for cls in classes.values():
        for dec in cls.decorator_list:
            if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Name) \
                    and dec.func.id == decorator and dec.args and isinstance(_literal(dec.args[0]), str):
                targets[_literal(dec.args[0])] = cls.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Call) \
                and isinstance(node.func.func, ast.Name) and node.func.func.id == decorator \
                and node.func.args and isinstance(_literal(node.func.args[0]), str) \
                and node.args and isinstance(node.args[0], ast.Name):
            targets[_literal(node.func.args[0])] = node.args[0].id
    for name, cls_name in targets.items():
        for stmt in classes[cls_name].body if cls_name in classes else ():
            target, value = None, None
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                target, value = stmt.targets[0], stmt.value
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                target, value = stmt.target, stmt.value
            if isinstance(target, ast.Name) and target.id in attrs:
                v = _literal(value)
                if v is not _UNKNOWN:
                    found[name][target.id] = v
    if isinstance(declared, dict) and all(isinstance(n, str) and isinstance(f, dict)
                                          for n, f in declared.items()):
        for n, facts in declared.items():  # computed classes: their static attributes stated here
            found.setdefault(n, {}).update({a: v for a, v in facts.items() if a in attrs})
        dynamic = False
    elif dynamic and isinstance(declared, (tuple, list)) and all(isinstance(n, str) for n in declared):
        for n in declared:
            found.setdefault(n, {})
        dynamic = False
    return found, dynamic


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str, group: str,
                 static_attrs: dict | tuple[str, ...] | None = None, name_attr: str | None = None):
        self.kind, self.package, self.group = kind, package, group
        # a class attribute set to the registered name, so a class says its name once
        self.name_attr = name_attr
        # attribute -> the base class's default (a tuple of names: all default None)
        self.static_attrs = dict(static_attrs) if isinstance(static_attrs, dict) else \
            dict.fromkeys(static_attrs or ())
        self._items: dict[str, T] = {}
        self._catalog: dict[str, str] | None = None  # name -> module (or "entry point")
        self._facts: dict[str, dict] = {}  # name -> static class attributes from the source
        self._entry_points: dict = {}
        self._checked: set[str] = set()

    @property
    def decorator(self) -> str:
        return f"register_{self.kind}"

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ConfigError(f"{self.kind} {name!r} is registered twice")
            self._add(name, obj)
            return obj
        return decorator

    def _add(self, name: str, obj: T) -> None:
        if self.name_attr and isinstance(obj, type):
            own = vars(obj).get(self.name_attr)
            if own not in (None, "", name):
                raise ConfigError(f"{self.kind} class {obj.__qualname__} says {self.name_attr} = "
                                  f"{own!r} but is registered as {name!r}; leave {self.name_attr} out "
                                  f"(the registry sets it)")
            setattr(obj, self.name_attr, name)
        self._items[name] = obj

    @contextmanager
    def temporarily(self, items: dict[str, T]) -> Iterator[None]:
        """``{name: object}`` registered inside a with block only (tests, notebooks); afterwards
        the registry is as it was. A name already registered to another object is refused."""
        self.names()  # discover the built-in and entry-point names first
        clash = [n for n, obj in items.items() if n in self.catalog() or
                 (n in self._items and self._items[n] is not obj)]
        if clash:
            raise ConfigError(f"{self.kind} {', '.join(sorted(clash))} already registered")
        added = [n for n in items if n not in self._items]
        for n, obj in items.items():
            self._add(n, obj)
        try:
            yield
        finally:
            for n in added:
                self._items.pop(n, None)
                self._checked.discard(n)

    # -- names without imports --------------------------------------------------------------
    def _modules(self):
        """(module name, source path or None) of every public module of the package."""
        spec = importlib.util.find_spec(self.package)
        for mod in sorted(pkgutil.iter_modules(spec.submodule_search_locations or []),
                          key=lambda m: m.name):
            if mod.name.startswith("_"):
                continue
            path = Path(getattr(mod.module_finder, "path", "")) / f"{mod.name}.py"
            yield f"{self.package}.{mod.name}", path if path.is_file() else None

    def catalog(self) -> dict[str, str]:
        """{name: the module that registers it}, read without importing any of them."""
        if self._catalog is not None:
            return self._catalog
        catalog: dict[str, str] = {}
        for module, path in self._modules():
            found, dynamic = ({}, True) if path is None else \
                scan_source(path.read_text(encoding="utf-8"), self.decorator,
                            tuple(self.static_attrs))
            if dynamic:  # names this cannot read: import the module to learn them
                before = set(self._items)
                importlib.import_module(module)
                found.update({n: None for n in set(self._items) - before})
            for name, facts in found.items():
                catalog.setdefault(name, module)
                if facts is not None:
                    self._facts[name] = facts
        for ep in entry_points(group=self.group):
            self._entry_points.setdefault(ep.name, ep)
            catalog.setdefault(ep.name, "entry point")
        self._catalog = catalog
        return catalog

    def names(self) -> list[str]:
        return sorted(set(self.catalog()) | set(self._items))

    # -- objects ----------------------------------------------------------------------------
    def _load(self, name: str) -> None:
        module = self.catalog().get(name)
        if module is None:
            return
        if module == "entry point":
            ep = self._entry_points[name]
            try:  # a module registers on import; a class/function is registered by name
                obj = ep.load()
            except Exception as e:
                raise ConfigError(f"{self.kind} {name!r}: its plugin {ep.value!r} (entry point group "
                                  f"{self.group!r}) failed to import: {describe(e)}") from None
            if name not in self._items and not isinstance(obj, type(importlib)):
                self._add(name, obj)
            return
        importlib.import_module(module)
        listed = {n for n, m in self.catalog().items() if m == module}
        registered = {n for n, obj in self._items.items() if getattr(obj, "__module__", None) == module}
        if registered - listed:
            raise ConfigError(
                f"{module} registers {', '.join(sorted(registered - listed))} under names its "
                f"source does not show; list them in a module-level {DECLARED} = (...)")

    def _check_static(self, name: str) -> None:
        """The imported class must carry the attributes read from its source (a value inherited
        from a base class is invisible to the source reader)."""
        facts = self._facts.get(name)
        if facts is None:
            return
        obj = self._items[name]
        for attr, default in self.static_attrs.items():
            runtime, stated = getattr(obj, attr, default), facts.get(attr, default)
            if runtime != stated:
                said = f"states {stated!r}" if attr in facts else f"does not state it (default {default!r})"
                raise ConfigError(
                    f"{self.kind} {name!r} ({obj.__module__}) has {attr} = {runtime!r} but its "
                    f"class body {said}: state {attr} in the body of the registered class "
                    f"(semibench reads it from the source, without importing)")

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load(name)
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        if name not in self._checked:
            self._check_static(name)
            self._checked.add(name)
        return self._items[name]

    def static(self, name: str, attr: str):
        """A class attribute of ``static_attrs`` without importing the module when its source
        states it (else the base class's default); an unknown name is a ConfigError."""
        default = self.static_attrs.get(attr)
        if name in self._items:
            return getattr(self._items[name], attr, default)
        self.catalog()
        if name in self._facts:
            return self._facts[name].get(attr, default)
        return getattr(self.get(name), attr, default)


#: the class attributes read from a method's source without importing it (semibench.method)
METHOD_STATIC_ATTRS = {"fixed_ratio": None, "display_name": None, "report_rank": 89,
                       "in_paper": False, "colour": None}
METHODS: Registry = Registry("method", "semibench.methods", "semibench.methods",
                             static_attrs=METHOD_STATIC_ATTRS, name_attr="name")
DATASETS: Registry = Registry("dataset", "semibench.datasets", "semibench.datasets")
register_method = METHODS.register
register_dataset = DATASETS.register
