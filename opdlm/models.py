"""Load causal LMs and their tokenizers from local Hugging Face folders, or build tiny ones in
memory (Qwen2 or Llama architecture from transformers, with a character-level tokenizer made from
the task's text). Nothing here reaches a model hub."""

from __future__ import annotations

import errno
import json
import re
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from opdlm import dist
from opdlm.errors import ConfigError
from opdlm.guard import first_nonfinite
from opdlm.rollouts import FORMER_EOS, end_ids
from opdlm.served import ServedTeacher, TeacherServer

PAD, EOS, UNK = "<pad>", "<|im_end|>", "<unk>"
CHAR_SPECIALS = [PAD, EOS, UNK, "<think>", "</think>"]
ARCHS = {"qwen2": Qwen2Config, "llama": LlamaConfig}


def char_tokenizer(texts: Iterable[str], extra_tokens: Iterable[str] = ("<think>", "</think>")) -> PreTrainedTokenizerFast:
    """A character-level tokenizer whose vocabulary is every character of ``texts`` (sorted, so
    it is reproducible) plus <pad>, <|im_end|> (end of sequence), <unk> and ``extra_tokens`` as
    single tokens."""
    specials = [PAD, EOS, UNK, *[t for t in extra_tokens if t not in (PAD, EOS, UNK)]]
    chars: set[str] = set()
    for t in texts:
        for sp in specials:  # characters seen only inside a special token are not needed alone
            t = t.replace(sp, "")
        chars.update(t)
    chars = sorted(chars)
    vocab = {tok: i for i, tok in enumerate(specials)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    fast.add_tokens([t for t in specials if t not in (PAD, EOS, UNK)], special_tokens=False)
    fast.add_special_tokens({"pad_token": PAD, "eos_token": EOS, "unk_token": UNK})
    fast.padding_side = "left"
    return fast


BPE_EOS = "<|eot_id|>"
TINY_TOKENIZERS = ("char", "bpe")


def bpe_tokenizer(texts: Iterable[str], vocab_size: int, max_digits: int, all_bytes: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` in the style of Llama 3: digits are grouped
    up to ``max_digits`` from the left before merging, <think> tags are ordinary merged text, and the
    end of turn is the control token <|eot_id|> (padding <pad>). Its alphabet is the bytes of
    ``texts`` (all 256 bytes with ``all_bytes``). Deterministic for the same texts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(rf"\d{{1,{max_digits}}}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # the alphabet is the bytes the texts use (not all 256): a tiny model never learns what the
    # other bytes mean, and sampling them would only produce text no teacher can read
    extra = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()} if all_bytes else {}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BPE_EOS], show_progress=False, **extra)
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=BPE_EOS)
    fast.padding_side = "left"
    return fast


def tiny_tokenizer(node: Mapping[str, Any], texts: list[str], key: str,
                   train_texts: list[str] | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a tiny model, built from the task's text as the node asks: characters from
    ``texts`` (the task's character inventory), BPE merges learnt on ``train_texts`` + ``texts``."""
    kind = node["tiny_tokenizer"]
    if kind == "char":
        return char_tokenizer(texts)
    if kind == "bpe":  # (tiny_vocab >= 64 and tiny_digits >= 1: opdlm.config.BOUNDS)
        return bpe_tokenizer([*(train_texts or []), *texts], node["tiny_vocab"], node["tiny_digits"])
    raise ConfigError(f"{key}.tiny_tokenizer: unknown kind '{kind}'; choices: {', '.join(TINY_TOKENIZERS)}")


def reason(e: BaseException) -> str:
    """An exception's first non-empty line (or its cause's, or its type's name): transformers'
    messages often start with a newline, which would leave an error line without its reason."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        for line in str(cur).splitlines():
            if line.strip():
                return f"{type(cur).__name__}: {line.strip()}"
        cur = cur.__cause__ or cur.__context__
    return type(e).__name__


#: files of which a tokenizer folder holds at least one: the vocabulary (the tokenizers library's
#: tokenizer.json, a SentencePiece or tiktoken model, a vocab.* / merges.txt pair); tokenizer_config.json
#: alone names a class but no vocabulary (transformers then builds a tokenizer of one id)
TOKENIZER_FILES = ("tokenizer.json", "*.model", "*.tiktoken", "vocab.*", "merges.txt", "*.spm")


def has_tokenizer_files(folder: Path) -> bool:
    return any(f.is_file() for pattern in TOKENIZER_FILES for f in folder.glob(pattern))


def load_tokenizer(path: str, key: str) -> PreTrainedTokenizerBase:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{key}: tokenizer folder '{path}' does not exist")
    if not p.is_dir():
        raise ConfigError(f"{key}: '{path}' is a file; give the folder that holds the tokenizer's files")
    if not has_tokenizer_files(p):
        other = f"; copy the tokenizer's files into it, or set {key[:-len('.path')]}.tokenizer_path to the folder " \
                f"that holds them" if key.endswith(".path") else ""
        raise ConfigError(f"{key}: '{path}' holds no tokenizer files (tokenizer.json, tokenizer.model, vocab.json + "
                          f"merges.txt, vocab.txt, ...){other}")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise ConfigError(f"{key}: cannot load a tokenizer from '{path}': {reason(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def check_model_folder(path: str, key: str) -> Any:
    """The model's config (read from config.json, no weights), or a ConfigError."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{key}: model folder '{path}' does not exist (give a local Hugging Face folder)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{key}: '{path}' has no config.json: not a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise ConfigError(f"{key}: cannot read '{path}/config.json': {reason(e)}") from None
    check_weights(p, key, config)
    return config


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_weights(folder: Path, key: str, config: Any = None) -> None:
    """The folder holds weights, their shapes are those ``config`` gives (check_shapes), and every
    safetensors file's header is whole and matches the file's length (a truncated or damaged file is
    found here, without loading any weights)."""
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(f"{key}: '{folder}' has no weights (none of {', '.join(WEIGHT_FILES)})")
    if config is not None:
        check_shapes(folder, config, key)
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:
            raise ConfigError(f"{key}: '{f}' is damaged or truncated ({reason(e)})") from None


def safetensors_shapes(f: Path, key: str) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from a safetensors file's header (its first 8 bytes give the length of a JSON
    header; the weights after it are not read)."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"its header claims {n:,} bytes, the file has {size:,}")
            header = json.loads(fh.read(n))
        return {name: tuple(int(d) for d in v["shape"]) for name, v in header.items() if name != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f"{key}: '{f}' is damaged or truncated (header: {reason(e)})") from None


def weight_files(folder: Path, key: str) -> list[Path]:
    """The files from_pretrained reads: the shards an index names, or the single file."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():
            try:
                names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                raise ConfigError(f"{key}: '{folder / index}' is damaged ({reason(e)})") from None
            for name in names:
                if not (folder / name).is_file():
                    raise ConfigError(f"{key}: '{folder / index}' names the shard '{name}', which '{folder}' lacks")
            return [folder / name for name in names]
        if (folder / single).is_file():
            return [folder / single]
    return []


def file_shapes(folder: Path, key: str) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Every tensor of the folder's weight files: its shape and its file, without reading weights
    (safetensors: the header; pytorch_model*.bin: a memory map)."""
    out: dict[str, tuple[tuple[int, ...], Path]] = {}
    for f in weight_files(folder, key):
        if f.suffix == ".safetensors":
            shapes = safetensors_shapes(f, key)
        else:
            try:
                state = torch.load(f, map_location="meta", mmap=True, weights_only=True)
            except Exception as e:
                raise ConfigError(f"{key}: '{f}' cannot be read ({type(e).__name__})") from None
            shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        out.update((name, (shape, f)) for name, shape in shapes.items())
    return out


def _pattern(name: str) -> str:
    """A tensor's name with its indices (layers, experts) made wildcards."""
    return re.sub(r"(?<=\.)\d+(?=\.)", "#", name)


def _config_sizes(config: Any, dims: Iterable[int]) -> str:
    """The config.json keys whose integer value is one of ``dims`` (what probably made the shape)."""
    values = {k: v for k, v in config.to_dict().items() if isinstance(v, int) and not isinstance(v, bool)}
    text = getattr(config, "text_config", None)
    if text is not None and not isinstance(text, dict):
        values.update((k, v) for k, v in text.to_dict().items() if isinstance(v, int) and not isinstance(v, bool))
    hits = [f"{k}={v}" for k, v in values.items() if v in set(dims) and not k.endswith("_id")]
    return f" ({', '.join(hits[:3])})" if hits else ""


def check_shapes(folder: str | Path, config: Any, key: str) -> None:
    """The shapes of the folder's weights are those ``config`` (its config.json) gives, read from the
    files' headers and compared with the model built on the meta device (no memory, no weights).
    A tensor of another shape, a tensor the config needs that no file holds (a tied output head
    absent from the file is the embedding's), or an extra index of a layer or expert the config has
    no place for, is a ConfigError naming the tensor. Quantized folders, and names the model does
    not use (transformers renames or merges some on load), are not compared."""
    folder = Path(folder)
    if getattr(config, "quantization_config", None):
        return
    have = file_shapes(folder, key)
    if not have:
        return
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise ConfigError(f"{key}: cannot build the model '{folder}/config.json' describes: {reason(e)}") from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and not any(n.startswith(f"{prefix}.") for n in have) and any(n.startswith(f"{prefix}.") for n in want):
        have = {(n if n in want else f"{prefix}.{n}"): v for n, v in have.items()}  # saved from the base model
    cfg_file = folder / "config.json"
    for name in want:  # in the model's order: the first layer's tensors first
        shape, f = have.get(name, (want[name], None))
        if want[name] != shape:
            raise ConfigError(
                f"{key}: tensor '{name}' of '{f}' has shape {list(shape)}, but '{cfg_file}' makes it "
                f"{list(want[name])}{_config_sizes(config, [w for w, h in zip(want[name], shape) if w != h])}: the config does not "
                f"belong to these weights")
    patterns = {_pattern(n) for n in want}
    for name in sorted(have):
        if name not in want and _pattern(name) in patterns:
            f = have[name][1]
            raise ConfigError(f"{key}: '{f}' holds tensor '{name}', for which '{cfg_file}' has no place (it "
                              f"makes fewer layers or experts): the config does not belong to these weights")
    aliases: dict[int, set[str]] = {}  # tied parameters: one object under several names
    params = list(model.named_parameters(remove_duplicate=False))
    for n, t in params:
        aliases.setdefault(id(t), set()).add(n)
    optional = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    all_known = all(n in want for n in have)
    have_patterns = {_pattern(n) for n in have}
    for name, t in params:  # (buffers may be left out of a file: the model makes them)
        if any(a in have for a in aliases[id(t)]) or any(p.search(name) for p in optional):
            continue
        if all_known or _pattern(name) in have_patterns:
            raise ConfigError(f"{key}: '{cfg_file}' needs tensor '{name}', which no weight file of '{folder}' "
                              f"holds: the config does not belong to these weights")


def scan_weights(folder: str | Path, key: str) -> None:
    """ConfigError when a weight file of the folder holds a NaN or inf, read one tensor at a time
    (safetensors; pytorch_model*.bin through a memory map), without building the model (--check)."""

    folder = Path(folder)
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            bad = first_nonfinite((name, fh.get_tensor(name)) for name in fh.keys())
        if bad:
            raise ConfigError(f"{key}: '{f}' holds non-finite weights: {bad}")
    for f in sorted(folder.glob("pytorch_model*.bin")):
        try:
            state = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise ConfigError(f"{key}: '{f}' cannot be read ({type(e).__name__})") from None
        bad = first_nonfinite(state.items())
        if bad:
            raise ConfigError(f"{key}: '{f}' holds non-finite weights: {bad}")


def load_weights(path: str | Path, key: str, dtype: torch.dtype) -> nn.Module:
    """AutoModelForCausalLM.from_pretrained on a local folder; any failure, weights whose shapes are not
    those of the folder's config.json (check_shapes, before loading), and weights that hold a NaN or
    inf, is one ConfigError line."""

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception:  # noqa: BLE001 - from_pretrained says why, below
        config = None
    if config is not None:  # a tensor of another shape is named here, not in transformers' load report
        check_shapes(path, config, key)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except Exception as e:
        raise ConfigError(f"{key}: cannot load weights from '{path}': {reason(e)}") from None
    bad = first_nonfinite(model.state_dict().items())
    if bad:
        raise ConfigError(f"{key}: '{path}' holds non-finite weights: {bad}")
    return model


def unknown_tokens(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> tuple[int, int, list[str]] | None:
    """(unknown tokens, all tokens, the characters that became unknown, most frequent first) of
    ``texts`` under ``tokenizer``; None for a tokenizer that cannot produce an unknown token (none
    declared, as in byte-level BPE; or one that is also its eos, bos or pad token, as GPT-2's)."""
    unk = tokenizer.unk_token_id
    if unk is None or unk in {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id}:
        return None
    texts = [t for t in texts if t]
    counts: dict[str, int] = {}
    n_unk = total = 0
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: each unknown token's characters from its offsets
        for text, enc in zip(texts, backend.encode_batch(texts, add_special_tokens=False)):
            total += len(enc.ids)
            for tid, (a, b) in zip(enc.ids, enc.offsets):
                if tid == unk:
                    n_unk += 1
                    counts[text[a:b]] = counts.get(text[a:b], 0) + 1
    else:  # a slow one: each character that is unknown on its own
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            total += len(ids)
            n_unk += sum(1 for i in ids if i == unk)
        if n_unk:
            chars: dict[str, int] = {}
            for text in texts:
                for c in text:
                    chars[c] = chars.get(c, 0) + 1
            counts = {c: n for c, n in chars.items()
                      if unk in tokenizer(c, add_special_tokens=False)["input_ids"]}
    return n_unk, total, sorted(counts, key=lambda c: (-counts[c], c))


def tiny_config(node: Mapping[str, Any], vocab_size: int, tokenizer: PreTrainedTokenizerBase) -> Any:
    arch = node["arch"]
    if arch not in ARCHS:
        raise ConfigError(f"arch: unknown architecture '{arch}'; choices: {', '.join(ARCHS)}")
    heads = node["heads"]
    if node["hidden_size"] % heads:
        raise ConfigError(f"hidden_size: {node['hidden_size']} is not divisible by heads={heads}")
    return ARCHS[arch](
        vocab_size=vocab_size,
        hidden_size=node["hidden_size"],
        intermediate_size=node["intermediate_size"],
        num_hidden_layers=node["layers"],
        num_attention_heads=heads,
        num_key_value_heads=node["kv_heads"] or heads,
        max_position_embeddings=node["max_positions"],
        tie_word_embeddings=node["tie_embeddings"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        use_cache=True,
    )


class ModelSpec:
    """A model node of the config resolved without loading weights: its tokenizer, its number of
    output rows, and how to materialise it. A teacher node with ``server.url`` is a served teacher
    (opdlm.served): its tokenizer comes from ``tokenizer_path``, the server is probed here, and
    ``build`` gives a client instead of weights."""

    def __init__(self, node: Mapping[str, Any], key: str, task_texts: Iterable[str] | None,
                 shared_tokenizer: PreTrainedTokenizerBase | None = None,
                 train_texts: list[str] | None = None) -> None:
        self.node = dict(node)
        self.key = key
        self.path = node["path"]
        self.served = node["server"]["url"] if "server" in node else None
        self.max_len: int | None = None  # a served teacher's max_model_len (when its server says)
        if self.served:
            self._served(node, key)
        elif self.path:
            self.hf_config = check_model_folder(self.path, f"{key}.path")
            tok_path = node["tokenizer_path"] or self.path
            self.tokenizer = load_tokenizer(tok_path, f"{key}.tokenizer_path" if node["tokenizer_path"] else f"{key}.path")
            rows = getattr(self.hf_config, "vocab_size", None) or getattr(getattr(self.hf_config, "text_config", None), "vocab_size", None)
            if rows is None:
                raise ConfigError(f"{key}.path: cannot find vocab_size in '{self.path}/config.json'")
            self.vocab_rows = int(rows)
        else:
            if node["tokenizer_path"]:
                self.tokenizer = load_tokenizer(node["tokenizer_path"], f"{key}.tokenizer_path")
            elif shared_tokenizer is not None:
                self.tokenizer = shared_tokenizer
            else:
                if task_texts is None:
                    raise ConfigError(f"{key}: a tiny model needs a tokenizer_path or a task to build one from")
                self.tokenizer = tiny_tokenizer(node, list(task_texts), key, train_texts)
            self.vocab_rows = node["tiny_rows"] or len(self.tokenizer)
            try:
                self.hf_config = tiny_config(node, self.vocab_rows, self.tokenizer)
            except ConfigError as e:
                raise ConfigError(f"{key}.{e}") from None
        if node.get("chat_template"):
            note = adopt_turn_end(self.tokenizer, f"{key}.chat_template")
            if note and dist.is_main():
                print(f"[opdlm] {note}", file=sys.stderr)
        ids = len(self.tokenizer)
        if self.vocab_rows < ids:  # allowed only for control tokens the model never predicts
            specials = set(self.tokenizer.all_special_ids)
            added = self.tokenizer.added_tokens_decoder
            text_ids = [i for i in range(self.vocab_rows, ids)
                        if i not in specials and not (i in added and added[i].special)]
            if text_ids:
                raise ConfigError(
                    f"{key}: the model has {self.vocab_rows} output rows but its tokenizer has {ids} ids "
                    f"(id {text_ids[0]} {self.tokenizer.convert_ids_to_tokens(text_ids[0])!r} is a text token)"
                )

    def _served(self, node: Mapping[str, Any], key: str) -> None:
        if self.path:  # (the url's scheme is checked at compose: config.PREFIXES)
            raise ConfigError(f"{key}.server.url: a served teacher is not loaded, but {key}.path is set ({self.path!r}); "
                              f"set one of them")
        if not node["tokenizer_path"]:
            raise ConfigError(f"{key}.tokenizer_path: a served teacher needs its tokenizer's folder (the teacher "
                              f"reads the rollouts in its own tokens)")
        self.tokenizer = load_tokenizer(node["tokenizer_path"], f"{key}.tokenizer_path")
        self.vocab_rows = len(self.tokenizer)
        self.hf_config = None
        self.server = TeacherServer(node["server"], f"{key}.server")
        self.max_len = self.server.probe(self.tokenizer)

    @property
    def positions(self) -> int | None:
        """The most tokens a sequence may have: a tiny model's max_positions, a folder's
        max_position_embeddings, a served teacher's max_model_len (None: not known)."""
        if self.served:
            return self.max_len
        if not self.path:
            return int(self.node["max_positions"])
        n = getattr(self.hf_config, "max_position_embeddings", None)
        return int(n) if n else None

    @property
    def n_ids(self) -> int:
        """Logit rows that are tokenizer ids (rows past the tokenizer are padding and never used)."""
        return min(self.vocab_rows, len(self.tokenizer))

    def build(self, seed: int) -> nn.Module:
        """Load the weights (from the folder), initialise a tiny model with ``seed``, or (a served
        teacher) its client."""
        if self.served:
            return ServedTeacher(self.server)
        if self.path:
            model = load_weights(self.path, f"{self.key}.path", getattr(torch, self.node["dtype"]))
        else:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(self.hf_config)
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        model.generation_config.eos_token_id = stop_setting(self.tokenizer)
        return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_hf(model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: str | Path,
            info: Mapping[str, Any] | None = None) -> Path:
    """Save as a Hugging Face folder that AutoModelForCausalLM.from_pretrained loads. A full disk
    is an OSError (ENOSPC) naming the folder, the space the weights need and the space left (the
    safetensors writer reports it as a SafetensorError of its own)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    except (SafetensorError, OSError) as e:
        if isinstance(e, OSError) and e.errno != errno.ENOSPC:
            raise
        text = str(e)
        if isinstance(e, SafetensorError) and "os error 28" not in text and "No space left" not in text:
            raise OSError(errno.EIO, f"the weights could not be written ({text.splitlines()[0]})", str(folder)) from None
        need = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
        free = shutil.disk_usage(folder).free / 2**20
        raise OSError(errno.ENOSPC, f"No space left on device: the model needs about {need:,.1f} MB and "
                                    f"{free:,.1f} MB are free; make room (or set run.out_dir elsewhere) and run the "
                                    f"same command again", str(folder)) from None
    if info:
        (folder / "opdlm.json").write_text(json.dumps(dict(info), indent=2, sort_keys=True))
    return folder


def stop_setting(tokenizer: PreTrainedTokenizerBase) -> int | list[int]:
    """end_ids as a generation config's eos_token_id: one id, or the list when there are several."""
    ids = end_ids(tokenizer)
    return ids[0] if len(ids) == 1 else ids


def adopt_turn_end(tokenizer: PreTrainedTokenizerBase, key: str) -> str | None:
    """Make the tokenizer's eos_token the token that ends an assistant turn in its chat template.

    A base model's tokenizer often ends texts with one token (Qwen's ``<|endoftext|>``, 151643) while
    the chat template, shared with the instruct model, ends turns with another (``<|im_end|>``,
    151645). Responses rendered with the template must be trained to end, and stop, at the turn's
    end; a model that still writes its old eos must stop there too. So when the template's turn ends
    with a single special token other than eos, that token becomes eos_token and the old eos id is
    kept as a second stop id (end_ids). Returns a one-line note of the change, or None when the
    template already ends turns with eos or there is no template. ConfigError when the turn's end is
    not one special token of the vocabulary (responses could not stop there)."""
    if not getattr(tokenizer, "chat_template", None):
        return None  # (said where a prompt is rendered: render_prompt)
    eos_text = tokenizer.eos_token
    a, b = "\u2401A\u2401", "\u2401B\u2401"
    try:
        full = tokenizer.apply_chat_template([{"role": "user", "content": a}, {"role": "assistant", "content": b}],
                                             tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template that cannot render a conversation
        raise ConfigError(f"{key}: the tokenizer's chat template cannot render a user and an assistant turn "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    end = full.find(b)
    after = full[end + len(b):] if end >= 0 else ""
    if eos_text is not None and after.startswith(eos_text):
        return None
    turn_end = _special_prefix(tokenizer, after)
    if turn_end is None:
        shown = after[:24] if end >= 0 else "(the reply is not rendered)"
        raise ConfigError(f"{key}: the tokenizer's chat template ends an assistant turn with {shown!r}, which does not "
                          f"start with its eos_token {eos_text!r} nor with another special token: responses could not "
                          f"stop at the end of a turn; use a template whose assistant turns end with a special token")
    text, tid = turn_end
    former = tokenizer.eos_token_id
    tokenizer.eos_token = text
    setattr(tokenizer, FORMER_EOS, former)
    was = f"{eos_text!r} (id {former})" if former is not None else "no eos_token"
    return (f"{key}: the chat template ends assistant turns with {text!r} (id {tid}), and the tokenizer's eos_token "
            f"is {was}: responses end with {text!r}; generation stops at either")


def _special_prefix(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[str, int] | None:
    """(token text, id) of the longest special token of the vocabulary that ``text`` starts with."""
    best = None
    for tid, tok in tokenizer.added_tokens_decoder.items():
        t = tok.content
        if tok.special and t and text.startswith(t) and (best is None or len(t) > len(best[0])):
            best = (t, int(tid))
    return best


def render_prompt(tokenizer: PreTrainedTokenizerBase, text: str, chat_template: bool) -> list[int]:
    """Token ids of a prompt: the tokenizer's chat template (a user turn plus the generation prompt)
    when asked for and present, else the raw text without BOS."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("chat_template: true, but the tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_or_build(spec: Any, init: str | None, seed: int) -> nn.Module:
    """The model of a stage: loaded from the previous stage's folder, or built from its node."""
    if init:
        key = f"{spec.key}.path" if spec.path and str(init) == str(spec.path) else f"stage folder {init}"
        model = load_weights(init, key, getattr(torch, spec.node["dtype"]))
        model.generation_config.pad_token_id = spec.tokenizer.pad_token_id
        model.generation_config.eos_token_id = stop_setting(spec.tokenizer)
    else:
        model = spec.build(seed)
    if spec.node["gradient_checkpointing"]:  # recompute each layer's activations in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
