"""TextWorld text games (pip install "opdlm[textworld]"), generated offline with ``tw-make`` on first
use into a cache folder and played through ``textworld.start``; nothing is downloaded.

Games of a split come from their own seeds (train: seed_base + i, val: seed_base + 100,000 + i,
test: seed_base + 200,000 + i), so the splits never share a game. A game file is generated once
and reused by every later run (``cache_dir``; a half-written file is never used: each is written
under a temporary name and renamed into place).

Observations are cleaned for small models: the banner, the prompt line and the status bar are cut
and blank lines collapsed. An action the game does not accept is an ordinary move (its
observation says so; Step.valid is False), never an error.

Options: game_type (coin_collector | treasure_hunter | simple | cooking), level (coin_collector:
1..300, treasure_hunter: 1..30; the others ignore it), n_train / n_val / n_test (games per split),
seed_base, cache_dir (default ~/.cache/opdlm/textworld), max_steps (moves before the game counts
as lost; 0: the game's own rule).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from opdlm.plugin_api import Environment, Episode, Step
from opdlm.registry import ENVIRONMENTS, ConfigError

#: game type -> (tw-make challenge, its level range or None, extra tw-make arguments)
GAME_TYPES: dict[str, tuple[str, tuple[int, int] | None, list[str]]] = {
    "coin_collector": ("tw-coin_collector", (1, 300), []),
    "treasure_hunter": ("tw-treasure_hunter", (1, 30), []),
    "simple": ("tw-simple", None, ["--rewards", "dense", "--goal", "detailed"]),
    "cooking": ("tw-cooking", None, ["--recipe", "1", "--take", "1", "--go", "1"]),
}
SPLIT_OFFSET = {"train": 0, "val": 100_000, "test": 200_000}


def _textworld() -> Any:
    try:
        import textworld
    except ImportError:
        raise ConfigError('the textworld environment needs the textworld package: '
                          'pip install "opdlm[textworld]"') from None
    return textworld


def clean(text: str) -> str:
    """A TextWorld observation without the banner, the '>' prompt and the status bar."""
    text = text.split("\n>")[0] if "\n>" in text else text
    lines = [ln.rstrip() for ln in text.splitlines()]
    lines = [ln for ln in lines if not re.search(r"[$\\|_]{3,}|\$\$", ln)]  # the ASCII-art banner
    out = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", out).strip()


def zmachine_problem(path: Path) -> str:
    """Why a file is not a whole Z-machine story file ('' when it looks like one): the version byte
    and the length the header declares (in units of 8 bytes for versions 6 to 8)."""
    data = path.read_bytes()
    if len(data) < 64:
        return f"{len(data)} bytes, shorter than a Z-machine header"
    version = data[0]
    if not 1 <= version <= 8:
        return f"version byte {version} is not a Z-machine version"
    unit = 2 if version <= 3 else 4 if version <= 5 else 8
    declared = int.from_bytes(data[0x1A:0x1C], "big") * unit
    if declared and declared > len(data):
        return f"the header declares {declared} bytes but the file has {len(data)} (truncated)"
    return ""


class TextWorldEpisode(Episode):
    def __init__(self, env: Any, max_steps: int) -> None:
        self.env, self.max_steps, self.moves = env, max_steps, 0
        self.state = env.reset()
        self.observation = clean(self.state.feedback)
        self.done, self.won = False, False

    def admissible(self) -> list[str]:
        return list(self.state.admissible_commands or [])

    def walkthrough(self) -> list[str] | None:
        try:
            return list(self.state["extra.walkthrough"])
        except KeyError:
            return None

    def step(self, action: str) -> Step:
        if self.done:
            raise RuntimeError("step() after the episode ended")
        action = " ".join(action.strip().split())
        valid = action in self.admissible()
        self.state, reward, done = self.env.step(action)
        self.moves += 1
        self.won = bool(self.state.won)
        self.done = bool(done) or self.won or bool(self.state.lost) or (0 < self.max_steps <= self.moves)
        self.observation = clean(self.state.feedback)
        return Step(observation=self.observation, reward=float(reward or 0.0), done=self.done, won=self.won,
                    valid=valid)

    def close(self) -> None:
        self.env.close()


@ENVIRONMENTS.register("textworld")
class TextWorld(Environment):
    """TextWorld games generated offline (coin collector, treasure hunter, simple, cooking)."""

    def __init__(self, *, game_type: str = "coin_collector", level: int = 1, n_train: int = 50, n_val: int = 10,
                 n_test: int = 20, seed_base: int = 1, cache_dir: str | None = None, max_steps: int = 0) -> None:
        if game_type not in GAME_TYPES:
            raise ConfigError(f"game_type: unknown game type {game_type!r}; choices: {', '.join(GAME_TYPES)}")
        bounds = GAME_TYPES[game_type][1]
        if bounds is not None and not bounds[0] <= level <= bounds[1]:
            raise ConfigError(f"level: {game_type} levels are {bounds[0]}..{bounds[1]}, got {level}")
        for key, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("max_steps", max_steps)):
            if n < 0:
                raise ConfigError(f"{key}: must be >= 0, got {n}")
        self.tw = _textworld()
        self.game_type, self.level, self.seed_base, self.max_steps = game_type, level, seed_base, max_steps
        self.counts = {"train": n_train, "val": n_val, "test": n_test}
        root = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "opdlm" / "textworld"
        tag = f"{game_type}_l{level}" if bounds is not None else game_type
        self.folder = root / tag

    def _seed(self, split: str, i: int) -> int:
        return self.seed_base + SPLIT_OFFSET[split] + i

    def game_file(self, split: str, i: int) -> Path:
        """The file of game i of a split, generated now when it is not in the cache yet."""
        path = self.folder / f"{split}_{self._seed(split, i)}.z8"
        if not path.is_file():
            self._make(path, self._seed(split, i))
        return path

    def _make(self, path: Path, seed: int) -> None:
        challenge, bounds, extra = GAME_TYPES[self.game_type]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{os.getpid()}-{path.stem}"
        tool = shutil.which("tw-make") or str(Path(sys.executable).with_name("tw-make"))
        cmd = [tool, challenge, *(["--level", str(self.level)] if bounds is not None else []), *extra,
               "--output", str(tmp / "game.z8"), "--seed", str(seed), "-f", "--silent"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        made = tmp / "game.z8"
        if res.returncode != 0 or not made.is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ConfigError(f"game_type: tw-make could not generate a {self.game_type} game (seed {seed}): {tail[0]}")
        for f in tmp.iterdir():  # the game and its companion files (.json: the walkthrough)
            os.replace(f, path.with_suffix(f.suffix))
        shutil.rmtree(tmp, ignore_errors=True)

    def games(self, split: str) -> list[str]:
        if split not in self.counts:
            raise ValueError(f"unknown split '{split}'; choices: train, val, test")
        return [str(self.game_file(split, i)) for i in range(self.counts[split])]

    def start(self, game: str) -> TextWorldEpisode:
        path = Path(game)
        if not path.is_file():
            raise ConfigError(f"game: no such game file '{game}'")
        why = zmachine_problem(path)
        if why:  # the game engine would end the whole process on such a file: refuse it first
            raise ConfigError(f"game: '{game}' cannot be loaded as a TextWorld game ({why})")
        infos = self.tw.EnvInfos(admissible_commands=True, won=True, lost=True, extras=["walkthrough"])
        try:
            env = self.tw.start(str(path), request_infos=infos)
            return TextWorldEpisode(env, self.max_steps)
        except Exception as e:  # noqa: BLE001 - any failure to load is named with the file
            raise ConfigError(f"game: '{game}' cannot be loaded as a TextWorld game ({type(e).__name__}: {e})") from None
