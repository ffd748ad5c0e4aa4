"""Multi-turn rollouts on real TextWorld games generated in the test (coin collector, level 3):
episodes end, the response mask covers exactly the student's tokens (checked against a
re-rendering of the conversation), the log-probs the OPD step reads at action tokens equal one
forward pass over the whole conversation, the walkthrough played through the sampler wins every
game, SFT learns the actions only, evaluation reports success, turns and invalid actions, and a
tiny end-to-end run plays and trains."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from conftest import DEFAULT_CONF, TINY, compose

if os.environ.get("OPDLM_TURN_SAMPLER") == "vllm" and importlib.util.find_spec("textworld") is None:
    raise RuntimeError("OPDLM_TURN_SAMPLER=vllm but textworld is not installed")  # CI's engine run: never a silent skip
pytest.importorskip("textworld", reason='pip install "opdlm[textworld]"')

from opdlm.builder import build_run  # noqa: E402
from opdlm.conversation import Conversation  # noqa: E402
from opdlm.data import sft_collate  # noqa: E402
from opdlm.errors import ConfigError  # noqa: E402
from opdlm.evaluation import evaluate  # noqa: E402
from opdlm.models import render_prompt  # noqa: E402
from opdlm.module import OPDModule  # noqa: E402
from opdlm.plugin_api import Sampler  # noqa: E402
from opdlm.types import Rollout  # noqa: E402

pytestmark = pytest.mark.slow  # generates games (about a second each)

#: OPDLM_TURN_SAMPLER=vllm (CI's vLLM environment runs this file so): every action is written by the
#: vllm sampler's engine (sampler.turn), on models of head size 32, the smallest vLLM's CPU attention has
TURN = os.environ.get("OPDLM_TURN_SAMPLER", "top_p")
ON_ENGINE = ["sampler.turn={name: vllm, sleep: false, kv_cache_gib: 0.25, enforce_eager: true}",
             "student.hidden_size=64", "student.heads=2", "teacher.hidden_size=64", "teacher.heads=2"]

AGENT = [  # TINY's models and trainer settings, a few games, and batches that fit 3 train games
    *(o for o in TINY if not o.startswith(("task.", "sampler.", "eval.", "stages."))),
    "task.name=text_game", "task.env.game_type=coin_collector", "task.env.level=3", "task.env.n_train=3",
    "task.env.n_val=1", "task.env.n_test=3",
    "sampler.name=multi_turn", "sampler.max_new_tokens=12", "sampler.n=2", "sampler.max_turns=4",
    "sampler.max_context=900", "sampler.top_p=1.0",
    "teacher.max_positions=1024", "student.max_positions=1024", "maskers=[]",
    "stages.teacher_sft.steps=2", "stages.teacher_sft.batch_size=3", "stages.teacher_sft.val_every=0",
    "stages.student_sft.steps=1", "stages.student_sft.batch_size=3",
    "stages.opd.steps=2", "stages.opd.prompts_per_step=2", "stages.opd.val_every=0",
    "eval.val_prompts=1", "eval.test_prompts=3", "eval.batch_size=3",
    *(ON_ENGINE if TURN == "vllm" else []),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("games"))


def agent_cfg(cache: str, *extra: str) -> dict:
    return compose([str(DEFAULT_CONF)], [*AGENT, f"task.env.cache_dir={cache}", *extra])


@pytest.fixture(scope="module")
def world(cache):
    cfg = agent_cfg(cache)
    built = build_run(cfg)
    assert built.sampler.turn.plugin_name == TURN  # (OPDLM_TURN_SAMPLER=vllm: the engine writes every action)
    torch.manual_seed(0)
    module = OPDModule(cfg, built=built)
    return {"cfg": cfg, "built": built, "module": module}


def play(world, model=None, n=2, greedy=False, seed=0) -> Rollout:
    built = world["built"]
    tok = built.student.tokenizer
    exs = built.task.examples("test")
    prompts = [render_prompt(tok, ex.prompt, False) for ex in exs]
    torch.manual_seed(seed)
    return built.sampler.sample(model or world["module"].student, tok, prompts, exs, n=n, greedy=greedy,
                                chat_template=False)


class Walkthrough(Sampler):
    """A scripted policy in place of the per-turn sampler: each turn it writes the expert's next
    action (the number of ends of turn in the conversation so far says which)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.conv = Conversation(tokenizer, False)

    def sample(self, model, tokenizer, prompt_ids, examples, *, greedy=False, n=None):
        from opdlm.rollouts import build_rollout, left_pad  # noqa: PLC0415
        eos = tokenizer.eos_token_id
        acts = [self.conv.action(ex.meta["turns"][p.count(eos)][0]) for p, ex in zip(prompt_ids, examples)]
        ids, _ = left_pad(prompt_ids, tokenizer.pad_token_id)
        T = max(len(a) for a in acts)
        resp = torch.full((len(acts), T), tokenizer.pad_token_id, dtype=torch.long)
        for i, a in enumerate(acts):
            resp[i, : len(a)] = torch.tensor(a)
        return build_rollout(prompt_ids, examples, 1, torch.cat([ids, resp], 1), ids.shape[1],
                             torch.zeros(len(acts), T), eos, tokenizer.pad_token_id, tokenizer)


