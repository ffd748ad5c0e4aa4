"""The documentation says what the code does: every key of conf/base.yaml is on the Configuration
page with its meaning, every command the README and docs/*.md show is real (its config composes,
its flags parse, and it is run by a test or marked GPU-only), the README's own config is the
shipped one, the plugin examples of docs/plugins.md run, and every public name the API reference
shows has a docstring. All in-process and fast: nothing trains past one OPD step."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TINY, demo_cfg
from doc_examples import PAGES, commands, example_blocks, example_folder, words

from opdlm.config import DEFAULT_CONF, compose

SYNOPSIS = re.compile(r"\b(FILE|FOLDER)\b|=N\b|\[conf=")  # usage lines with placeholders, not commands
#: the other tests' source (this file's own strings would count as the commands they look for)
TESTS_TEXT = "\n".join(p.read_text() for p in sorted((ROOT / "tests").rglob("test_*.py")) if p.name != "test_docs.py")


def load_hooks():
    spec = importlib.util.spec_from_file_location("opdlm_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def key_paths(node: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += key_paths(v, f"{prefix}{k}.")
    return out


def shown_commands() -> list[tuple[str, str, bool]]:
    """(page name, command, GPU-only) of every command shown, synopsis lines left out."""
    return [(p.name, c, gpu) for p in PAGES for c, gpu in commands(p) if not SYNOPSIS.search(c)]


# --- the Configuration page ------------------------------------------------------------------------

def test_every_key_of_base_yaml_is_on_the_configuration_page_with_its_meaning():
    hooks = load_hooks()
    page = hooks.render()
    base = yaml.safe_load((ROOT / "conf" / "base.yaml").read_text())
    for key in key_paths(base):
        assert f"`{key}`" in page, f"{key} is not on the Configuration page"
    rows = [r for r in page.splitlines() if r.startswith("| `")]
    assert len(rows) >= len([k for k in key_paths(base) if "." in k])
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows]
    assert all(len(c) == 3 for c in cells)
    empty = [key for key, _, meaning in cells if not meaning]
    assert not empty, f"keys without a meaning in conf/base.yaml: {empty}"
    assert hooks.MARKER in (ROOT / "docs" / "configuration.md").read_text()
    assert "docs/hooks.py" in (ROOT / "mkdocs.yml").read_text()


def test_a_key_comment_continues_below_it_and_a_section_comment_introduces_the_next_key(tmp_path):
    f = tmp_path / "base.yaml"
    f.write_text("# header\n\nrun:\n  name: x   # first line\n              # second line\n"
                 "# Models: the section\nteacher:\n  path: null  # a | b <c>\n")
    hooks = load_hooks()
    _, entries = hooks.parse(f)
    doc = {e["path"]: " ".join(e["doc"]) for e in entries}
    assert doc["run.name"] == "first line second line"
    assert [e["intro"] for e in entries if e["path"] == "teacher"] == [["Models: the section"]]
    page = hooks.render(f)
    assert "| `teacher.path` | `null` | a \\| b &lt;c&gt; |" in page


# --- commands -------------------------------------------------------------------------------------

def test_the_pages_show_commands():
    shown = shown_commands()
    assert len(shown) > 30
    assert any(c.startswith("python sweep.py") for _, c, _ in shown)
    assert any(c.startswith("python bench.py") for _, c, _ in shown)
    assert any(gpu for _, _, gpu in shown)


@pytest.fixture
def in_example_folder(monkeypatch):
    """cwd = a folder holding my_plugins/ (the commands say plugin_paths=[my_plugins])."""
    monkeypatch.chdir(example_folder().parent)


def _conf(word: str) -> str:
    path = Path(word[len("conf="):])
    return str(path if path.is_absolute() else ROOT / path)


def test_every_run_command_composes(in_example_folder):
    checked = 0
    for page, cmd, _ in shown_commands():
        w = words(cmd)
        if w[:2] != ["python", "run.py"] or w[2:3] in (["report"], ["prepare-model"]):
            continue
        args = w[2:]
        flags = [a for a in args if a.startswith("--")]
        assert set(flags) <= {"--check", "--list", "--help"}, f"{page}: {cmd}"
        confs = [_conf(a) for a in args if a.startswith("conf=")]
        overrides = [a for a in args if not a.startswith(("conf=", "--"))]
        try:
            compose(confs or [str(DEFAULT_CONF)], overrides)
        except Exception as e:  # noqa: BLE001 - the page and command say which
            pytest.fail(f"{page}: `{cmd}` does not compose: {e}")
        checked += 1
    assert checked > 20


def test_every_report_and_prepare_model_command_is_run_by_a_test():
    from opdlm.prepare import check_entries

    for page, cmd, _ in shown_commands():
        w = words(cmd)
        if w[2:3] == ["report"]:
            assert 'main(["report"' in TESTS_TEXT, f"{page}: {cmd}"
        elif w[2:3] == ["prepare-model"]:
            entry = dict(a.split("=", 1) for a in w[3:])
            entry = {k: int(v) if k == "layers" else v for k, v in entry.items()}
            check_entries([entry])
            if "gguf" in entry:  # tests/test_real_model.py converts this very file
                assert entry["gguf"] in TESTS_TEXT, f"{page}: {cmd}"


def test_prepare_model_cuts_a_folder_as_documented(tmp_path, capsys):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opdlm.cli import main

    src = tmp_path / "src"
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    Qwen2ForCausalLM(config).save_pretrained(src)
    from conftest import demo_cfg

    from opdlm.builder import build_run
    build_run(demo_cfg()).student.tokenizer.save_pretrained(src)  # (27 ids: the model's 64 rows hold them)
    assert main(["prepare-model", f"out={tmp_path / 'cut'}", f"from={src}", "layers=1"]) == 0
    assert "is ready" in capsys.readouterr().out


def test_every_sweep_command_names_overlays_that_exist_and_compose():
    checked = 0
    for page, cmd, _ in shown_commands():
        w = words(cmd)
        if w[:2] != ["python", "sweep.py"]:
            continue
        args, items = w[2:], []
        while args:
            a = args.pop(0)
            if a.startswith("--"):
                assert a in ("--name", "--seeds", "--jobs", "--out-dir"), f"{page}: {cmd}"
                args.pop(0)
            else:
                items.append(a)
        overlays = [o for item in items if item.endswith(".yaml") for o in _expand(item)]
        overrides = [i for i in items if not i.endswith(".yaml")]
        assert overlays, f"{page}: {cmd}"
        for ov in overlays:
            compose([ov], overrides)
        checked += 1
    assert checked >= 3
    assert "def test_sweep_runs_overlays_over_seeds" in TESTS_TEXT  # tests/test_sweep.py runs sweep.py itself


def _expand(pattern: str) -> list[str]:
    """The shell's {a,b} and * expansion of an overlay path, relative to the checkout."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m:
        return [p for alt in m.group(1).split(",") for p in _expand(pattern[:m.start()] + alt + pattern[m.end():])]
    found = sorted(str(p) for p in ROOT.glob(pattern))
    assert found, f"no overlay matches {pattern}"
    return found


