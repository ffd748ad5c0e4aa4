"""Prompts and reference answers from a local JSONL file, scored by a math answer verifier.

Each line is a JSON object; ``prompt_field`` and ``answer_field`` name its prompt and reference
answer, ``solution_field`` (optional) a reference completion used by the SFT stage. The prompt and
the solution must be strings, the answer a string or an integer (kept as written, however many
digits); anything else (null, a list, 0.5, NaN, 1e400) is one line naming the file, the line, the
field and the value.

Splits come from ``split_field`` (values train/val/test) or, when it is null, from a seeded shuffle
of the file's distinct prompts: ``val_fraction`` and ``test_fraction`` are shares of the distinct
prompts (rounded), and every line of a prompt goes to the split of its prompt, so a prompt written
on several lines never reaches both train and test. A run prints the counts ("[opdlm] task jsonl:
300 lines, 100 distinct prompts: 80 train / 10 val / 10 test prompts"), and how many val or test
prompts ``split_field`` or a benchmark file also puts into train.

Verifier (``verifier``): ``boxed`` takes the last \\boxed{...} of a response and compares it with
the reference after light LaTeX normalisation, numerically when both parse; ``math_verify`` uses
the math-verify package (pip install "opdlm[math]"): LaTeX and numeric equivalence such as
\\frac{1}{2} = 0.5 or \\sqrt{4} = 2. A response whose answer cannot be read counts as wrong and as
``unparsed`` in the evaluation, never as an error.

``template`` renders each prompt: a string holding ``{prompt}``, or the preset ``math`` (reason
step by step inside <think></think>, final answer in \\boxed{}; the official code's exact wording
was not available, so this is ours). ``benchmarks`` ({name: path}) makes the test split out of
several files, each reported on its own and averaged (then the main file gives train and val only:
set test_fraction: 0).
"""

from __future__ import annotations

import json
import random
import re
import threading
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any