def conversation_of(row: int, ro: Rollout) -> list[int]:
    return ro.input_ids[row][ro.attention_mask[row].bool()].tolist()


def test_episodes_end_within_their_budgets(world):
    ro = play(world)
    sampler = world["built"].sampler
    assert world["module"].norm_length() == sampler.max_turns * sampler.max_new_tokens  # a whole episode's actions
    assert ro.outcomes is not None and len(ro.outcomes) == ro.input_ids.shape[0] == 6
    for o, trunc in zip(ro.outcomes, ro.truncated.tolist()):
        assert o.end in ("won", "lost", "turns", "context", "action")
        assert 0 <= o.invalid <= o.turns <= sampler.max_turns
        assert trunc == (o.end in ("turns", "context", "action")) == o.truncated
        assert len(o.transcript) == o.turns + (o.end == "action")
    assert all(int(n) <= sampler.max_context for n in ro.attention_mask.sum(-1))


def test_the_response_mask_covers_exactly_the_students_tokens(world):
    """Each row re-rendered from its transcript (first user turn, then each action with its end of
    turn and the game's answer as the next user turn) gives the row's tokens, and the mask is True
    exactly on the action tokens."""
    built = world["built"]
    tok, task = built.student.tokenizer, built.task
    conv = Conversation(tok, False)
    for ro in (play(world, seed=1), play(world, seed=2, greedy=True, n=1)):
        for b, o in enumerate(ro.outcomes):
            # the game's answers shown as user turns: all but the last (after it the episode ended, the
            # turn budget was spent, or the next turn would not fit)
            assert o.replies == len(o.transcript) - 1
            turns = [(a, task.user_turn(obs) if k < o.replies else None) for k, (a, obs) in enumerate(o.transcript)]
            ids, mine = conv.render(ro.examples[b].prompt, turns)
            if o.end == "action":  # the last action never ended its turn: no EOS after it
                assert ids[-1] == tok.eos_token_id
                ids, mine = ids[:-1], mine[:-1]
            assert conversation_of(b, ro) == ids
            P = ro.prompt_len
            real = ro.attention_mask[b, P:].bool()
            assert ro.response_mask[b][real].tolist() == mine[len(ids) - int(real.sum()):]
            assert not ro.response_mask[b][~real].any()
            assert (ro.behaviour_logprobs[b][~ro.response_mask[b]] == 0).all()


