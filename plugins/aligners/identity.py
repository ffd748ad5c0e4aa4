"""The teacher reads the student's own tokens: same tokenizer, same ids, same positions.

Valid only when both models share a vocabulary; bind() rejects different tokenizers and tells the
user to choose a cross-tokenizer aligner. Output: a TeacherView whose columns are the rollout's.
"""

from __future__ import annotations

import torch

from opdlm.errors import ConfigError
from opdlm.plugin_api import Aligner, Context
from opdlm.registry import ALIGNERS
from opdlm.types import Rollout, TeacherView


def same_vocabulary(a, b) -> bool:  # noqa: ANN001 - two HF tokenizers
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


@ALIGNERS.register("identity")
class Identity(Aligner):
    """Same tokenizer on both sides: the teacher scores the student's token ids directly."""

    def __init__(self) -> None:
        pass

    def bind(self, ctx: Context) -> None:
        if not same_vocabulary(ctx.student_tokenizer, ctx.teacher_tokenizer):
            raise ConfigError(
                f"aligner: 'identity' needs one vocabulary, but the teacher's tokenizer has "
                f"{len(ctx.teacher_tokenizer)} ids and the student's {len(ctx.student_tokenizer)} "
                f"(or they map tokens to different ids); choose a cross-tokenizer aligner"
            )

    def align(self, rollout: Rollout, teacher_prompt_ids: list[list[int]] | None = None,
              teacher_turns: list[list[list[int]]] | None = None) -> TeacherView:
        B, L = rollout.input_ids.shape
        P = rollout.prompt_len
        T = L - P
        cols = (torch.arange(T, device=rollout.input_ids.device) + P - 1).expand(B, T)
        return TeacherView(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            position_ids=rollout.position_ids,
            pred_columns=cols,
            targets=rollout.targets,
            aligned=rollout.response_mask,
        )
