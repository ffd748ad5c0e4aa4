"""TextWorld text games (pip install "opdlm[textworld]"), generated offline on first
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
as lost; 0: the game's own rule), workers (processes that generate missing games; 0: one per CPU).

Generation runs TextWorld's own challenge makers (what ``tw-make`` calls) in-process, about 1 s per
game on one core; many games are spread over worker processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from opdlm.errors import ConfigError
from opdlm.plugin_api import Environment, Episode, Step
from opdlm.registry import ENVIRONMENTS

#: game type -> (tw-make challenge, its level range or None, extra tw-make arguments)
GAME_TYPES: dict[str, tuple[str, tuple[int, int] | None, list[str]]] = {
    "coin_collector": ("tw-coin_collector", (1, 300), []),
    "treasure_hunter": ("tw-treasure_hunter", (1, 30), []),
    "simple": ("tw-simple", None, ["--rewards", "dense", "--goal", "detailed"]),
    "cooking": ("tw-cooking", None, ["--recipe", "1", "--take", "1", "--go", "1"]),
}
# jericho says of every generated game that its score, move and change detection are disabled;
# opdlm reads none of those (TextWorld's own state says when a game is won or lost)
NOT_SUPPORTED = ".*is not fully supported. Score, move, change detection.*"
warnings.filterwarnings("ignore", message=NOT_SUPPORTED)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Without that warning (also where a caller, such as pytest, resets the warning filters)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NOT_SUPPORTED)
        yield
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
    lines = [ln for ln in lines  # the ASCII-art banner
             if not re.search(r"[$\\|_]{3,}|\$\$", ln) and not re.fullmatch(r"\s*[$\\|_/]+[\s$\\|_/]*", ln)]
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


def make_game(game_type: str, level: int, path: Path, seed: int) -> str:
    """Generate one game into ``path`` (and its companion files) with TextWorld's challenge maker,
    as ``tw-make`` does; '' on success, else why not. Written under a temporary name, renamed into
    place when complete."""
    import argparse

    _textworld()  # (a one-line error without the package)
    import textworld
    import textworld.challenges

    challenge, bounds, extra = GAME_TYPES[game_type]
    _, make, add_arguments = textworld.challenges.CHALLENGES[challenge]
    parser = argparse.ArgumentParser(prog=challenge)
    add_arguments(parser)
    settings = vars(parser.parse_args([*(["--level", str(level)] if bounds is not None else []), *extra]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{os.getpid()}-{path.stem}"
    options = textworld.GameOptions()
    options.seeds = seed
    options.path = str(tmp / "game.z8")
    options.file_ext = ".z8"
    options.force_recompile = True
    try:
        with quiet():
            game = make(settings=settings, options=options)
            textworld.generator.compile_game(game, options)
    except Exception as e:  # noqa: BLE001 - reported with the game's seed
        shutil.rmtree(tmp, ignore_errors=True)
        return f"{type(e).__name__}: {e}"
    if not (tmp / "game.z8").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        return "the compiler wrote no game file"
    # the companion files (.json: the walkthrough) first, the game last: a game file that exists is whole
    for f in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".z8"):
        os.replace(f, path.with_suffix(f.suffix))
    shutil.rmtree(tmp, ignore_errors=True)
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
        # one line of plain words: the interpreter reads a line starting with '\\' as one of its own
        # commands, and a line break would send two moves
        action = " ".join("".join(c for c in action if c.isprintable() and c != "\\").split())
        valid = action in self.admissible()
        with quiet():
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
                 n_test: int = 20, seed_base: int = 1, cache_dir: str | None = None, max_steps: int = 0,
                 workers: int = 0) -> None:
        if game_type not in GAME_TYPES:
            raise ConfigError(f"game_type: unknown game type {game_type!r}; choices: {', '.join(GAME_TYPES)}")
        bounds = GAME_TYPES[game_type][1]
        if bounds is not None and not bounds[0] <= level <= bounds[1]:
            raise ConfigError(f"level: {game_type} levels are {bounds[0]}..{bounds[1]}, got {level}")
        for key, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("max_steps", max_steps),
                       ("workers", workers)):
            if n < 0:
                raise ConfigError(f"{key}: must be >= 0, got {n}")
        self.tw = _textworld()
        self.game_type, self.level, self.seed_base, self.max_steps = game_type, level, seed_base, max_steps
        self.counts = {"train": n_train, "val": n_val, "test": n_test}
        root = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "opdlm" / "textworld"
        tag = f"{game_type}_l{level}" if bounds is not None else game_type
        self.folder = root / tag
        self.workers = workers
        self._games: dict[str, list[str]] = {}

    def _seed(self, split: str, i: int) -> int:
        return self.seed_base + SPLIT_OFFSET[split] + i

    def _make_all(self, jobs: list[tuple[Path, int]]) -> None:
        """Generate the games ``jobs`` (file, seed) that are not in the cache: in this process for
        a few, else spread over worker processes (this file run as a script), each importing
        TextWorld once."""
        workers = min(self.workers or (os.cpu_count() or 1), max(1, len(jobs) // 4))
        if workers <= 1:
            for path, seed in jobs:
                why = make_game(self.game_type, self.level, path, seed)
                if why:
                    raise ConfigError(f"game_type: could not generate a {self.game_type} game (seed {seed}): {why}")
            return
        parts = [jobs[w::workers] for w in range(workers)]
        # run this file as a script, without its own folder on sys.path (it would shadow the package)
        boot = ("import runpy, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
                f"runpy.run_path({__file__!r}, run_name='__main__')")
        procs = [subprocess.Popen([sys.executable, "-c", boot, self.game_type, str(self.level),
                                   *(f"{p}={s}" for p, s in part)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for part in parts]
        for proc in procs:
            out, err = proc.communicate()
            if proc.returncode != 0:
                tail = (out.strip() or err.strip() or "no output").splitlines()[-1]
                raise ConfigError(f"game_type: could not generate {self.game_type} games: {tail}")

    def _prepare(self, split: str) -> list[Path]:
        paths = [self.folder / f"{split}_{self._seed(split, i)}.z8" for i in range(self.counts[split])]
        missing = [(p, self._seed(split, i)) for i, p in enumerate(paths) if not p.is_file()]
        if missing:
            print(f"[opdlm] textworld: generating {len(missing)} {self.game_type} games for split '{split}' "
                  f"into {self.folder} (once; later runs reuse them)", file=sys.stderr, flush=True)
            self._make_all(missing)
        return paths

    def games(self, split: str) -> list[str]:
        if split not in self.counts:
            raise ValueError(f"unknown split '{split}'; choices: train, val, test")
        if split not in self._games:
            self._games[split] = [str(p) for p in self._prepare(split)]
        return list(self._games[split])

    def start(self, game: str) -> TextWorldEpisode:
        path = Path(game)
        if not path.is_file():
            raise ConfigError(f"game: no such game file '{game}'")
        why = zmachine_problem(path)
        if why:  # the game engine would end the whole process on such a file: refuse it first
            raise ConfigError(f"game: '{game}' cannot be loaded as a TextWorld game ({why})")
        infos = self.tw.EnvInfos(admissible_commands=True, won=True, lost=True, extras=["walkthrough"])
        try:
            with quiet():
                env = self.tw.start(str(path), request_infos=infos)
                return TextWorldEpisode(env, self.max_steps)
        except Exception as e:  # noqa: BLE001 - any failure to load is named with the file
            raise ConfigError(f"game: '{game}' cannot be loaded as a TextWorld game ({type(e).__name__}: {e})") from None


if __name__ == "__main__":  # a generation worker: <game_type> <level> <file>=<seed> ...
    import warnings

    warnings.simplefilter("ignore")
    for job in sys.argv[3:]:  # (python -c puts '-c' in argv[0])
        file, _, seed_text = job.rpartition("=")
        problem = make_game(sys.argv[1], int(sys.argv[2]), Path(file), int(seed_text))
        if problem:
            print(f"seed {seed_text}: {problem}")
            sys.exit(1)
