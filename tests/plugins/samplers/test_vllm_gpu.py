"""The vllm sampler on a CUDA GPU: what the CPU build cannot show. Run on a GPU machine with the
``vllm`` extra: ``python -m pytest -q -m gpu tests/plugins/samplers/test_vllm_gpu.py``. Skipped
elsewhere. Models are Qwen2-shaped with random weights (head size 64), built in the test.

- sleep mode: between rollouts the engine gives its GPU memory back (weights and KV cache), and wakes
  up with the model's current weights after optimizer steps;
- bf16: behaviour log-probs against the trainer's recomputed ones, within a stated tolerance;
- an OPD run end to end on the GPU with the engine asleep while the student trains.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import TINY, demo_cfg

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None),
    reason='needs a CUDA GPU and pip install "opdlm[vllm]"')]

HEAD64 = ["student.hidden_size=256", "student.heads=4", "student.layers=2", "student.intermediate_size=512",
          "teacher.hidden_size=256", "teacher.heads=4", "teacher.layers=2", "teacher.intermediate_size=512"]
#: bf16: |behaviour - trainer| log-prob over response tokens, mean and max (kernels differ in rounding)
BF16_MEAN, BF16_MAX = 2e-2, 0.5


@pytest.fixture(scope="module")
def world():
    from opdlm.builder import build_run
    from opdlm.models import load_or_build
    cfg = demo_cfg(*TINY, *HEAD64, "sampler.name=vllm", "trainer.accelerator=gpu")
    built = build_run(cfg)
    tok = built.student.tokenizer
    examples = built.task.examples("train")[:8]
    prompts = [(tok(e.prompt, add_special_tokens=False)["input_ids"] * 40)[:200] for e in examples]
    return {"built": built, "tok": tok, "examples": examples, "prompts": prompts,
            "model": lambda seed, dtype=torch.float32: load_or_build(built.student, None, seed).to("cuda", dtype)}


def recomputed(model, ro):
    from opdlm.bench.rollout import trainer_logprobs
    return trainer_logprobs(model, ro)


def test_sleep_frees_the_gpu_and_wakes_with_the_updated_weights(world):
    from opdlm.registry import SAMPLERS
    model = world["model"](0)
    s = SAMPLERS.build({"name": "vllm", "max_new_tokens": 16, "sleep": True, "memory_fraction": 0.3}, "sampler")
    top_p = SAMPLERS.build({"name": "top_p", "max_new_tokens": 16}, "sampler")
    tok, prompts, ex = world["tok"], world["prompts"], world["examples"]
    before = s.sample(model, tok, prompts, ex, greedy=True, n=1)
    assert before.input_ids.device.type == "cuda", "the rollout is on the model's device, as top_p's is"
    from opdlm_plugins.samplers.vllm import ENGINES, architecture_key  # noqa: PLC0415
    engine = ENGINES[architecture_key(model, len(tok), s.opts)]
    assert engine.sleeping
    free_asleep = torch.cuda.mem_get_info()[0]
    engine.llm.wake_up()
    free_awake = torch.cuda.mem_get_info()[0]
    engine.llm.sleep(level=2)
    total = torch.cuda.mem_get_info()[1]
    # the engine holds about memory_fraction of the GPU awake (weights + KV cache) and gives it back asleep
    assert free_asleep - free_awake > 0.2 * total, (free_asleep, free_awake, total)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    target = torch.tensor([[tok.eos_token_id] * 4], device="cuda")
    for _ in range(3):
        opt.zero_grad()
        (-model(input_ids=torch.tensor([prompts[0][:4]], device="cuda"), labels=target).loss).backward()
        opt.step()
    after = s.sample(model, tok, prompts, ex, greedy=True, n=1)
    ref = top_p.sample(model, tok, prompts, ex, greedy=True, n=1)
    assert not torch.equal(after.input_ids, before.input_ids)
    assert torch.equal(after.input_ids.cpu(), ref.input_ids.cpu())
    assert torch.allclose(after.behaviour_logprobs.cpu(), recomputed(model, after), atol=1e-4)


def test_bf16_behaviour_log_probs_agree_with_the_trainer(world):
    from opdlm.registry import SAMPLERS
    model = world["model"](1, torch.bfloat16)
    s = SAMPLERS.build({"name": "vllm", "max_new_tokens": 64, "sleep": True, "n": 4}, "sampler")
    torch.manual_seed(0)
    ro = s.sample(model, world["tok"], world["prompts"], world["examples"])
    d = (ro.behaviour_logprobs.cpu() - recomputed(model, ro)).abs()[ro.response_mask.cpu()]
    print(f"bf16 |behaviour - trainer| log-prob: mean {float(d.mean()):.2e}, max {float(d.max()):.2e}")
    assert float(d.mean()) < BF16_MEAN and float(d.max()) < BF16_MAX


def test_an_opd_run_on_the_gpu(tmp_path):
    import csv

    from opdlm.pipeline import Runner
    cfg = demo_cfg(*TINY, *HEAD64, "sampler.name=vllm", "trainer.accelerator=gpu", f"run.out_dir={tmp_path}",
                   "stages.opd.steps=4", "trainer.log_every_n_steps=1", "sampler.top_p=1.0")
    Runner(cfg).run()
    rows = list(csv.DictReader((tmp_path / "demo" / "logs" / "opd" / "metrics.csv").open()))
    gaps = [float(r["train/rollout_vs_trainer/prob_diff_max"]) for r in rows if r.get("train/rollout_vs_trainer/prob_diff_max")]
    assert len([r for r in rows if r.get("train/loss")]) == 4 and gaps and max(gaps) < 1e-3, gaps