def test_action_logprobs_equal_one_forward_pass_over_the_conversation(world):
    """What the OPD step reads (teacher and student log-probs of the action tokens) equals a single
    forward pass of each model over the row's whole conversation, unpadded."""
    module = world["module"]
    ro = play(world, seed=3)
    assert ro.response_mask.sum() > 0
    view, teacher, _, mask = module.prepare(ro)
    student = module.score_student(ro, None)
    assert torch.equal(mask, ro.response_mask)  # no masker: every action token counts, nothing else
    for b in range(ro.input_ids.shape[0]):
        ids = torch.tensor([conversation_of(b, ro)])
        start = int((~ro.attention_mask[b].bool()).long().cumprod(0).sum())  # left padding
        for model, scores in ((module.teacher, teacher), (module.student, student)):
            with torch.no_grad():
                lp = model(input_ids=ids).logits[0].float().log_softmax(-1)
            n = ids.shape[1]
            for t in torch.nonzero(ro.response_mask[b]).flatten().tolist():
                col = ro.prompt_len + t - start  # the token's position in the unpadded conversation
                assert col < n
                want = lp[col - 1, ids[0, col]]
                torch.testing.assert_close(scores.token_logprob[b, t], want, atol=2e-5, rtol=0)
    # with top_p = 1 and temperature 1 the sampler's own log-probs are those same numbers
    m = ro.response_mask
    torch.testing.assert_close(student.token_logprob[m], ro.behaviour_logprobs[m], atol=2e-5, rtol=0)


def test_the_walkthrough_played_through_the_sampler_wins_every_game(world):
    sampler = world["built"].sampler
    saved, sampler.turn = sampler.turn, Walkthrough(world["built"].student.tokenizer)
    try:
        ro = play(world, n=1)
        exs = world["built"].task.examples("test")
        for o, ex in zip(ro.outcomes, exs):
            assert o.won and o.end == "won" and o.invalid == 0
            assert [a for a, _ in o.transcript] == [a for a, _ in ex.meta["turns"]]
        metrics = evaluate(world["module"].student, world["built"].student.tokenizer, world["built"],
                           world["cfg"], False, "test")
    finally:
        sampler.turn = saved
    assert metrics["test/acc_greedy"] == metrics["test/acc_sampled"] == 1.0
    assert metrics["test/turns_greedy"] == pytest.approx(sum(len(e.meta["turns"]) for e in exs) / len(exs))
    assert metrics["test/invalid_greedy"] == 0.0 and metrics["test/trunc_greedy"] == 0.0


def test_evaluation_of_a_random_student_counts_invalid_actions(world):
    m = evaluate(world["module"].student, world["built"].student.tokenizer, world["built"], world["cfg"], False, "test")
    assert m["test/acc_greedy"] == 0.0  # an untrained model writes no winning action
    assert 0.0 <= m["test/invalid_sampled"] <= 1.0 and m["test/turns_greedy"] <= 4


def test_sft_learns_the_actions_and_never_the_observations(world):
    built = world["built"]
    tok = built.student.tokenizer
    exs = built.task.examples("train")
    batch = sft_collate(tok, False)(exs)
    conv = Conversation(tok, False)
    for i, ex in enumerate(exs):
        ids, mine = conv.render(ex.prompt, ex.meta["turns"])
        assert batch["input_ids"][i, : len(ids)].tolist() == ids
        learned = batch["labels"][i] != -100
        assert learned[: len(ids)].tolist() == mine and not learned[len(ids):].any()
        text = tok.decode(batch["labels"][i][learned].tolist())
        assert text == "".join(a + tok.eos_token for a, _ in ex.meta["turns"])


def test_a_tiny_run_plays_trains_and_reports(cache, tmp_path):
    from opdlm.pipeline import Runner
    cfg = agent_cfg(cache, f"run.out_dir={tmp_path}")
    res = Runner(cfg).run()
    for key in ("teacher", "student_before", "student_after"):
        t = res[key]["test"]
        assert {"test/acc_greedy", "test/turns_greedy", "test/invalid_greedy"} <= set(t)
    metrics = (tmp_path / "demo" / "logs" / "opd" / "metrics.csv").read_text()
    assert "train/episode/won_frac" in metrics and "train/loss" in metrics
    table = (tmp_path / "demo" / "results.md").read_text()
    assert "success (greedy)" in table and "mean turns" in table


