"""Chunk-level sampled-path OPD (cross-tokenizer variant A, docs/cross-tokenizer.md): a policy gradient whose
advantage is the teacher-student log-ratio of the whole chunk holding each student token.

For chunk c (a span of bytes both tokenizers cut at the same boundaries):
lp_S(c) = Σ_{t∈c} log π_old(y_t), lp_T(c) = Σ of the teacher's log-probs of its own tokens of c,
A_c = sg(lp_T(c) - lp_S(c)), credited to every student token of c through the PPO surrogate of
sampled_token (ratio π_θ/π_old per token, clip ε, dual clip c). Σ_c A_c = log p_T(y) - log p_S(y):
no part of the sequence is lost, whatever the segmentation. With one tokenizer every token is its
own chunk and this is exactly sampled_token. Options: clip_eps, dual_clip (as sampled_token).
Reads Scores.chunk_logprob (teacher) and token_logprob (student); output token_loss [B, T].
"""

from __future__ import annotations

import torch

from opdlm.ops.batch import per_chunk_sum
from opdlm.plugin_api import ClippedPG
from opdlm.reads import Reads
from opdlm.registry import LOSSES
from opdlm.types import LossInputs, LossOutput, masked_mean


def chunk_sums(values: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """[B, T]: Σ of ``values`` over the chunk of each position (0 where chunk < 0)."""
    sums = per_chunk_sum(values, chunk, values.shape[1] + 1)
    return torch.where(chunk >= 0, sums.gather(1, chunk.clamp_min(0)), torch.zeros_like(values))


@LOSSES.register("chunk_pg")
class ChunkPG(ClippedPG):
    """PPO-clipped policy gradient with the chunk log-ratio lp_T(c) - lp_S(c) as advantage."""

    reads = Reads(student=frozenset({"token_logprob"}), teacher=frozenset({"chunk_logprob"}), positions="chunk")


    def compute(self, inputs: LossInputs) -> LossOutput:
        assert inputs.teacher.chunk_logprob is not None, "the engine fills chunk_logprob for chunk_pg"
        old = inputs.old_logprob.detach()
        chunk = inputs.view.chunk_ids() if inputs.view is not None else torch.arange(
            old.shape[1], device=old.device).expand_as(old)
        adv = (inputs.teacher.chunk_logprob - chunk_sums(old, chunk)).detach()
        loss, clipped = self.clipped(inputs.student.token_logprob, old, adv)
        m = inputs.mask
        return LossOutput(token_loss=loss, stats={
            "clip_frac": masked_mean(clipped.float(), m).detach(),
            "advantage": masked_mean(adv, m),
        })
