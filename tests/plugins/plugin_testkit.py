"""Shared helpers for the plugin tests: tiny rollouts, teacher views, loss inputs, a char tokenizer.

Not a conftest.py on purpose: tests/test_*.py do ``from conftest import ...`` (tests/conftest.py),
and a second conftest.py in a sub-folder would take over the module name ``conftest``.
tests/conftest.py puts this folder on sys.path, so test files ``import plugin_testkit``."""

from __future__ import annotations

import functools

import torch

from opdlm.discovery import discover
from opdlm.plugin_api import Context
from opdlm.types import Example, LossInputs, Rollout, Scores, Support, TeacherView

discover()


def build_rollout(targets: torch.Tensor, response_mask: torch.Tensor | None = None,
                  prompt_len: int = 2) -> Rollout:
    """A Rollout whose response tokens are ``targets`` [B, T] after ``prompt_len`` prompt columns."""
    B, T = targets.shape
    if response_mask is None:
        response_mask = torch.ones(B, T, dtype=torch.bool)
    prompt = torch.full((B, prompt_len), 7, dtype=torch.long)
    input_ids = torch.cat([prompt, targets.long()], dim=1)
    attn = torch.cat([torch.ones(B, prompt_len, dtype=torch.long), response_mask.long()], dim=1)
    return Rollout(
        input_ids=input_ids,
        attention_mask=attn,
        position_ids=torch.arange(prompt_len + T).expand(B, -1),
        prompt_len=prompt_len,
        response_mask=response_mask.bool(),
        behaviour_logprobs=torch.zeros(B, T),
        truncated=torch.zeros(B, dtype=torch.bool),
        examples=[Example(prompt="p", answer="a") for _ in range(B)],
        texts=["" for _ in range(B)],
    )


def build_view(rollout: Rollout, aligned: torch.Tensor | None = None) -> TeacherView:
    B, L = rollout.input_ids.shape
    T = L - rollout.prompt_len
    if aligned is None:
        aligned = torch.ones(B, T, dtype=torch.bool)
    return TeacherView(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=rollout.position_ids,
        pred_columns=(torch.arange(T) + rollout.prompt_len - 1).expand(B, T),
        targets=rollout.targets,
        aligned=aligned.bool(),
    )


def build_loss_inputs(*, student: Scores, teacher: Scores, support: Support | None = None,
                      old_logprob: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                      targets: torch.Tensor | None = None) -> LossInputs:
    B, T = student.token_logprob.shape
    if support is None:
        K = student.support_logits.shape[-1] if student.support_logits is not None else 1
        ids = torch.arange(K).expand(B, T, K)
        support = Support(ids=ids, valid=torch.ones(B, T, K, dtype=torch.bool))
    if old_logprob is None:
        old_logprob = student.token_logprob.detach().clone()
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool)
    if targets is None:
        targets = torch.zeros(B, T, dtype=torch.long)
    return LossInputs(student=student, teacher=teacher, support=support, old_logprob=old_logprob,
                      mask=mask, rollout=build_rollout(targets))


@functools.lru_cache(maxsize=1)
def char_tok():
    """A char tokenizer over digits, '+-=;{}\\boxed', and <think>, </think>,
    <|im_end|> (plus <pad>, <unk>) as single tokens."""
    from opdlm.models import char_tokenizer

    return char_tokenizer(["0123456789+-=;{}\\boxed"])


def make_ctx(tok=None) -> Context:
    tok = tok if tok is not None else char_tok()
    return Context(student_tokenizer=tok, teacher_tokenizer=tok,
                   student_vocab_rows=len(tok), teacher_vocab_rows=len(tok))