def test_across_tokenizers_the_teacher_reads_its_own_rendering_of_the_conversation(cache):
    """byte_span on a multi-turn rollout: the teacher's sequence is its own rendering (its prompt,
    its tokens of each action, its own user turns), every action token is aligned and nothing else,
    and the teacher's log-probs at chunk starts equal one forward pass over that rendering."""
    cfg = agent_cfg(cache, "teacher.tiny_tokenizer=bpe", "teacher.tiny_vocab=300", "aligner.name=byte_span",
                    "support.name=mapped_topk", "support.k=4")
    built = build_run(cfg)
    assert len(built.teacher.tokenizer) != len(built.student.tokenizer)
    torch.manual_seed(0)
    module = OPDModule(cfg, built=built)
    # the expert's actions (a random student writes control tokens, where alignment stops by design)
    built.sampler.turn = Walkthrough(built.student.tokenizer)
    ro = play({"built": built, "module": module}, seed=4, n=1)
    assert all(o.won for o in ro.outcomes)
    view, teacher, _, mask = module.prepare(ro)
    t_tok, task = built.teacher.tokenizer, built.task
    conv = Conversation(t_tok, False)
    for b, o in enumerate(ro.outcomes):
        turns = [(a, task.user_turn(obs) if k < o.replies else None) for k, (a, obs) in enumerate(o.transcript)]
        ids, _ = conv.render(ro.examples[b].prompt, turns)
        if o.end == "action":
            ids = ids[:-1]
        row = view.input_ids[b][view.attention_mask[b].bool()].tolist()
        assert row == ids
        assert torch.equal(view.aligned[b], ro.response_mask[b])  # plain ASCII actions: all aligned
        start = int((~view.attention_mask[b].bool()).long().cumprod(0).sum())
        with torch.no_grad():
            lp = module.teacher(input_ids=torch.tensor([row])).logits[0].float().log_softmax(-1)
        for t in torch.nonzero(view.starts[b]).flatten().tolist():
            col = int(view.pred_columns[b, t]) - start
            torch.testing.assert_close(teacher.token_logprob[b, t], lp[col, int(view.targets[b, t])], atol=2e-5, rtol=0)
    assert not (mask & ~ro.response_mask).any()


def test_across_tokenizers_nothing_after_an_action_that_did_not_align_is_scored(cache):
    """An action holding a control token the teacher has no role for (here <unk>) stops alignment
    inside it; no later action of that conversation is aligned (the teacher's context would no
    longer be the student's), while a clean conversation is aligned to its end."""
    from opdlm_plugins.samplers.multi_turn import pack  # noqa: PLC0415

    from opdlm.types import Outcome
    cfg = agent_cfg(cache, "teacher.tiny_tokenizer=bpe", "teacher.tiny_vocab=300", "aligner.name=byte_span",
                    "support.name=mapped_topk", "support.k=4")
    built = build_run(cfg)
    module = OPDModule(cfg, built=built)
    tok, task = built.student.tokenizer, built.task
    conv = Conversation(tok, False)
    ex = task.examples("test")[0]
    seqs, mine, outcomes = [], [], []
    for first in ("go <unk>north", "go north"):
        turns = [(first, "You are in a hall.\n>"), ("go east", None)]
        ids, m = conv.render(ex.prompt, [(a, r) for a, r in turns])
        seqs.append(ids)
        mine.append(m[len(conv.first(ex.prompt)):])
        outcomes.append(Outcome(won=False, turns=2, invalid=2, end="lost", transcript=[(first, "You are in a hall."),
                                                                                      ("go east", "")], replies=1))
    plen = [len(conv.first(ex.prompt))] * 2
    ro = pack(seqs, plen, mine, [[0.0] * len(m) for m in mine], [ex, ex], outcomes, tok.pad_token_id)
    view = module.align(ro)
    for b, broken in ((0, True), (1, False)):
        resp = ro.response_mask[b]
        first_action = torch.nonzero(resp).flatten()[: len(conv.action("go north")) + 5]
        second = torch.nonzero(resp).flatten()[-len(conv.action("go east")):]
        assert bool(view.aligned[b, second].any()) != broken
        assert bool(view.aligned[b, first_action[:1]].all())  # "g" before the <unk> is aligned
    assert torch.equal(view.aligned[1], ro.response_mask[1])


