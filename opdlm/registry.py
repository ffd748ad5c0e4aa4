"""One generic registry per plugin kind, and the config error every layer raises.

A plugin is a class registered under a name; a config node ``{name: lsm, k: 32}`` is turned into
``cls(k=32)`` after every key and value is checked against the constructor's keyword-only
signature, so a typo fails with a one-line message before any weights load.
"""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration: one line naming where it was set, the key, the value and the choices.

    ``key`` is the config key the error is about (relative to the plugin that raised it, until a
    caller puts the node's key in front with ``under``; "" when it names a file or nothing),
    ``detail`` the rest, and ``origin`` the file:line or "command line" that set the key (``at``).
    The text is "origin: key: detail". An error raised as one string, "k: must be >= 1", has its
    key read from the text once, here: a first segment without spaces, before ": "."""

    def __init__(self, message: str, *, key: str | None = None, origin: str = "") -> None:
        if key is None:
            head, sep, rest = message.partition(": ")
            key, message = (head, rest) if sep and head and not any(c in head for c in " /=") else ("", message)
        self.key, self.detail, self.origin = key, message, origin
        super().__init__(": ".join(x for x in (origin, key, message) if x))

    def under(self, prefix: str) -> ConfigError:
        """The same error with the node's key in front of its own ("support" + "k" -> "support.k"),
        or, when it names no key of the node, with the node's key as its key."""
        if self.key:
            return ConfigError(self.detail, key=f"{prefix}.{self.key}", origin=self.origin)
        return ConfigError(self.detail, key=prefix, origin=self.origin)

    def at(self, origin: str) -> ConfigError:
        """The same error, located at the file:line or command line that set its key."""
        return ConfigError(self.detail, key=self.key, origin=origin)


class PluginError(RuntimeError):
    """A plugin broke its contract while running (a loss that returned no LossOutput, ...): the
    message is one line naming the plugin and its file."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass(frozen=True)
class Range:
    """The bounds of a numeric option, declared in its annotation so that the config check enforces
    them for every plugin alike, before any weights load::

        def __init__(self, *, top_p: Annotated[float, Range(gt=0, le=1)] = 0.9,
                     max_weight: Annotated[float, Range(gt=0)] | None = None) -> None:

    gt / ge / lt / le: the value must be > / >= / < / <= the bound (None: no bound on that side);
    ``note`` is said with it ("0 = no limit").
    In a list annotation (``list[Annotated[float, Range(ge=0)]]``) it applies to every item. A float
    option is always checked to be finite (no NaN, no ±inf), with or without a Range."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    note: str = ""

    def holds(self, v: float) -> bool:
        return ((self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
                and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le))

    def text(self) -> str:
        """'in (0, 1]', '> 0', '>= 0 and < 1', ..."""
        lo = (f"({_num(self.gt)}" if self.gt is not None else f"[{_num(self.ge)}") if (self.gt, self.ge) != (None, None) else None
        hi = (f"{_num(self.lt)})" if self.lt is not None else f"{_num(self.le)}]") if (self.lt, self.le) != (None, None) else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f"{'>' if self.gt is not None else '>='} {lo[1:]}"
        if hi:
            return f"{'<' if self.lt is not None else '<='} {hi[:-1]}"
        return "any number"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def nonfinite(value: Any) -> bool:
    """True for a float that is NaN or ±inf (YAML's .nan, .inf, -.inf)."""
    return isinstance(value, float) and not math.isfinite(value)


def check_bounds(value: Any, tp: Any, key: str) -> None:
    """ConfigError for a value that has the right type (check_type) but is not finite or breaks a
    declared Range; lists are checked item by item ("key.2: must be ...")."""
    if typing.get_origin(tp) is typing.Annotated:
        inner, *meta = typing.get_args(tp)
        check_bounds(value, inner, key)
        for rng in meta:
            if isinstance(rng, Range) and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and not rng.holds(value):
                note = f" ({rng.note})" if rng.note else ""
                raise ConfigError(f"{key}: must be {rng.text()}{note}, got {value!r}")
        return
    if nonfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for a in args:  # the first member the value fits
            if check_type(value, a):
                check_bounds(value, a, key)
                return
    elif origin in (list, tuple) and args and isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_bounds(v, args[0], f"{key}.{i}")


def range_of(tp: Any) -> Range | None:
    """The Range declared for a scalar option (through Optional), for listings and docs."""
    if typing.get_origin(tp) is typing.Annotated:
        return next((m for m in typing.get_args(tp)[1:] if isinstance(m, Range)), None)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((r for a in typing.get_args(tp) if (r := range_of(a)) is not None), None)
    return None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Annotated:
        return _type_name(typing.get_args(tp)[0])
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            tp.__name__, tp.__name__
        )
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or origin is Mapping:
        return "mapping"
    return str(tp)


def check_type(value: Any, tp: Any) -> bool:
    """True if a YAML value fits the annotation ``tp`` (ints are accepted for floats, bools are not
    accepted for numbers)."""
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    if typing.get_origin(tp) is typing.Annotated:
        return check_type(value, typing.get_args(tp)[0])
    if tp is type(None) or tp is None:
        return value is None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(check_type(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        inner = args[0]
        return all(check_type(v, inner) for v in value)
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return isinstance(value, Mapping)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is bool:
        return isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


class Registry(Generic[T]):
    """Name -> plugin class for one kind (sampler, aligner, support, masker, loss, task)."""

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

    def aliases(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """alias -> (plugin name, preset options)."""
        return dict(self._aliases)

    def names(self) -> list[str]:
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
        doc = inspect.getdoc(self._entries[name]) or ""
        return doc.strip().splitlines()[0] if doc.strip() else "(no docstring)"

    def options(self, name: str, key: str | None = None) -> dict[str, inspect.Parameter]:
        """The keyword-only constructor parameters of a plugin (its config keys)."""
        cls = self.get(name, key)
        return plugin_options(cls)

    def defaults(self, name: str) -> dict[str, Any]:
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
                    f"{key}.{k}: expected {_type_name(tp)}, got {v!r} ({type(v).__name__})"
                )
            check_bounds(v, tp, f"{key}.{k}")
            out[k] = v
        for k, p in opts.items():
            if k not in out:
                if p.default is inspect.Parameter.empty:
                    raise ConfigError(f"{key}.{k}: required by {self.kind} '{name}' but not set")
                out[k] = p.default
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
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
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