def test_every_bench_command_parses_and_is_run_by_a_test_or_gpu_only(monkeypatch):
    from opdlm.bench import align, cli, head, rollout, scale, served, step

    calls = []
    for module in (align, head, rollout, scale, served, step):
        monkeypatch.setattr(module, "run", lambda args, _m=module.__name__: calls.append(_m) or 0)
    monkeypatch.setattr(cli, "study", lambda *a: [])
    monkeypatch.setattr(cli, "table", lambda rows: "")
    monkeypatch.setattr(cli, "plot", lambda rows, path: True)
    monkeypatch.chdir(ROOT)
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (the GPU-only commands parse as on a GPU)
    checked = 0
    for page, cmd, gpu in shown_commands():
        w = words(cmd)
        if w[:2] != ["python", "bench.py"]:
            continue
        assert cli.main(w[2:]) == 0, f"{page}: {cmd}"
        assert gpu or f'main(["{w[2]}"' in TESTS_TEXT, f"{page}: `{cmd}` is neither run by a test nor marked GPU-only"
        checked += 1
    assert checked >= 8


def test_readme_config_is_the_shipped_example():
    readme = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    shown, shipped = yaml.safe_load(block), yaml.safe_load((ROOT / "conf" / "examples" / "distill.yaml").read_text())

    def inside(a: dict, b: dict, prefix: str = "") -> None:
        for k, v in a.items():
            assert k in b, f"README: {prefix}{k} is not in conf/examples/distill.yaml"
            if isinstance(v, dict):
                inside(v, b[k], f"{prefix}{k}.")
            else:
                assert v == b[k], f"README: {prefix}{k}: {v!r}, conf/examples/distill.yaml: {b[k]!r}"

    inside(shown, shipped)


