"""Model folders whose parts disagree are one line at --check (and at the start of a run): a config.json
whose sizes are not those of the weights names the tensor, read from the files' headers without
loading a weight; a folder without tokenizer files says so; a tokenizer that cannot spell the task's
text names the characters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, demo_cfg
from safetensors import safe_open

from opdlm.builder import build_run
from opdlm.cli import main
from opdlm.errors import ConfigError
from opdlm.models import char_tokenizer, load_weights, reason, save_hf

PREFIX = "opdlm: config error: command line: "


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny teacher (tied head) saved as a Hugging Face folder, and its model."""
    built = build_run(demo_cfg(*TINY))
    model = built.teacher.build(0)
    folder = save_hf(model, built.teacher.tokenizer, tmp_path_factory.mktemp("saved") / "teacher")
    return folder, model, built


def copy_with(saved, tmp_path: Path, name: str = "t", **config) -> Path:
    """A copy of the saved folder whose config.json has ``config`` set."""
    folder = shutil.copytree(saved[0], tmp_path / name)
    data = json.loads((folder / "config.json").read_text())
    data.update(config)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def check(capsys, *args: str) -> tuple[int, str]:
    """main(--check ...)'s exit code and its stderr (which must be one line when the code is not 0)."""
    capsys.readouterr()
    code = main(["--check", *TINY, *args])
    err = capsys.readouterr().err.strip()
    if code:
        assert len(err.splitlines()) == 1, err
    return code, err


def shape(model, name: str) -> list[int]:
    return list(model.state_dict()[name].shape)


def test_an_undamaged_folder_passes(saved, capsys):
    assert check(capsys, f"teacher.path={saved[0]}")[0] == 0


def test_a_config_whose_sizes_disagree_with_the_weights_names_the_tensor(saved, tmp_path, capsys):
    _, model, _ = saved
    hidden = model.config.hidden_size
    folder = copy_with(saved, tmp_path, intermediate_size=2 * model.config.intermediate_size)
    name = "model.layers.0.mlp.gate_proj.weight"  # the first tensor of the model with the MLP's width
    assert shape(model, name) == [model.config.intermediate_size, hidden]
    line = (f"{PREFIX}teacher.path: tensor '{name}' of '{folder / 'model.safetensors'}' has shape "
            f"[{model.config.intermediate_size}, {hidden}], but '{folder / 'config.json'}' makes it "
            f"[{2 * model.config.intermediate_size}, {hidden}] (intermediate_size={2 * model.config.intermediate_size}): "
            f"the config does not belong to these weights")
    assert check(capsys, f"teacher.path={folder}") == (2, line)
    # the student's key, and a vocabulary of another size
    rows = model.config.vocab_size
    folder = copy_with(saved, tmp_path, "v", vocab_size=rows + 7)
    assert check(capsys, f"student.path={folder}") == (2, (
        f"{PREFIX}student.path: tensor 'model.embed_tokens.weight' of '{folder / 'model.safetensors'}' has shape "
        f"[{rows}, {hidden}], but '{folder / 'config.json'}' makes it [{rows + 7}, {hidden}] (vocab_size={rows + 7}): "
        f"the config does not belong to these weights"))


def test_a_run_without_check_stops_with_the_same_line(saved, tmp_path, capsys):
    folder = copy_with(saved, tmp_path, intermediate_size=2 * saved[1].config.intermediate_size)
    _, line = check(capsys, f"teacher.path={folder}")
    capsys.readouterr()
    assert main([*TINY, f"teacher.path={folder}", f"run.out_dir={tmp_path / 'runs'}"]) == 2
    out = capsys.readouterr()
    assert out.err.strip() == line
    assert not list((tmp_path / "runs").rglob("stage.json"))
    # loading the folder itself (a stage's start) says the same, not transformers' load report
    with pytest.raises(ConfigError) as e:
        load_weights(folder, "teacher.path", torch.float32)
    assert f"{PREFIX}{e.value}" == line
    out = capsys.readouterr()
    assert "REPORT" not in out.out + out.err and "MISMATCH" not in out.out + out.err


def test_layers_the_weights_lack_or_have_more_of(saved, tmp_path, capsys):
    _, model, _ = saved
    layers = model.config.num_hidden_layers
    folder = copy_with(saved, tmp_path, num_hidden_layers=layers + 1, layer_types=["full_attention"] * (layers + 1))
    first_missing = f"model.layers.{layers}.self_attn.q_proj.weight"  # the first tensor of a Qwen2 decoder layer
    assert check(capsys, f"teacher.path={folder}") == (2, (
        f"{PREFIX}teacher.path: '{folder / 'config.json'}' needs tensor '{first_missing}', which no weight file of "
        f"'{folder}' holds: the config does not belong to these weights"))
    # a config of fewer layers than the weights: transformers would drop the others with a warning
    two = build_run(demo_cfg(*TINY, "teacher.layers=2"))
    big = save_hf(two.teacher.build(0), two.teacher.tokenizer, tmp_path / "two")
    data = json.loads((big / "config.json").read_text())
    data.update(num_hidden_layers=1, layer_types=data["layer_types"][:1])
    (big / "config.json").write_text(json.dumps(data))
    with safe_open(str(big / "model.safetensors"), framework="pt") as fh:
        extra = sorted(n for n in fh.keys() if ".layers.1." in n)[0]  # the file's header order
    assert check(capsys, f"teacher.path={big}") == (2, (
        f"{PREFIX}teacher.path: '{big / 'model.safetensors'}' holds tensor '{extra}', for which "
        f"'{big / 'config.json'}' has no place (it makes fewer layers or experts): the config does not belong to "
        f"these weights"))


