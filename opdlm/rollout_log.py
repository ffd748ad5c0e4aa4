"""A few rollouts per validation step, saved token by token for the report's token view
(``stages.opd.log_rollouts``): each response token with the teacher's and the student's log-prob,
their gap, whether it counted in the loss, and the teacher's top-K there. One JSON object per
rollout in ``<run>/rollouts/opd/step_<n>.jsonl``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from opdlm.ops.batch import take
from opdlm.types import Rollout, Scores, TeacherView


def token_text(tokenizer: Any, i: int) -> str:
    """One id as the text it stands for (byte-level pieces decoded; '' for pad)."""
    return tokenizer.decode([int(i)], skip_special_tokens=False)


@torch.no_grad()
def rollout_records(step: int, rollout: Rollout, view: TeacherView, teacher: Scores, student_logprob: Tensor,
                    mask: Tensor, student_tok: Any, teacher_tok: Any, rows: int) -> list[dict[str, Any]]:
    """Records of the first ``rows`` rollouts. Teacher values exist at positions where the teacher
    reads the same token (view.positions('token')); elsewhere they are null."""
    same = view.positions("token")
    out = []
    for b in range(min(rows, rollout.input_ids.shape[0])):
        n = int(rollout.lengths[b])
        tokens, records = rollout.targets[b, :n].tolist(), []
        for t, tok in enumerate(tokens):
            ok = bool(same[b, t])
            tl = float(teacher.token_logprob[b, t]) if ok else None
            sl = float(student_logprob[b, t])
            top = []
            if ok and teacher.topk_ids is not None and teacher.topk_logits is not None:
                probs = (teacher.topk_logits[b, t] - teacher.lse[b, t]).exp()
                top = [[token_text(teacher_tok, i), round(float(p), 6)]
                       for i, p in zip(teacher.topk_ids[b, t].tolist(), probs.tolist())]
            records.append({"text": token_text(student_tok, tok), "teacher": tl, "student": sl,
                            "gap": None if tl is None else tl - sl, "counted": bool(mask[b, t]), "topk": top})
        out.append({"step": step, "prompt": rollout.examples[b].prompt, "answer": rollout.examples[b].answer,
                    "response": rollout.texts[b], "tokens": records})
    return out


def write_records(folder: Path, step: int, records: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(path)
    return path


def save_rollouts(folder: Path | None, step: int, n: int, rollout: Rollout, view: TeacherView, teacher: Scores,
                  mask: Tensor, student_logprob: Callable[[Rollout], Tensor], student_tok: Any, teacher_tok: Any) -> None:
    """The first ``n`` rollouts of a step, token by token, into ``folder`` (nothing when ``n`` is 0);
    ``student_logprob`` scores the student on them. ``folder`` None: the scoring alone (a rank that
    takes part in a sharded model's forward but does not write)."""
    if not n:
        return
    rows = torch.arange(min(n, rollout.input_ids.shape[0]))
    ro = take(rollout, rows)
    with torch.no_grad():
        lp = student_logprob(ro)
    if folder is not None:
        write_records(folder, step, rollout_records(step, ro, take(view, rows), take(teacher, rows), lp, take(mask, rows),
                                                    student_tok, teacher_tok, len(rows)))
