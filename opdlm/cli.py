"""The command line behind run.py: compose the config, then check, list, or run."""

from __future__ import annotations

import os
import sys
import warnings

from opdlm import dist, signals
from opdlm.builder import build_run
from opdlm.config import DEFAULT_CONF, Where, compose, split_args, to_yaml
from opdlm.discovery import discover
from opdlm.errors import ConfigError, ConfigWarning, PluginError
from opdlm.guard import NonFiniteError
from opdlm.models import scan_weights
from opdlm.pipeline import FolderBusy, RunInterrupted, Runner
from opdlm.prepare import ensure_all
from opdlm.registry import KINDS, option_hints, plugin_options
from opdlm.report import main as report_main
from opdlm.schema import range_of
from opdlm.served import ServedTeacherError
from opdlm.trainer import quiet_libraries

HELP = """usage: python run.py [conf=FILE ...] [key=value ...] [--check | --list | --help]
       python run.py report FOLDER    (pictures of a run or sweep folder, in FOLDER/report/)
       python run.py prepare-model out=FOLDER gguf=FILE            (a llama GGUF file as a Hugging Face folder)
       python run.py prepare-model out=FOLDER from=FOLDER layers=N (the first N decoder layers of a folder)

Runs an on-policy distillation experiment. With no conf=, runs the embedded demo (conf/demo.yaml).
  conf=FILE     a YAML layer over conf/base.yaml (repeatable; later layers win)
  key=value     override one key, e.g. loss.name=sampled_token support.k=16 maskers.0.tokens=[a,b]
  --check       compose the config, build every plugin (no weights), print the resolved YAML
  --list        list every registered plugin per kind with its options
  --help        this text
"""


def _list() -> str:
    discover()
    lines = []
    width = max((len(n) for reg, _ in KINDS.values() for n in reg.names()), default=10) + 2
    for kind, (reg, _) in KINDS.items():
        lines.append(f"{kind}:")
        for name in reg.names():
            cls = reg.get(name)
            hints = option_hints(cls)
            opts = ", ".join(f"{k}={p.default!r}" + (f" ({r.text()})" if (r := range_of(hints[k])) else "")
                             for k, p in plugin_options(cls).items())
            lines.append(f"  {name:<{width}} {reg.summary(name)}")
            if opts:
                lines.append(f"  {'':<{width}} options: {opts}")
        for alias, (target, preset) in sorted(reg.aliases().items()):
            fixed = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in preset.items())
            lines.append(f"  {alias:<{width}} = {target} with {fixed}")
    return "\n".join(lines)


def model_nodes(cfg: dict) -> list[tuple[str, dict]]:
    """(key, model node) of every model the config names: the teacher, the student, each task's teacher."""
    return [("teacher", cfg["teacher"]), ("student", cfg["student"]),
            *((f"tasks.{i}.teacher", e["teacher"]) for i, e in enumerate(cfg.get("tasks") or []))]


def prepare_model(args: list[str]) -> int:
    """``prepare-model key=value ...``: one entry of the config's ``prepare`` list, made now."""
    entry: dict = {}
    for a in args:
        k, sep, v = a.partition("=")
        if not sep or not k:
            print(f"opdlm: error: prepare-model: '{a}': expected key=value (keys: out, gguf, from, layers)", file=sys.stderr)
            return 2
        entry[k] = int(v) if k == "layers" and v.strip().lstrip("-").isdigit() else v
    quiet_libraries()
    try:
        folder = ensure_all([entry])[0]
    except ConfigError as e:
        print(f"opdlm: error: {str(e).replace('prepare.0', 'prepare-model', 1)}", file=sys.stderr)
        return 2
    print(f"[opdlm] prepare: {folder} is ready (name it in teacher.path or student.path)")
    return 0


_FORMAT_WARNING = warnings.formatwarning


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  line: str | None = None) -> str:
    """opdlm's config warnings as one line; the others as Python shows them."""
    if issubclass(category, ConfigWarning):
        return f"opdlm: warning: {message}\n"
    return _FORMAT_WARNING(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _warning_line
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    if argv[:1] == ["prepare-model"]:
        return prepare_model(argv[1:])
    confs, overrides, flags = split_args(argv)
    unknown = [f for f in flags if f not in ("--check", "--list", "--help")]
    if "--help" in flags or "-h" in argv:
        print(HELP)
        return 0
    if unknown:
        print(f"opdlm: error: unknown flag {unknown[0]} (flags: --check, --list, --help)", file=sys.stderr)
        return 2
    if "--list" in flags:
        try:
            print(_list())
        except ConfigError as e:
            print(f"opdlm: config error: {e}", file=sys.stderr)
            return 2
        return 0
    if not confs:
        confs = [str(DEFAULT_CONF)]
    where = Where()
    try:
        cfg = compose(confs, overrides, where)
        try:
            built = build_run(cfg)
            if "--check" in flags:  # every weight of the model folders, one tensor at a time
                for key, node in model_nodes(cfg):
                    if node["path"]:
                        scan_weights(node["path"], f"{key}.path")
        except ConfigError as e:
            raise where.locate(e) from None
    except ConfigError as e:
        print(f"opdlm: config error: {e}", file=sys.stderr)
        return 2
    except PluginError as e:  # a plugin that fails the config check's probe
        print(f"opdlm: plugin error: {e}", file=sys.stderr)
        return 1
    if "--check" in flags:
        print(to_yaml(cfg), end="")
        for line in built.summaries():
            print(f"# {line}", file=sys.stderr)
        print(f"# ok: {', '.join(confs)} composes and every plugin builds", file=sys.stderr)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    dist.launch(cfg["trainer"])  # several devices: start (or join) one process per device, once
    quiet_libraries()  # again: now it knows the rank
    runner = Runner(cfg, built)
    signals.stop_on_sigterm()
    signals.end_with_parent()
    try:
        runner.run()
    except ConfigError as e:
        print(f"opdlm: config error: {e}", file=sys.stderr)
        return 2
    except FolderBusy as e:
        print(f"opdlm: error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:
        print(f"opdlm: {e}", file=sys.stderr)
        return signals.exit_code()
    except KeyboardInterrupt:
        where = f" in stage {runner.current}" if runner.current else ""
        print(f"opdlm: {signals.cause()}{where}; finished stages are kept, and the same command continues "
              f"from them", file=sys.stderr)
        return signals.exit_code()
    except PluginError as e:
        print(f"opdlm: plugin error: {e}", file=sys.stderr)
        return 1
    except ServedTeacherError as e:  # (every rank stops alike: rank 0 says it)
        if dist.is_main():
            print(f"opdlm: teacher server: {e}", file=sys.stderr)
        return 1
    except NonFiniteError as e:  # every rank stops at the same step with the same line: rank 0 says it
        if dist.is_main():
            print(f"opdlm: non-finite: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        target = f" '{e.filename}'" if e.filename else ""
        print(f"opdlm: error: cannot write or read{target}: {e.strerror or type(e).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
