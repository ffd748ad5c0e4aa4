"""One generic registry per plugin kind.

A plugin is a class registered under a name; a config node ``{name: lsm, k: 32}`` is turned into
``cls(k=32)`` after every key and value is checked against the constructor's keyword-only
signature (opdlm.schema), so a typo fails with a one-line message before any weights load.
ConfigError, PluginError (opdlm.errors) and Range (opdlm.schema) are also importable from here.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from opdlm.errors import ConfigError, PluginError
from opdlm.schema import Range, check_bounds, check_type, did_you_mean, type_name

__all__ = ["ALIGNERS", "ENVIRONMENTS", "KINDS", "LOSSES", "MASKERS", "SAMPLERS", "SUPPORTS", "TASKS", "ConfigError",
           "PluginError", "Range", "Registry", "option_hints", "plugin_options"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> plugin class for one kind (sampler, aligner, support, masker, loss, task, environment)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}
        self._aliases: dict[str, tuple[str, dict[str, Any]]] = {}
        self._retired: dict[str, str] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@LOSSES.register("lsm")``. A duplicate name is an error naming both
        modules."""

        def deco(cls: type[T]) -> type[T]:
            old = self._entries.get(name)
            if old is not None and old is not cls:
                same = (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
                if not same:
                    raise ConfigError(
                        f"{self.kind} '{name}' is registered twice: by {old.__module__}."
                        f"{old.__qualname__} and by {cls.__module__}.{cls.__qualname__}"
                    )
            cls.plugin_name = name  # type: ignore[attr-defined]
            cls.plugin_kind = self.kind  # type: ignore[attr-defined]
            self._entries[name] = cls
            return cls

        return deco

    def alias(self, name: str, target: str, **preset: Any) -> None:
        """Register ``name`` as another name of ``target`` with some options preset (a plugin that
        became an option of another keeps its old name): ``{name: lsm_unnormalised}`` is completed
        to ``{name: reverse_kl, full: false}``."""
        if name in self._entries:
            raise ConfigError(f"{self.kind} '{name}' is registered, so it cannot also be an alias of '{target}'")
        self._aliases[name] = (target, dict(preset))

    def retire(self, name: str, why: str) -> None:
        """A plugin that was removed: naming it is an error that says ``why`` (and what to do)."""
        self._retired[name] = why

    def resolve(self, name: Any) -> tuple[str | None, dict[str, Any]]:
        """(the registered plugin a name stands for, the options its alias sets); (None, {}) for a
        name that is not registered."""
        if name in self._aliases:
            target, preset = self._aliases[name]
            return target, dict(preset)
        return (name, {}) if isinstance(name, str) and name in self._entries else (None, {})

    def aliases(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """alias -> (plugin name, preset options)."""
        return dict(self._aliases)

    def names(self) -> list[str]:
        """The registered names, sorted (aliases not included)."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def get(self, name: str, key: str | None = None) -> type[T]:
        """The class registered as ``name``; ``key`` is the config key used in the error."""
        key = key or self.kind
        if not isinstance(name, str):
            raise ConfigError(
                f"{key}.name: expected a {self.kind} name (string), got {name!r}; "
                f"choices: {', '.join(self.names())}"
            )
        if name in self._aliases:
            name = self._aliases[name][0]
        if name in self._retired and name not in self._entries:
            raise ConfigError(f"{key}.name: {self.kind} '{name}' was removed: {self._retired[name]}")
        if name not in self._entries:
            raise ConfigError(
                f"{key}.name: unknown {self.kind} '{name}'{did_you_mean(name, [*self._entries, *self._aliases])}; "
                f"choices: {', '.join(self.names()) or '(none registered)'}"
            )
        return self._entries[name]

    def summary(self, name: str) -> str:
        """The first line of the plugin's docstring (what ``--list`` shows)."""
        doc = inspect.getdoc(self._entries[name]) or ""
        return doc.strip().splitlines()[0] if doc.strip() else "(no docstring)"

    def options(self, name: str, key: str | None = None) -> dict[str, inspect.Parameter]:
        """The keyword-only constructor parameters of a plugin (its config keys)."""
        cls = self.get(name, key)
        return plugin_options(cls)

    def defaults(self, name: str) -> dict[str, Any]:
        """Option -> its default, for the options of ``name`` that have one."""
        return {
            k: p.default
            for k, p in self.options(name).items()
            if p.default is not inspect.Parameter.empty
        }

    def validate(self, node: Mapping[str, Any], key: str | None = None) -> dict[str, Any]:
        """Check a config node and return it completed with the constructor defaults."""
        key = key or self.kind
        if not isinstance(node, Mapping):
            raise ConfigError(f"{key}: expected a mapping with a 'name' key, got {node!r}")
        if "name" not in node:
            raise ConfigError(
                f"{key}: missing 'name'; choices: {', '.join(self.names())}"
            )
        name = node["name"]
        cls = self.get(name, key)
        if isinstance(name, str) and name in self._aliases:  # the plugin's own name, the preset options
            name, preset = self._aliases[name]
            for k, v in preset.items():
                if k in node and node[k] != v:
                    raise ConfigError(f"{key}.{k}: '{node['name']}' is '{name}' with {k}: {v!r}; for other "
                                      f"values use name: {name}")
            node = {**node, **preset, "name": name}
        opts = plugin_options(cls)
        hints = _hints(cls)
        out: dict[str, Any] = {"name": name}
        for k, v in node.items():
            if k == "name":
                continue
            if k not in opts:
                valid = ", ".join(opts) or "(none)"
                raise ConfigError(
                    f"{key}.{k}: unknown key for {self.kind} '{name}'{did_you_mean(k, opts)}; "
                    f"valid keys: {valid}"
                )
            tp = hints.get(k, inspect.Parameter.empty)
            if not check_type(v, tp):
                raise ConfigError(
                    f"{key}.{k}: expected {type_name(tp)}, got {v!r} ({type(v).__name__})"
                )
            check_bounds(v, tp, f"{key}.{k}")
            out[k] = v
        for k, p in opts.items():
            if k not in out:
                if p.default is inspect.Parameter.empty:
                    raise ConfigError(f"{key}.{k}: required by {self.kind} '{name}' but not set")
                out[k] = _plain(p.default)  # (a tuple default is a list in the config)
        for k, (kind, extra) in getattr(cls, "nested_nodes", {}).items():  # plugin nodes inside options
            out[k] = _complete_nested(out[k], KINDS[kind][0], extra, f"{key}.{k}")
        return out

    def build(self, node: Mapping[str, Any], key: str | None = None) -> T:
        """Validate ``node`` and construct the plugin. Constructor ValueErrors become ConfigErrors
        prefixed with the key."""
        node = self.validate(node, key)
        cls = self._entries[node["name"]]
        kwargs = {k: _plain(v) for k, v in node.items() if k != "name"}
        key = key or self.kind
        try:
            return cls(**kwargs)
        except ConfigError as e:  # plugins name the offending option ("k: must be >= 2, got 1")
            if e.key.split(".")[0] in kwargs:
                raise e.under(key) from None
            raise ConfigError(str(e), key=key) from None


def _plain(v: Any) -> Any:
    """A value as the config holds it: tuples as lists, read-only mappings (a default node) as dicts."""
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _hints(cls: type) -> dict[str, Any]:
    """The constructor's annotations, Annotated metadata (Range) kept."""
    try:
        return typing.get_type_hints(cls.__init__, include_extras=True)
    except Exception:
        return {}


def option_hints(cls: type) -> dict[str, Any]:
    """Option -> its annotation (with any Range), for every keyword-only option of a plugin class."""
    hints = _hints(cls)
    return {k: hints.get(k, inspect.Parameter.empty) for k in plugin_options(cls)}


def plugin_options(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword-only parameters of a plugin class's constructor: its options (its config keys)."""
    if cls.__init__ is object.__init__:  # no constructor of its own: no options
        return {}
    sig = inspect.signature(cls.__init__)
    opts = {}
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(
                f"{cls.__module__}.{cls.__qualname__}: plugin constructor parameter "
                f"'{p.name}' must be keyword-only (put it after '*')"
            )
        opts[p.name] = p
    return opts


SAMPLERS: Registry[Any] = Registry("sampler")
ALIGNERS: Registry[Any] = Registry("aligner")
SUPPORTS: Registry[Any] = Registry("support")
MASKERS: Registry[Any] = Registry("masker")
LOSSES: Registry[Any] = Registry("loss")
TASKS: Registry[Any] = Registry("task")
ENVIRONMENTS: Registry[Any] = Registry("environment")
MASKERS.retire("response", "the engine itself keeps only response tokens (up to and including EOS) at the "
               "positions the loss reads; delete this entry")

#: kind name -> (registry, plugins/ sub-folder)
def _complete_nested(value: Any, reg: Registry[Any], extra: Mapping[str, Any], key: str) -> Any:
    """A nested plugin node (or a list of them) completed with its defaults, its ``extra`` keys
    (keys of the outer plugin, such as weighted_sum's ``weight``) kept or given their defaults.
    Values that are not nodes are left for the outer plugin's own checks."""
    if isinstance(value, list):
        return [_complete_nested(v, reg, extra, f"{key}.{i}") for i, v in enumerate(value)]
    if not isinstance(value, Mapping) or "name" not in value:
        return value
    own = {k: v for k, v in value.items() if k not in extra}
    for k, default in extra.items():
        if isinstance(default, float) and k in value:  # a number key of the outer plugin (weighted_sum's weight)
            check_bounds(value[k], float, f"{key}.{k}")
    return {**reg.validate(own, key), **{k: value.get(k, d) for k, d in extra.items()}}


KINDS: dict[str, tuple[Registry[Any], str]] = {
    "sampler": (SAMPLERS, "samplers"),
    "aligner": (ALIGNERS, "aligners"),
    "support": (SUPPORTS, "supports"),
    "masker": (MASKERS, "maskers"),
    "loss": (LOSSES, "losses"),
    "task": (TASKS, "tasks"),
    "environment": (ENVIRONMENTS, "environments"),
}
