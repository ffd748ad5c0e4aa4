"""The config's prepare entries: checked at compose, and each stage's fingerprint holds the entries
that made its own model folders (a student cut from another layer count leaves the teacher's stages cached)."""

from __future__ import annotations

import pytest
from conftest import demo_cfg

from opdlm.errors import ConfigError
from opdlm.fingerprint import _prepared


def test_entries_are_checked_at_compose():
    for bad, want in ((["prepare=[{out: a}]"], "prepare.0: give exactly one source"),
                      (["prepare=[{out: a, from: b}]"], "prepare.0.layers: expected an integer >= 1"),
                      (["prepare=[{out: a, gguf: b, layers: 2}]"], "prepare.0.layers: only an entry cut from a folder"),
                      (["prepare=[{out: a, gguf: b, size: 2}]"], "prepare.0.size: unknown key"),
                      (["prepare=[{out: a, gguf: b}, {out: a, from: a, layers: 1}]"], "prepare.1.out: prepare.0 writes")):
        with pytest.raises(ConfigError) as e:
            demo_cfg(*bad)
        assert want in str(e.value), str(e.value)



def test_a_stage_depends_on_the_entries_of_its_own_models():
    teacher = {"out": "m/t", "gguf": "x.gguf"}
    student = {"out": "m/s", "from": "m/t", "layers": 4}
    other = {"out": "m/o", "gguf": "y.gguf"}
    entries = [teacher, student, other]
    assert _prepared(entries, ["m/t"]) == [teacher]
    assert _prepared(entries, ["m/t", "m/s"]) == [teacher, student]
    assert _prepared(entries, ["m/s"]) == [teacher, student]  # (the student is cut from the teacher's folder)
    assert _prepared(entries, [None, "elsewhere"]) == []