@pytest.mark.parametrize("extra,message", [
    (["sampler.name=top_p"], r"^sampler: task 'text_game' is played turn by turn, but sampler 'top_p' writes single "
                             r"responses; set sampler.name=multi_turn$"),
    (["sampler.max_turns=0"], r"^sampler.max_turns: must be >= 1 \(one turn\), got 0$"),
    (["sampler.max_context=12"], r"^sampler.max_context: must leave room for one turn"),
    (["sampler.max_context=2000"], r"^sampler.max_context: 2000 tokens of conversation do not fit in the teacher's "
                                   r"1024 positions \(teacher.max_positions\)"),
    (["task.env.game_type=zork"], r"^task.env.game_type: unknown game type 'zork'"),
    (["sampler.max_context=40"], r"^sampler.max_context: train example 0 \(.*train_1.z8\) needs \d+ tokens for its first "
                                 r"turn \(prompt \+ sampler.max_new_tokens 12\), more than 40; raise it"),
])
def test_bad_multi_turn_settings_fail_in_one_line(cache, extra, message):
    with pytest.raises(ConfigError, match=message):
        build_run(agent_cfg(cache, *extra))


def test_a_walkthrough_cut_short_by_a_move_limit_is_no_expert_and_is_not_kept(cache):
    from opdlm.registry import TASKS
    env = {"name": "textworld", "game_type": "coin_collector", "level": 3, "n_train": 3, "n_val": 1, "n_test": 3,
           "cache_dir": cache}
    short = TASKS.build({"name": "text_game", "env": {**env, "max_steps": 1}})
    game = short.environment.games("train")[0]
    from pathlib import Path
    record = Path(game).with_suffix(".transcript.json")
    record.unlink(missing_ok=True)
    assert short.examples("train")[0].solution is None and short.examples("train")[0].meta["turns"] is None
    assert not record.exists()  # the lost walkthrough is not cached for runs without the limit
    full = TASKS.build({"name": "text_game", "env": env})
    assert full.examples("train")[0].meta["turns"] and record.exists()


def test_multi_turn_on_a_single_turn_task_is_one_line():
    cfg = compose([str(DEFAULT_CONF)], ["sampler.name=multi_turn"])
    with pytest.raises(ConfigError, match=r"^sampler: 'multi_turn' plays episodes of an interactive task \(text_game\), "
                                          r"but task 'arithmetic' has single-turn prompts; use top_p$"):
        build_run(cfg)


def test_the_turn_sampler_is_a_node_without_its_own_sampling_options():
    from opdlm.registry import SAMPLERS
    sampler = SAMPLERS.build({"name": "multi_turn", "temperature": 0.7, "max_new_tokens": 9, "turn": {"name": "top_p"}})
    assert (sampler.turn.plugin_name, sampler.turn.temperature, sampler.turn.max_new_tokens) == ("top_p", 0.7, 9)
    with pytest.raises(ConfigError, match=r"^sampler.turn.temperature: set temperature on multi_turn itself"):
        SAMPLERS.build({"name": "multi_turn", "turn": {"name": "top_p", "temperature": 0.5}})
    with pytest.raises(ConfigError, match=r"^sampler.turn: a single-turn sampler node"):
        SAMPLERS.build({"name": "multi_turn", "turn": {"name": "multi_turn"}})
