"""Teacher top-K mapped into the student's vocabulary (cross-tokenizer support, variant B,
docs/cross-tokenizer.md): at each same-token position the teacher's K most likely ids are
mapped to student ids with the exact byte-string map (ids without a safe student twin, digits
included, are dropped and their mass falls into the tail class of a tail-aware loss), and the
sampled token is added. Other
positions get an empty support. Duplicates (two teacher ids with one student twin) count once.
Never renormalise over the mapped ids alone and never match sorted probabilities (ULD): use
``tail_aware`` on this support. Options: k (>= 1), plus_sampled (bool), map_unsafe (bool, default
false: also map onto digits and added tokens, an ablation of the safe rule).
Output ids [B, T, K(+1)] (student ids) with teacher_ids [B, T, K(+1)]; works with one tokenizer too.
"""

from __future__ import annotations

import numpy as np
import torch

from opdlm.plugin_api import Context, SupportSelector, check_support_size
from opdlm.registry import SUPPORTS
from opdlm.types import Rollout, Scores, Support, TeacherView
from opdlm.xtok.tables import tables_for


@SUPPORTS.register("mapped_topk")
class MappedTopK(SupportSelector):
    """Teacher top-K ids mapped to student ids by their bytes, plus the sampled token."""

    cross_vocabulary = True

    def __init__(self, *, k: int = 32, plus_sampled: bool = True, map_unsafe: bool = False) -> None:
        check_support_size("k", k)
        self.k = k
        self.plus_sampled = plus_sampled
        self.map_unsafe = map_unsafe
        self.teacher_k = k
        self.t2s: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.k + int(self.plus_sampled)

    def bind(self, ctx: Context) -> None:
        check_support_size("k", self.k, ctx.teacher_tokenizer, "teacher")
        tables = tables_for(ctx)
        # a teacher id maps only onto a safe student id: digits and added tokens mean different
        # things in different vocabularies (Qwen "1" starts a number, Llama "1" is a whole one), so
        # their mass goes to the tail class instead
        safe = (tables.safe[np.clip(tables.t2s, 0, None)] | self.map_unsafe) & (tables.t2s >= 0)
        self.t2s = torch.from_numpy(np.where(safe, tables.t2s, -1))

    def select(self, teacher: Scores, student: Scores | None, rollout: Rollout,
               view: TeacherView | None = None) -> Support:
        if self.t2s is None:
            raise RuntimeError("mapped_topk used before bind()")
        assert teacher.topk_ids is not None and teacher.topk_ids.shape[-1] >= self.k
        t_ids = teacher.topk_ids[..., : self.k]
        s_ids = self.t2s.to(t_ids.device)[t_ids]
        at = rollout.response_mask if view is None else view.positions("token")
        valid = (s_ids >= 0) & at.unsqueeze(-1)
        earlier = (s_ids.unsqueeze(-1) == s_ids.unsqueeze(-2)) & valid.unsqueeze(-2)  # [.., i, j]: j has i's id
        valid &= ~torch.tril(earlier, diagonal=-1).any(-1)
        if self.plus_sampled:
            tgt = rollout.targets
            t_tgt = tgt if view is None or view.chunk is None else view.targets
            present = ((s_ids == tgt.unsqueeze(-1)) & valid).any(-1)
            s_ids = torch.cat([s_ids, tgt.unsqueeze(-1)], -1)
            t_ids = torch.cat([t_ids, t_tgt.clamp_min(0).unsqueeze(-1)], -1)
            valid = torch.cat([valid, (at & ~present & (t_tgt >= 0)).unsqueeze(-1)], -1)
        return Support(ids=s_ids.clamp_min(0), valid=valid, teacher_ids=t_ids)
