"""Data-parallel maths, proven on real processes: one OPD optimizer step on 2 CPU ranks (Lightning
DDP over gloo, float64) equals the same step on one process with the two ranks' rollouts
concatenated, for LSM (naive and lean head), sampled-token OPD with 2 mini-batches (the second
one off-policy against π_old) and 2 micro-batches, and chunk_pg across two tokenizers. The ranks'
responses have different lengths, so a per-rank token mean would give another update: the test
checks that too, so it can tell the two apart."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, demo_cfg

from opdlm.builder import build_run
from opdlm.data import global_batch
from opdlm.module import OPDModule
from opdlm.ops.batch import concat_rollouts

pytestmark = pytest.mark.slow  # subprocess runs: deselected by -m "not slow"

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from opd_step_worker import SFT, cases  # noqa: E402

REL_TOL = 1e-5


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOCAL_RANK", None)
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "dist" / "opd_step_worker.py"), str(out)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in ts])


def reference(name: str, ranks: list[dict]):
    """The same step on one process: the ranks' rollouts concatenated in rank order."""
    torch.set_default_dtype(torch.float64)
    try:
        cfg = demo_cfg(*TINY, *cases()[name], "trainer.accelerator=cpu")
        built = build_run(cfg)
        module = OPDModule(cfg, built=built, student=built.student.build(0).double(), teacher=built.teacher.build(1).double())
        # tied embeddings (the tiny models' default, as SmolLM2's and Qwen's small models): the head's
        # gradient and the embedding's add up in one tensor, synced once across the ranks
        assert module.student.get_output_embeddings().weight is module.student.get_input_embeddings().weight
        rollout = concat_rollouts([r["rollout"] for r in ranks], built.student.tokenizer.pad_token_id)
        opt_cfg = module.configure_optimizers()
        opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
        grads = []
        opt.register_step_pre_hook(lambda *_: grads.append([p.grad.detach().clone() for p in module.student.parameters()]))
        view, teacher, support, mask = module.prepare(rollout)
        start = [p.detach().clone() for p in module.student.parameters()]
        module.update(rollout, view, teacher, support, mask, optimizer=opt, scheduler=sched)
        return module, built, rollout, grads, start
    finally:
        torch.set_default_dtype(torch.float32)


def per_rank_mean_grad(module: OPDModule, built, ranks: list[dict]) -> torch.Tensor:
    """The gradient a per-rank token mean would give (each rank normalised by its own tokens)."""
    torch.set_default_dtype(torch.float64)
    try:
        total = None
        for r in ranks:
            ro = r["rollout"]
            module.student.zero_grad(set_to_none=True)
            view, teacher, support, mask = module.prepare(ro)
            module.loss_backward(ro, support, teacher, None, mask, view, mask.sum().double())
            g = flat([p.grad for p in module.student.parameters()])
            total = g / len(ranks) if total is None else total + g / len(ranks)
        return total
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("name", list(cases()))
def test_two_ranks_equal_one_process_on_the_concatenated_rollouts(ddp_run, name):
    ranks = [torch.load(ddp_run / name / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # each rank drew its own slice of the global batch: no prompt twice, and the order is the
    # global batch's (prompts_per_step = 4 over 2 ranks, n = 2 rollouts each)
    cfg = demo_cfg(*TINY, *cases()[name])
    train = build_run(cfg).task.examples("train")
    want = [train[i].prompt for i in global_batch(len(train), 4, 0, 3)]
    got = [[e.prompt for e in r["rollout"].examples[::2]] for r in ranks]
    assert got[0] == want[:2] and got[1] == want[2:] and not set(got[0]) & set(got[1])
    module, built, rollout, grads, start = reference(name, ranks)
    # the ranks' losses count different numbers of tokens (else a per-rank mean could not be told apart)
    counts = [int(module.prepare(r["rollout"])[3].sum()) for r in ranks]
    assert counts[0] != counts[1], counts
    steps = len(grads)
    assert steps == (2 if "mini2" in name else 1) and len(ranks[0]["grads"]) == steps
    for i in range(steps):
        for r in ranks:  # every rank holds the synced gradient, equal to the one-process gradient
            assert rel(flat(r["grads"][i]), flat(grads[i])) <= REL_TOL, (i, rel(flat(r["grads"][i]), flat(grads[i])))
    after = flat(list(module.student.parameters())).detach()
    before = flat(start)
    for r in ranks:
        assert rel(flat(r["params"]) - before, after - before) <= REL_TOL
        assert rel(flat(r["params"]), after) <= REL_TOL
    if steps == 1:  # the per-rank mean gives a gradient this test would reject
        wrong = per_rank_mean_grad(module, built, ranks)
        assert rel(wrong, flat(grads[0])) > 100 * REL_TOL, rel(wrong, flat(grads[0]))


def test_sft_on_two_ranks_is_the_token_mean_over_both(ddp_run):
    """One SFT step on 2 ranks: the synced gradient is the cross-entropy's mean over the tokens of
    both ranks' batches (which hold different numbers of tokens), as on one process."""
    from torch.nn.functional import pad
    ranks = [torch.load(ddp_run / "sft" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    batches = [r["batch"] for r in ranks]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert counts[0] != counts[1], counts
    L = max(b["input_ids"].shape[1] for b in batches)
    cfg = demo_cfg(*TINY, *SFT, "trainer.accelerator=cpu")
    built = build_run(cfg)
    torch.set_default_dtype(torch.float64)
    try:
        model = built.student.build(0).double()
    finally:
        torch.set_default_dtype(torch.float32)
    pad_id = built.student.tokenizer.pad_token_id
    cat = {k: torch.cat([pad(b[k], (0, L - b[k].shape[1]), value=v) for b in batches])
           for k, v in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100))}
    model(**cat, use_cache=False).loss.backward()
    want = flat([p.grad for p in model.parameters()])
    for r in ranks:
        assert r["world"] == 2 and len(r["grads"]) == 1
        assert rel(flat(r["grads"][0]), want) <= REL_TOL
    # the mean of the two ranks' own means is another gradient
    per_rank = []
    for b in batches:
        model.zero_grad()
        model(**b, use_cache=False).loss.backward()
        per_rank.append(flat([p.grad for p in model.parameters()]))
    assert rel((per_rank[0] + per_rank[1]) / 2, want) > 100 * REL_TOL


def test_a_rank_without_counted_tokens_logs_what_the_other_ranks_have(ddp_run):
    """Rank 1 counts no token (a test masker), so its step log has no token means. The ranks agree
    on the keys before reducing: the run ends, both ranks log the same keys and values, token means
    come from rank 0 alone, and ``tokens`` is the sum over ranks."""
    ranks = [torch.load(ddp_run / "empty_rank" / f"rank{r}.pt", weights_only=False)["logged"] for r in (0, 1)]
    assert ranks[0] == ranks[1]
    logged = ranks[0]
    assert "train/logprob_gap" in logged and "train/teacher_entropy" in logged  # rank 0's means
    assert logged["train/tokens"] > 0 and logged["train/loss"] == logged["train/loss"]  # a number, not NaN
