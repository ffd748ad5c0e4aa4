"""One default per option: a plugin option's default lives in its constructor's signature, and
conf/base.yaml, which shows every framework key, never gives a plugin option another value; every
default lies within the bounds its option declares."""

from __future__ import annotations

import math
from typing import Any

import pytest
from conftest import ROOT

from opdlm.config import BASE_FILE, compose
from opdlm.layers import PLUGIN_LIST_SLOTS, PLUGIN_SLOTS, load_yaml
from opdlm.registry import KINDS, option_hints, plugin_options
from opdlm.schema import check_bounds, check_type


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _base_nodes() -> list[tuple[str, str, dict[str, Any]]]:
    """(key, kind, node) of every plugin node conf/base.yaml holds."""
    base = load_yaml(BASE_FILE)
    nodes = [(key, kind, base[key]) for key, kind in PLUGIN_SLOTS.items()]
    nodes += [(f"{key}.{i}", kind, n) for key, kind in PLUGIN_LIST_SLOTS.items() for i, n in enumerate(base[key])]
    return nodes


@pytest.mark.parametrize("key,kind,node", _base_nodes(), ids=lambda x: x if isinstance(x, str) else "")
def test_base_yaml_gives_plugin_options_their_constructor_defaults(key, kind, node):
    reg = KINDS[kind][0]
    name, preset = reg.resolve(node["name"])
    assert name is not None, f"{key}: unknown {kind} {node['name']!r}"
    defaults = {**reg.defaults(name), **preset}
    for opt, value in node.items():
        if opt != "name":
            assert opt in defaults, f"{key}.{opt}: not an option of {kind} {name!r}"
            assert _plain(value) == _plain(defaults[opt]), (
                f"{key}.{opt}: conf/base.yaml says {value!r}, the constructor of {kind} {name!r} {defaults[opt]!r}")


def _all_options() -> list[tuple[str, str, str]]:
    return [(kind, name, opt) for kind, (reg, _) in KINDS.items() for name in reg.names()
            for opt in plugin_options(reg.get(name))]


@pytest.mark.parametrize("kind,name,opt", _all_options(), ids=lambda x: x)
def test_every_default_has_its_type_and_lies_within_its_bounds(kind, name, opt):
    cls = KINDS[kind][0].get(name)
    default = plugin_options(cls)[opt].default
    if default is plugin_options(cls)[opt].empty:
        return  # a required option (jsonl's path, ...): no default to check
    tp = option_hints(cls)[opt]
    assert check_type(_plain(default), tp), f"{kind} {name}.{opt}: default {default!r} is not {tp}"
    assert not (isinstance(default, float) and not math.isfinite(default))
    check_bounds(_plain(default), tp, f"{kind} {name}.{opt}")  # raises ConfigError naming it


def test_a_new_name_of_the_same_plugin_keeps_the_options():
    """An overlay that turns teacher_topk into student_topk keeps the demo's k: 8 (both are the topk
    support); a name of another plugin starts from that plugin's defaults."""
    demo = str(ROOT / "conf" / "demo.yaml")
    assert compose([demo], ["support.name=student_topk"])["support"] == {
        "name": "topk", "k": 8, "side": "student", "plus_sampled": False}
    assert compose([demo], ["support.name=teacher_topk_plus_sampled"])["support"]["k"] == 8
    assert compose([demo], ["support.name=sampled_token"])["support"] == {"name": "sampled_token"}
    overlay = ROOT / "conf" / "ablations" / "support" / "v2_student_topk_plus_sampled.yaml"
    assert compose([str(overlay)], [])["support"] == {"name": "topk", "k": 8, "side": "student", "plus_sampled": True}


def test_base_yaml_composes_alone():
    """conf/base.yaml is the first layer of every run; alone it holds the defaults for real models (K = 32,
    the LSM paper's special tokens), which the demos narrow to their 27-id vocabulary."""
    cfg = compose([str(BASE_FILE)], [])
    assert cfg["support"] == {"name": "topk", "k": 32, "side": "teacher", "plus_sampled": False}
    assert cfg["maskers"][0]["tokens"] == ["<", "think", "<|im_end|>"]
