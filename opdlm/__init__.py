"""opdlm: on-policy distillation for language models with pluggable samplers, supports,
aligners, maskers, losses and tasks.

The Python API (opdlm.api) and the plugin registries (opdlm.registry) are importable from here;
they load on first use, so ``import opdlm`` stays cheap::

    config = opdlm.compose("conf/demo.yaml", "loss.name=lsm")
    results = opdlm.run(config)
"""

from __future__ import annotations

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: `import opdlm` stays cheap)

__version__ = "0.1.0"

#: name -> the module it comes from (loaded on first access)
_LAZY = {
    **{name: "opdlm.api" for name in ("compose", "build", "run", "Built", "Config", "Results", "Stage")},
    **{name: "opdlm.registry" for name in ("SAMPLERS", "ALIGNERS", "SUPPORTS", "MASKERS", "LOSSES", "TASKS",
                                           "ENVIRONMENTS")},
    **{name: "opdlm.errors" for name in ("ConfigError", "PluginError")},
}

__all__ = ["ALIGNERS", "ENVIRONMENTS", "LOSSES", "MASKERS", "SAMPLERS", "SUPPORTS", "TASKS", "Built", "Config",
           "ConfigError", "PluginError", "Results", "Stage", "__version__", "build", "compose", "run"]

if TYPE_CHECKING:
    from typing import Any

    from opdlm.api import Built, Config, Results, Stage, build, compose, run
    from opdlm.errors import ConfigError, PluginError
    from opdlm.registry import ALIGNERS, ENVIRONMENTS, LOSSES, MASKERS, SAMPLERS, SUPPORTS, TASKS


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'opdlm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
