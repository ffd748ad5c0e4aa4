"""The textworld environment on real generated games: the expert walkthrough wins every test game,
episodes end, splits share no game, an action the game does not accept is an ordinary move,
games are generated once into the cache, and bad options fail with one line."""

from __future__ import annotations

import hashlib
import random
import sys

import pytest

pytest.importorskip("textworld", reason='pip install "opdlm[textworld]"')

from opdlm.errors import ConfigError
from opdlm.registry import ENVIRONMENTS  # noqa: E402

pytestmark = pytest.mark.slow  # generates games with tw-make (a few seconds each)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tw")
    return ENVIRONMENTS.build({"name": "textworld", "game_type": "coin_collector", "level": 5, "n_train": 1,
                               "n_val": 0, "n_test": 2, "cache_dir": str(cache), "max_steps": 20})


def test_the_walkthrough_wins_every_test_game(env):
    games = env.games("test")
    assert len(games) == 2
    for game in games:
        ep = env.start(game)
        assert ep.observation and "$$" not in ep.observation and "\n>" not in ep.observation
        plan = ep.walkthrough()
        assert plan
        for i, action in enumerate(plan):
            assert action in ep.admissible()
            step = ep.step(action)
            assert step.valid and step.done == (i == len(plan) - 1)
        assert ep.won and ep.done
        ep.close()


def test_random_play_ends_within_max_steps_and_invalid_moves_are_ordinary(env):
    rng = random.Random(0)
    ep = env.start(env.games("test")[0])
    step = ep.step("dance wildly")
    assert not step.valid and not step.done and not step.won and step.observation
    # what a model may write: an interpreter command, a line break, nothing at all; each is one
    # ordinary (invalid) move and the game goes on
    for text in ("\\quit", "go\nnorth\nnorth", "", "\x00\x07"):
        step = ep.step(text)
        assert not step.valid and not step.done and step.observation
        assert ep.admissible()
    moves = 5
    while not ep.done:
        step = ep.step(rng.choice(ep.admissible()))
        moves += 1
    assert moves <= 20
    with pytest.raises(RuntimeError):
        ep.step("look")
    ep.close()


def test_splits_share_no_game_and_the_cache_is_reused(env):
    train, test = env.games("train"), env.games("test")
    digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    assert not set(train) & set(test) and not {digest(p) for p in train} & {digest(p) for p in test}
    stamps = [__import__("os").stat(p).st_mtime_ns for p in test]
    again = ENVIRONMENTS.build({"name": "textworld", "game_type": "coin_collector", "level": 5, "n_train": 1,
                                "n_val": 0, "n_test": 2, "cache_dir": str(env.folder.parent)})
    assert again.games("test") == test and [__import__("os").stat(p).st_mtime_ns for p in test] == stamps


def test_a_game_file_that_cannot_be_loaded_is_named(env, tmp_path):
    bad = tmp_path / "broken.z8"
    bad.write_bytes(b"not a game")
    with pytest.raises(ConfigError, match=rf"^game: '{bad}' cannot be loaded as a TextWorld game \(10 bytes"):
        env.start(str(bad))
    good = open(env.games("test")[0], "rb").read()
    (tmp_path / "cut.z8").write_bytes(good[: len(good) // 2])
    with pytest.raises(ConfigError, match=r"cannot be loaded as a TextWorld game \(the header declares .* \(truncated\)"):
        env.start(str(tmp_path / "cut.z8"))
    with pytest.raises(ConfigError, match=r"^game: no such game file"):
        env.start(str(tmp_path / "missing.z8"))


@pytest.mark.parametrize("node,msg", [
    ({"game_type": "zork"}, r"^environment\.game_type: unknown game type 'zork'; choices: coin_collector"),
    ({"game_type": "treasure_hunter", "level": 31}, r"^environment\.level: treasure_hunter levels are 1\.\.30, got 31"),
    ({"n_test": -1}, r"^environment\.n_test: must be >= 0"),
])
def test_bad_options(node, msg):
    with pytest.raises(ConfigError, match=msg):
        ENVIRONMENTS.build({"name": "textworld", **node}, "environment")


def test_textworld_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "textworld", None)
    with pytest.raises(ConfigError, match=r'^environment: the textworld environment needs the textworld package: pip install "opdlm\[textworld\]"$'):
        ENVIRONMENTS.build({"name": "textworld"}, "environment")
