"""SIGTERM (a scheduler's stop, ``kill``) ends a run as Ctrl-C does: the stage in progress stops at
once, finished stages and the last checkpoint are kept, and the same command continues from them.
It is reported as what it is: "terminated (SIGTERM)" with exit code 143 (128 + 15), where Ctrl-C
says "interrupted (Ctrl-C)" with 130."""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

#: what stopped the run (set by the SIGTERM handler; Ctrl-C otherwise)
_CAUSE = {"text": "interrupted (Ctrl-C)", "code": 130}


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _CAUSE.update(text="terminated (SIGTERM)", code=143)
    raise KeyboardInterrupt  # (the paths Ctrl-C takes: Lightning stops the fit, opdlm reports where)


def stop_on_sigterm() -> None:
    """Install the SIGTERM handler (from the main thread; elsewhere signals cannot be handled)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def cause() -> str:
    """How the run was stopped, as the stop line says it: "interrupted (Ctrl-C)" or "terminated (SIGTERM)"."""
    return _CAUSE["text"]


def exit_code() -> int:
    """The exit code of a stopped run: 130 after Ctrl-C, 143 after SIGTERM."""
    return int(_CAUSE["code"])


def end_with_parent() -> None:
    """A run started by a sweep (OPDLM_PARENT_PID names the sweep) stops as on SIGTERM when the sweep
    disappears, even when the sweep was killed with no chance to stop it: no orphan keeps training and
    holding its run folder. Other runs (and the worker ranks a run starts itself) are left alone."""
    want = os.environ.get("OPDLM_PARENT_PID")
    parent = os.getppid()
    if not want or not want.isdigit() or int(want) != parent:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="opdlm-sweep-watch").start()