def test_the_pages_narrate_no_history():
    for page in PAGES:
        text = page.read_text().lower()
        for phrase in ("earlier version", "this version", "not yet", "measured before", "has not been re-measured"):
            assert phrase not in text, f"{page.name}: '{phrase}' (history goes into CHANGELOG.md)"


# --- the plugin examples --------------------------------------------------------------------------

def test_the_plugin_page_has_one_example_per_kind():
    code = "\n".join(example_blocks().values())
    for registry in ("SAMPLERS", "ALIGNERS", "SUPPORTS", "MASKERS", "LOSSES", "TASKS", "ENVIRONMENTS"):
        assert f"@{registry}.register(" in code, registry


def test_the_plugin_examples_run_together_in_an_opd_step(tmp_path):
    from opdlm.builder import build_run
    from opdlm.module import OPDModule

    cfg = demo_cfg(*TINY, f"plugin_paths=[{example_folder()}]", f"run.out_dir={tmp_path}",
                   "sampler.name=ancestral", "aligner.name=same_ids", "support.name=teacher_topk_student_top1",
                   "support.k=4", "maskers=[{name: skip_first, n: 2}]", "loss.name=scaled_lsm",
                   "task={name: reverse, length: 4, n_train: 200, n_val: 8, n_test: 8}")
    built = build_run(cfg)
    ex = built.task.examples("train")[:3]
    assert ex[0].solution == f"<think>{ex[0].prompt[:-1]}</think>\\boxed{{{ex[0].answer}}}"
    assert built.task.verify(ex[0].solution, ex[0]) and not built.task.verify("\\boxed{1}", ex[0])
    torch.manual_seed(0)
    module = OPDModule(cfg, built=built)
    tok = built.student.tokenizer
    ro = built.sampler.sample(module.student, tok, [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in ex], ex, n=2)
    assert built.sampler.top_p == 1.0
    view, teacher, support, mask = module.prepare(ro)
    assert support.ids.shape[-1] == 5 and not mask[:, :2].any()
    _, out, _ = module.loss_backward(ro, support, teacher, None, mask, view, mask.sum().float())
    assert torch.isfinite(out.token_loss[mask]).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())


def test_the_environment_example_plays_and_feeds_text_game(tmp_path):
    from opdlm.registry import ENVIRONMENTS, TASKS

    compose([str(DEFAULT_CONF)], [f"plugin_paths=[{example_folder()}]"])  # registers the examples
    env_node = {"name": "guess_number", "cache_dir": str(tmp_path), "n_train": 6, "n_val": 2, "n_test": 2}
    env = ENVIRONMENTS.build(env_node, "env")
    for game in env.games("train"):
        episode = env.start(game)
        steps = [episode.step(a) for a in episode.walkthrough()]
        assert steps[-1].won and episode.won and all(s.valid for s in steps)
    assert not env.start(game).step("north").valid
    task = TASKS.build({"name": "text_game", "env": env_node}, "task")
    assert all(e.meta["turns"] for e in task.examples("train"))


# --- the API reference ----------------------------------------------------------------------------

REFERENCE_MODULES = re.findall(r"^::: ([\w.]+)", (ROOT / "docs" / "reference.md").read_text(), re.M)


def public_names(modname: str):
    module = importlib.import_module(modname)
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not hasattr(module, "__all__") and obj.__module__ != modname:
            continue  # imported here, documented where it lives
        yield f"{modname}.{name}", obj
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                value = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                if not attr.startswith("_") and (inspect.isfunction(value) or isinstance(value, property)):
                    yield f"{modname}.{name}.{attr}", value


def test_every_public_name_the_reference_shows_has_a_docstring():
    assert {"opdlm.plugin_api", "opdlm.registry", "opdlm.types"} <= set(REFERENCE_MODULES)
    missing = []
    for modname in REFERENCE_MODULES:
        for name, obj in public_names(modname):
            doc = obj.__doc__ or ""
            generated = inspect.isclass(obj) and doc.startswith(f"{obj.__name__}(")  # a dataclass's signature
            if not doc.strip() or generated:
                missing.append(name)
    assert not missing, f"public names without a docstring: {missing}"