from opdlm.errors import ConfigError
from opdlm.plugin_api import Task
from opdlm.registry import TASKS
from opdlm.schema import Range
from opdlm.types import Example


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...}, with nested braces."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def normalise(ans: str) -> str:
    s = ans.strip().strip("$").strip()
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\ ", ""),
                 ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^{\\circ}", ""), ("^\\circ", ""),
                 ("\\%", ""), ("%", ""), ("\\text{", "{"), ("\\mathrm{", "{")):
        s = s.replace(a, b)
    s = re.sub(r"\s+", "", s).rstrip(".").replace("{,}", ",")
    s = re.sub(r"^\{(.*)\}$", r"\1", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    return s[1:] if s.startswith("+") else s


def as_number(s: str) -> Fraction | None:
    sign = -1 if s.startswith("-") and s[1:2] == "\\" else 1  # -\frac{1}{2}
    body = s[1:] if sign < 0 else s
    m = re.fullmatch(r"\\frac\{(-?\d+)\}\{(-?\d+)\}", body) or re.fullmatch(r"(-?\d+)/(-?\d+)", body)
    try:
        if m:
            return sign * Fraction(int(m.group(1)), int(m.group(2)))
        if re.fullmatch(r"-?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?", s):
            return Fraction(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    return None


def math_equal(pred: str, ref: str) -> bool:
    a, b = normalise(pred), normalise(ref)
    if a == b:
        return True
    na, nb = as_number(a), as_number(b)
    return na is not None and nb is not None and na == nb


#: named prompt templates
TEMPLATES = {
    "math": "{prompt}\n\nPlease reason step by step inside <think></think>, and put your final answer "
            "within \\boxed{}.",
}
VERIFIERS = ("boxed", "math_verify")
SplitShare = Annotated[float, Range(ge=0, lt=1)]  # the share of the distinct prompts a split takes
SPLITS = ("train", "val", "test")
#: what each role's field must hold
NEEDS = {"prompt": "a string", "answer": "a string or an integer", "solution": "a string"}


class _Number:
    """A JSON number as the file writes it: read with json.loads' parse_int, parse_float and
    parse_constant, so that no number is converted (Python's int() refuses more than 4,300 digits,
    float() makes 1e400 inf)."""

    __slots__ = ("integer", "text")

    def __init__(self, text: str, integer: bool) -> None:
        self.text, self.integer = text, integer


def _load(line: str) -> Any:
    return json.loads(line, parse_int=lambda t: _Number(t, True), parse_float=lambda t: _Number(t, False),
                      parse_constant=lambda t: _Number(t, False))


def _json(value: Any) -> str:
    if isinstance(value, _Number):
        return value.text
    if isinstance(value, list):
        return "[" + ", ".join(_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_json(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def show(value: Any, limit: int = 60) -> str:
    """A field's value as JSON writes it, on one line, cut short when long."""
    text = _json(value)
    return text if len(text) <= limit else f"{text[:40]}… ({len(text):,} characters)"


def _math_verify():  # noqa: ANN202 - the module
    try:
        import math_verify
    except ImportError:
        raise ConfigError('verifier: math_verify needs the math-verify package: pip install "opdlm[math]"') from None
    return math_verify


def _timeout() -> int | None:
    """math-verify's timeouts use signal.alarm, which works in the main thread only."""
    return 5 if threading.current_thread() is threading.main_thread() else None


@TASKS.register("jsonl")
class JsonlTask(Task):
    """Prompts and answers from a local JSONL file, with a math \\boxed{} answer verifier."""

    def __init__(self, *, path: str = "", prompt_field: str = "prompt", answer_field: str = "answer",
                 solution_field: str | None = None, split_field: str | None = None,
                 val_fraction: SplitShare = 0.1, test_fraction: SplitShare = 0.1, seed: int = 0,
                 verifier: str = "boxed", template: str = "{prompt}", benchmarks: dict[str, str] | None = None) -> None:
        if verifier not in VERIFIERS:
            raise ConfigError(f"verifier: must be one of {', '.join(VERIFIERS)}, got {verifier!r}")
        self.verifier = verifier
        self.mv = _math_verify() if verifier == "math_verify" else None
        self.template = TEMPLATES.get(template, template)
        if "{prompt}" not in self.template:
            raise ConfigError(f"template: must contain {{prompt}} or name a preset ({', '.join(TEMPLATES)}), "
                              f"got {template!r}")
        self.benchmarks = dict(benchmarks or {})
        if self.benchmarks and test_fraction and not split_field:
            raise ConfigError("test_fraction: with benchmarks the test split comes from the benchmark files; "
                              "set test_fraction: 0")
        self._gold: dict[str, Any] = {}
        self._parsed: dict[str, list[Any]] = {}
        if not path:
            raise ConfigError("path: the jsonl task needs the path of a local .jsonl file")
        if val_fraction + test_fraction >= 1.0:
            raise ConfigError(f"val_fraction: val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
        self.path = Path(path)
        self.fields = (prompt_field, answer_field, solution_field)
        self.split_field = split_field
        self.splits = self._read(val_fraction, test_fraction, seed)
        if self.benchmarks:
            self.splits["test"] = [
                Example(prompt=ex.prompt, answer=ex.answer, solution=ex.solution, meta={**ex.meta, "benchmark": name})
                for name, bench in sorted(self.benchmarks.items())
                for ex in self._rows(Path(bench), f"benchmarks.{name}")]

    def _read(self, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[Example]]:
        rows = [(ex.meta.pop("split", None), ex) for ex in self._rows(self.path, "path")]
        return self._split(rows, val_fraction, test_fraction, seed)

    def _rows(self, path: Path, key: str) -> list[Example]:
        """The examples of one JSONL file (meta: line, and split when split_field is set); a bad line
        is a ConfigError naming ``key``, the file and the line."""
        if not path.is_file():
            raise ConfigError(f"{key}: no such file '{path}'")
        prompt_f, answer_f, solution_f = self.fields
        rows: list[Example] = []
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ConfigError(f"{key}: {where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    obj = _load(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{key}: {where}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise ConfigError(f"{key}: {where}: expected a JSON object, got {type(obj).__name__}")
                for f in (prompt_f, answer_f) + ((solution_f,) if solution_f else ()):
                    if f not in obj:
                        raise ConfigError(f"{key}: {where}: missing field '{f}' (fields: {', '.join(obj)})")
                meta: dict[str, Any] = {"line": lineno}
                if self.split_field and key == "path":
                    meta["split"] = obj.get(self.split_field)
                    if meta["split"] not in SPLITS:
                        got = repr(meta["split"]) if isinstance(meta["split"], str) else show(meta["split"])
                        raise ConfigError(f"{key}: {where}: field '{self.split_field}' must be train, val or test, "
                                          f"got {got}")
                at = f"{key}: {where}"
                prompt, answer = self._text(obj, prompt_f, "prompt", at), self._text(obj, answer_f, "answer", at)
                solution = self._text(obj, solution_f, "solution", at) if solution_f else None
                rows.append(Example(prompt=self.template.replace("{prompt}", prompt), answer=answer, solution=solution,
                                    meta=meta))
        if not rows:
            raise ConfigError(f"{key}: '{path}' holds no examples")
        return rows

    @staticmethod
    def _text(obj: dict[str, Any], field: str, role: str, where: str) -> str:
        """The text of a line's ``field`` in ``role`` (prompt, answer, solution), or a ConfigError
        naming the line, the field and the value when it is not the type the role needs."""
        value = obj[field]
        if isinstance(value, str):
            return value
        if role == "answer" and isinstance(value, _Number) and value.integer:
            return value.text
        name = f'"{field}"' + ("" if field == role else f" ({role}_field)")
        hint = ""
        if role == "answer" and isinstance(value, _Number) and value.text[-1].isdigit():
            hint = f' (write a decimal answer as a string: "{show(value)}")'
        raise ConfigError(f"{where}: {name} must be {NEEDS[role]}, got {show(value)}{hint}")

    def _split(self, rows: list[tuple[str | None, Example]], val_fraction: float, test_fraction: float,
               seed: int) -> dict[str, list[Example]]:
        """The splits: by ``split_field``, or by a seeded shuffle of the distinct prompts (in order of
        first appearance), each prompt's lines all in its split."""
        out: dict[str, list[Example]] = {s: [] for s in SPLITS}
        groups: dict[str, list[Example]] = {}
        for _, ex in rows:
            groups.setdefault(ex.prompt, []).append(ex)
        if self.split_field:
            for split, ex in rows:
                out[split].append(ex)  # type: ignore[index]
        else:
            prompts = list(groups)
            order = list(range(len(prompts)))
            random.Random(seed).shuffle(order)
            n_test = int(round(test_fraction * len(prompts)))
            n_val = int(round(val_fraction * len(prompts)))
            for rank, i in enumerate(order):
                split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
                out[split].extend(groups[prompts[i]])
        if not out["train"]:
            how = (f"no line has {self.split_field}: train" if self.split_field
                   else f"all {len(groups)} distinct prompts went to val/test; lower the fractions or add prompts")
            raise ConfigError(f"path: '{self.path}' leaves the train split empty ({how})")
        self._counts = (len(rows), len(groups))
        return out

    def summary(self) -> str:
        """The file's lines and distinct prompts, and the distinct prompts of each split (with the
        benchmark files' test split, and any val or test prompt that is also in train)."""
        lines, distinct = self._counts
        sets = {s: {ex.prompt for ex in self.splits[s]} for s in SPLITS}
        own = ("train", "val") if self.benchmarks else SPLITS
        text = (f"{_count(lines, 'line')}, {_count(distinct, 'distinct prompt')}: "
                f"{' / '.join(f'{len(sets[s])} {s}' for s in own)} prompts")
        if self.benchmarks:
            text += (f"; test: {_count(len(self.splits['test']), 'line')}, {_count(len(sets['test']), 'distinct prompt')}"
                     f" from {_count(len(self.benchmarks), 'benchmark file')}")
        shared = [f"{len(sets[s] & sets['train'])} {s}" for s in ("val", "test") if sets[s] & sets["train"]]
        if shared:
            text += f"; prompts also in train: {', '.join(shared)}"
        return text

    def examples(self, split: str) -> list[Example]:
        if split not in self.splits:
            raise ValueError(f"unknown split '{split}'; choices: train, val, test")
        return self.splits[split]

    def verify(self, response: str, example: Example) -> bool:
        if self.mv is None:
            got = last_boxed(response)
            return got is not None and math_equal(got, example.answer)
        pred = self._parse(response)
        if not pred:
            return False
        if example.answer not in self._gold:
            self._gold[example.answer] = self.mv.parse("$" + example.answer + "$", parsing_timeout=_timeout())
        try:
            return bool(self.mv.verify(self._gold[example.answer], pred, timeout_seconds=_timeout()))
        except Exception:  # noqa: BLE001 - an answer the verifier cannot compare is wrong, never a crash
            return False

    def extract(self, response: str) -> str | None:
        if self.mv is None:
            got = last_boxed(response)
            return (normalise(got) or None) if got is not None else None
        pred = self._parse(response)
        return str(pred[0]) if pred else None

    def _parse(self, response: str) -> list[Any]:
        """math-verify's reading of a response, kept for the last responses: the evaluation both
        verifies a response and reads its answer, and the parse is the costly part."""
        if response not in self._parsed:
            if len(self._parsed) >= 1024:
                self._parsed.clear()
            self._parsed[response] = self.mv.parse(response, parsing_timeout=_timeout())
        return self._parsed[response]
