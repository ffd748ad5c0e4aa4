"""Find and import plugins: the built-in ``plugins/`` folder, extra folders named in the config
(``plugin_paths``) or in the OPDLM_PLUGIN_PATH environment variable, and installed packages that
declare the entry-point group ``opdlm.plugins``. Importing a plugin file registers it."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path

from opdlm.errors import ConfigError
from opdlm.paths import PLUGINS_DIR

BUILTIN_DIR = PLUGINS_DIR
ENTRY_POINT_GROUP = "opdlm.plugins"
_loaded: set[str] = set()


def _import_file(path: Path) -> None:
    key = str(path.resolve())
    if key in _loaded:
        return
    if path.resolve().is_relative_to(BUILTIN_DIR):
        rel = path.resolve().relative_to(BUILTIN_DIR).with_suffix("")
        modname = "opdlm_plugins." + ".".join(rel.parts)
    else:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        modname = f"opdlm_user_plugins.{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(modname, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        sys.modules.pop(modname, None)
        raise
    except Exception as e:
        sys.modules.pop(modname, None)
        tb = traceback.extract_tb(e.__traceback__)
        line = next((f.lineno for f in reversed(tb) if f.filename == str(path)), None)
        at = f"{path}:{line}" if line else str(path)
        raise ConfigError(
            f"plugin file {at} failed to import: {type(e).__name__}: {e}"
        ) from None
    _loaded.add(key)


def import_folder(folder: str | Path, source: str = "plugin_paths") -> None:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{source}: '{folder}' is not a folder")
    for path in sorted(folder.rglob("*.py")):
        if path.name.startswith("_") or "__pycache__" in path.parts:
            continue
        _import_file(path)


def discover(extra: Iterable[str | Path] = ()) -> None:
    """Import built-in plugins, extra folders and entry points (each only once)."""
    import_folder(BUILTIN_DIR)
    env = os.environ.get("OPDLM_PLUGIN_PATH", "")
    for folder in extra:
        import_folder(folder)
    for folder in [p for p in env.split(os.pathsep) if p]:
        import_folder(folder, "OPDLM_PLUGIN_PATH (environment variable)")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = f"entry-point:{ep.value}"
        if key in _loaded:
            continue
        try:
            ep.load()
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(
                f"plugin entry point '{ep.name} = {ep.value}' (group {ENTRY_POINT_GROUP}) failed to "
                f"import: {type(e).__name__}: {e}"
            ) from None
        _loaded.add(key)
