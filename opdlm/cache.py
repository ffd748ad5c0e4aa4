"""Finished stages, kept so that nothing is computed twice and nothing damaged is trusted.

A stage folder (a Hugging Face model folder plus ``stage.json``) counts only when it is complete
and verified: it is written under a temporary name and renamed into place, and ``stage.json`` holds
the size and sha256 of every other file in it, checked each time the folder is used. The training
fingerprint decides whether the weights can be reused; the evaluation fingerprint decides whether
the test metrics can be (changing only ``eval.*`` re-evaluates without retraining).

Locks: a run holds its run folder (a second live run on it is refused), and a process computing a
stage for a shared cache folder holds that entry, so two runs never compute or write it at once
(the second waits, then finds it cached). Locks are ``flock``s, released by the system when a
process dies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from opdlm.guard import STOPPED, first_nonfinite

try:
    import fcntl
except ImportError:  # not on Windows: runs are then not locked
    fcntl = None  # type: ignore[assignment]


class FolderBusy(RuntimeError):
    """A run folder is held by another live run."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file in ``folder`` except stage.json."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "stage.json":
            out[str(p.relative_to(folder))] = {"size": p.stat().st_size, "sha256": sha256(p)}
    return out


def damage(folder: Path, info: dict[str, Any]) -> str | None:
    """Why a stage folder cannot be trusted (a missing, resized or changed file), or None."""
    files = info.get("files")
    if not isinstance(files, dict) or not files:
        return "stage.json lists no checksums"
    for rel, want in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != want.get("size"):
            return f"{rel} has {p.stat().st_size} bytes, {want.get('size')} were written"
        if sha256(p) != want.get("sha256"):
            return f"{rel}: checksum differs"
    return None


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (a temporary file renamed over the target)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def lookup(stage: str, folder: Path, fp: str, eval_fp: str, log: Callable[[str], None]) -> tuple[str, dict | None]:
    """('cached', info): weights and metrics reusable; ('evaluate', info): the weights are, the
    evaluation settings changed; ('compute', None): the stage must run (the reason is logged)."""
    marker = folder / "stage.json"
    if not marker.is_file():
        return "compute", None
    try:
        info = json.loads(marker.read_text())
        if not isinstance(info, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        log(f"[opdlm] stage {stage}: {marker} is unreadable ({type(e).__name__}); running the stage again")
        return "compute", None
    if info.get("fingerprint") != fp:
        log(f"[opdlm] stage {stage}: config or code changed since {folder} was made, running it again")
        return "compute", None
    why = damage(folder, info)
    if why:
        log(f"[opdlm] stage {stage}: {folder} is damaged ({why}); running the stage again")
        return "compute", None
    evaluations = info.get("evaluations") if isinstance(info.get("evaluations"), dict) else {}
    if eval_fp not in evaluations:
        log(f"[opdlm] stage {stage}: weights cached in {folder} (same training config and code); evaluating them "
            f"with these evaluation settings")
        return "evaluate", info
    log(f"[opdlm] stage {stage}: cached in {folder} (same config and code), skipping")
    ev = evaluations[eval_fp]
    return "cached", info | {"test": ev["test"], "eval_fingerprint": eval_fp,
                             "seconds": round(info.get("train_seconds", 0.0) + ev.get("seconds", 0.0), 3)}


def replace_folder(tmp: Path, folder: Path) -> None:
    """Move the complete ``tmp`` folder to ``folder`` (replacing an older one): a kill at any moment
    leaves either the old folder, no folder, or the new one; never a partial one under that name."""
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale(folder: Path) -> None:
    """Remove the temporary folders of ``folder`` left by writers that no longer run (killed)."""
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        alive = True
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            alive = False
        except PermissionError:
            pass
        if not alive:
            shutil.rmtree(tmp, ignore_errors=True)


class Lock:
    """An exclusive lock on ``path`` (a lock file holding the owner's pid and start time).
    ``wait=False``: raise FolderBusy at once if another process holds it."""

    def __init__(self, path: Path, what: str, wait: bool) -> None:
        self.path, self.fh = path, None
        if fcntl is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = path.open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise FolderBusy(f"{what} is in use by {owner}; wait for it to finish, or choose another run.name") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})")
        fh.flush()
        self.fh = fh

    def release(self) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


def resume_point(path: Path, stage: str, fp: str, frame: str, optimizer: dict[str, Any],
                 log: Callable[[str], None]) -> tuple[str | None, dict | None]:
    """A stage's last checkpoint ``path`` if it was written for fingerprint ``fp``; or, when the
    stage stopped on a non-finite step (``stopped.json`` next to it, opdlm.guard) and the checkpoint
    was written for this config up to its optimizer keys (the same ``frame`` fingerprint; "" never
    matches), the checkpoint and what continues (the step and the keys that changed from the ones it
    holds to ``optimizer``, for stage.json). Any other checkpoint, and one whose weights hold a NaN or
    inf, is set aside (renamed), with the reason."""
    stopped = path.parent / STOPPED
    if not path.is_file():
        return None, None
    continued = None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        meta = ck.get("opdlm", {})
        step = ck.get("global_step", "?")
        bad = first_nonfinite(ck.get("state_dict", {}).items())
        del ck
    except Exception as e:  # a damaged file: say so and start over
        reason, meta, step = f"unreadable ({type(e).__name__})", None, None
    else:
        reason = None if meta.get("fingerprint") == fp else (
            f"written for another config or code (fingerprint {meta.get('fingerprint') or 'none'}, now {fp})")
        if reason and stopped.is_file() and frame and meta.get("frame") == frame:
            old = meta.get("optimizer", {})
            changed = {k: [old.get(k), v] for k, v in optimizer.items() if old.get(k) != v}
            continued, reason = {"from_fingerprint": meta.get("fingerprint"), "at_step": step, "changed": changed}, None
        if bad:
            reason = f"its weights hold non-finite values ({bad})"
    if reason is None:
        if continued is None:
            log(f"[opdlm] stage {stage}: resuming from {path} (optimizer step {step})")
        else:
            diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in continued["changed"].items())
            log(f"[opdlm] stage {stage}: continuing the stage stopped on a non-finite step from {path} "
                f"(optimizer step {step}) with other optimizer settings ({diff})")
        return str(path), continued
    aside = path.with_name(f"last.ckpt.{time.strftime('%Y%m%d-%H%M%S')}.set-aside")
    path.rename(aside)
    stopped.unlink(missing_ok=True)
    log(f"[opdlm] stage {stage}: not resuming from {path}: {reason}; moved to {aside.name}, the stage starts from step 0")
    return None, None
