"""Every public name the API reference shows has a docstring of its own: the functions and classes
of opdlm.api, opdlm.plugin_api, opdlm.registry and opdlm.types (and what their ``__all__`` exports),
and the public methods and properties of those classes. Names with a leading underscore, inherited
members and the methods dataclasses generate are not shown, so not checked."""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

MODULES = ("opdlm.api", "opdlm.plugin_api", "opdlm.registry", "opdlm.types")


def own_doc(obj: object) -> str | None:
    """The docstring written for ``obj`` itself: a class's own (not a base class's, nor the
    signature a dataclass puts there when it has none); a function's, a property's getter's."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        if doc and dataclasses.is_dataclass(obj):
            generated = obj.__name__ + str(inspect.signature(obj)).replace(" -> None", "")
            doc = None if doc == generated else doc
        return doc
    if isinstance(obj, property):
        return obj.__doc__ or (obj.fget.__doc__ if obj.fget else None)
    if isinstance(obj, (staticmethod, classmethod)):
        return obj.__func__.__doc__
    return getattr(obj, "__doc__", None)


def shown(module) -> dict[str, object]:
    """The module's public functions and classes: those it defines, and those its __all__ exports."""
    names = [n for n, v in vars(module).items() if not n.startswith("_")
             and (inspect.isclass(v) or inspect.isfunction(v)) and v.__module__ == module.__name__]
    names += [n for n in getattr(module, "__all__", ()) if n not in names]
    return {n: getattr(module, n) for n in names if inspect.isclass(getattr(module, n)) or inspect.isfunction(getattr(module, n))}


def undocumented(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    missing = []
    for name, obj in shown(module).items():
        if not (own_doc(obj) or "").strip():
            missing.append(f"{module_name}.{name}")
        if not inspect.isclass(obj):
            continue
        fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
        for attr, member in vars(obj).items():
            if attr.startswith("_") or attr in fields:
                continue
            if isinstance(member, (property, staticmethod, classmethod)) or inspect.isfunction(member):
                if not (own_doc(member) or "").strip():
                    missing.append(f"{module_name}.{name}.{attr}")
    return missing


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_has_a_docstring(module_name):
    missing = undocumented(module_name)
    assert not missing, "no docstring: " + ", ".join(missing)


def test_the_check_sees_a_missing_docstring(monkeypatch):
    """The check itself: a method, a property and a dataclass without docstrings are found."""
    import opdlm.types as types

    @dataclasses.dataclass(frozen=True)
    class Bare:
        x: int

        @property
        def double(self) -> int:
            return 2 * self.x

        def triple(self) -> int:
            return 3 * self.x

    Bare.__module__ = types.__name__
    monkeypatch.setattr(types, "Bare", Bare, raising=False)
    assert {"opdlm.types.Bare", "opdlm.types.Bare.double", "opdlm.types.Bare.triple"} <= set(undocumented("opdlm.types"))