def test_tied_and_untied_heads(saved, tmp_path, capsys):
    _, model, _ = saved
    assert model.config.tie_word_embeddings
    with safe_open(str(saved[0] / "model.safetensors"), framework="pt") as fh:
        assert "lm_head.weight" not in fh.keys()  # tied: only the embedding is in the file, and that is fine
    folder = copy_with(saved, tmp_path, tie_word_embeddings=False)
    assert check(capsys, f"teacher.path={folder}") == (2, (
        f"{PREFIX}teacher.path: '{folder / 'config.json'}' needs tensor 'lm_head.weight', which no weight file of "
        f"'{folder}' holds: the config does not belong to these weights"))


def test_a_sharded_folder_names_the_shard(saved, tmp_path, capsys):
    _, model, built = saved
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="20KB")
    built.teacher.tokenizer.save_pretrained(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    assert check(capsys, f"teacher.path={folder}")[0] == 0
    data = json.loads((folder / "config.json").read_text())
    data["num_key_value_heads"] = 1
    (folder / "config.json").write_text(json.dumps(data))
    name = "model.layers.0.self_attn.k_proj.weight"
    head = model.config.hidden_size // model.config.num_attention_heads
    assert check(capsys, f"teacher.path={folder}") == (2, (
        f"{PREFIX}teacher.path: tensor '{name}' of '{folder / index[name]}' has shape {shape(model, name)}, but "
        f"'{folder / 'config.json'}' makes it [{head}, {model.config.hidden_size}]: the config does not belong to "
        f"these weights"))
    (folder / index["model.norm.weight"]).unlink()
    assert check(capsys, f"teacher.path={folder}") == (2, (
        f"{PREFIX}teacher.path: '{folder / 'model.safetensors.index.json'}' names the shard "
        f"'{index['model.norm.weight']}', which '{folder}' lacks"))


def test_the_shape_check_reads_no_weights(saved, tmp_path, capsys):
    """Only the header of a file whose weights are cut off is read: the shape is named first (loading
    any weight, or opening the file with safetensors, would fail on the missing bytes)."""
    _, model, _ = saved
    folder = copy_with(saved, tmp_path, intermediate_size=2 * model.config.intermediate_size)
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    weights.write_bytes(raw[:header_end + 4])  # the header whole, the weights gone
    code, err = check(capsys, f"teacher.path={folder}")
    assert code == 2 and err.startswith(f"{PREFIX}teacher.path: tensor 'model.layers.0.mlp.gate_proj.weight' of "), err
    # with the config repaired, the cut-off file is found next
    shutil.copy(saved[0] / "config.json", folder / "config.json")
    code, err = check(capsys, f"teacher.path={folder}")
    assert code == 2 and err.startswith(f"{PREFIX}teacher.path: '{weights}' is damaged or truncated"), err
    # a header that claims more bytes than the file has
    weights.write_bytes(raw[:header_end - 10])
    code, err = check(capsys, f"teacher.path={folder}")
    assert err == (f"{PREFIX}teacher.path: '{weights}' is damaged or truncated (header: ValueError: its header claims "
                   f"{header_end - 8:,} bytes, the file has {header_end - 10:,})")


def test_a_folder_without_tokenizer_files_says_so(saved, tmp_path, capsys):
    folder = shutil.copytree(saved[0], tmp_path / "t")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    assert check(capsys, f"teacher.path={folder}") == (2, (
        f"{PREFIX}teacher.path: '{folder}' holds no tokenizer files (tokenizer.json, tokenizer.model, vocab.json + "
        f"merges.txt, vocab.txt, ...); copy the tokenizer's files into it, or set teacher.tokenizer_path to the "
        f"folder that holds them"))
    # its tokenizer elsewhere: the folder is fine
    assert check(capsys, f"teacher.path={folder}", f"teacher.tokenizer_path={saved[0]}")[0] == 0


def test_an_empty_tokenizer_folder_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for role in ("teacher", "student"):
        assert check(capsys, f"{role}.tokenizer_path={tmp_path / 'empty'}") == (2, (
            f"{PREFIX}{role}.tokenizer_path: '{tmp_path / 'empty'}' holds no tokenizer files (tokenizer.json, "
            f"tokenizer.model, vocab.json + merges.txt, vocab.txt, ...)"))
    (tmp_path / "f").write_text("x")
    assert check(capsys, f"teacher.tokenizer_path={tmp_path / 'f'}") == (2, (
        f"{PREFIX}teacher.tokenizer_path: '{tmp_path / 'f'}' is a file; give the folder that holds the tokenizer's "
        f"files"))


def test_an_error_whose_message_starts_with_a_blank_line_keeps_its_reason():
    try:
        try:
            raise ValueError("Couldn't instantiate the backend tokenizer")
        except ValueError:
            raise ImportError("\n requires the protobuf library") from None
    except ImportError as e:
        assert reason(e) == "ImportError: requires the protobuf library"
    try:
        try:
            raise ValueError("the first cause\nmore")
        except ValueError:
            raise ImportError("") from None
    except ImportError as e:
        assert reason(e) == "ValueError: the first cause"


def unknown_setup(tmp_path: Path, missing: str) -> tuple[Path, list[str]]:
    """A character tokenizer of the tiny task's text without the characters ``missing``, saved; and
    the task's prompts and solutions."""
    task = build_run(demo_cfg(*TINY)).task
    texts = [t for s in ("train", "val", "test") for ex in task.examples(s) for t in (ex.prompt, ex.solution or "")]
    chars = sorted({c for t in texts for c in t.replace("<think>", "").replace("</think>", "")} - set(missing))
    char_tokenizer(["".join(chars)]).save_pretrained(tmp_path / "tok")
    return tmp_path / "tok", texts


def test_a_tokenizer_that_cannot_spell_the_task_names_the_characters(tmp_path, capsys):
    tok, texts = unknown_setup(tmp_path, "+")
    # independently: each '+' is one unknown token; every other character one token, each think tag one
    n_unk = sum(t.count("+") for t in texts)
    total = sum(len(t) - t.count("<think>") * 6 - t.count("</think>") * 7 for t in texts)
    share = n_unk / total
    assert share > 0.01
    line = (f"{PREFIX}teacher.tokenizer_path: the tokenizer of '{tok}' turns {share * 100:.3g}% of the task's prompt "
            f"and solution tokens ({n_unk:,} of {total:,}) into its unknown token '<unk>' (it cannot spell '+'); "
            f"data.max_unknown allows 1%: use a tokenizer that knows these characters, or replace them in the task's "
            f"text")
    assert check(capsys, f"teacher.tokenizer_path={tok}", f"student.tokenizer_path={tok}") == (2, line)
    # a share within data.max_unknown is said, once per model, and the check passes
    code, err = check(capsys, f"teacher.tokenizer_path={tok}", f"student.tokenizer_path={tok}",
                      f"data.max_unknown={share + 0.01}")
    assert code == 0
    notes = [x for x in err.splitlines() if "unknown token" in x]
    assert [x.split(":")[0] for x in notes] == ["[opdlm] teacher.tokenizer_path", "[opdlm] student.tokenizer_path"]
    assert notes[0].endswith(f"(it cannot spell '+'), within data.max_unknown ({(share + 0.01) * 100:.3g}%)")


def test_unknown_characters_are_named_most_frequent_first(tmp_path, capsys):
    tok, texts = unknown_setup(tmp_path, "+=b")
    counts = {c: sum(t.count(c) for t in texts) for c in "+=b"}
    order = sorted(counts, key=lambda c: (-counts[c], c))
    code, err = check(capsys, f"teacher.tokenizer_path={tok}", f"student.tokenizer_path={tok}")
    assert code == 2 and f"(it cannot spell {', '.join(repr(c) for c in order)});" in err, err


def test_a_tokenizer_that_spells_everything_is_quiet(tmp_path, capsys):
    tok, _ = unknown_setup(tmp_path, "")
    code, err = check(capsys, f"teacher.tokenizer_path={tok}", f"student.tokenizer_path={tok}", "data.max_unknown=0")
    assert code == 0 and "unknown token" not in err


def test_pytorch_bin_weights_are_compared_through_a_memory_map(saved, tmp_path, capsys):
    _, model, built = saved
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    built.teacher.tokenizer.save_pretrained(folder)
    data = json.loads((saved[0] / "config.json").read_text())
    data["hidden_size"] = 2 * model.config.hidden_size + 2  # a width no other key of the config has
    (folder / "config.json").write_text(json.dumps(data))
    rows, width = shape(model, "model.embed_tokens.weight")
    assert check(capsys, f"teacher.path={folder}") == (2, (
        f"{PREFIX}teacher.path: tensor 'model.embed_tokens.weight' of '{folder / 'pytorch_model.bin'}' has shape "
        f"[{rows}, {width}], but '{folder / 'config.json'}' makes it [{rows}, {2 * width + 2}] "
        f"(hidden_size={2 * width + 2}): the config does not belong to these weights"))
