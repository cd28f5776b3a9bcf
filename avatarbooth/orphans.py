"""Children that do not outlive their parent: ``python -m avatarbooth.orphans PID SIGNAL -- CMD...``.

`avatarbooth run`/`chat` start the worker and the embedded Valkey through this launcher. It asks
Linux to send SIGNAL to it when the process that started it dies (``PR_SET_PDEATHSIG``, which
survives ``execve``), checks that PID is still its parent (it may have died already), and then
becomes CMD. A SIGKILLed chat process thus takes its worker (and the GPU memory it holds) and its
Valkey with it, within milliseconds. Elsewhere than Linux the launcher just runs CMD.

The death signal fires when the *thread* that started the child ends, so children must be started
from a thread that lives as long as the process (the event loop's).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1


def guarded(command: Sequence[str], *, on_parent_death: signal.Signals = signal.SIGKILL) -> list[str]:
    """``command`` run through this launcher, tied to the current process."""
    return [sys.executable, "-m", "avatarbooth.orphans", str(os.getpid()), str(int(on_parent_death)), "--", *command]


def _tie_to(parent: int, sig: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the signal was set up
        raise SystemExit(1)


def main(argv: Sequence[str]) -> None:
    if len(argv) < 4 or argv[2] != "--":
        raise SystemExit("usage: python -m avatarbooth.orphans PARENT_PID SIGNAL -- COMMAND...")
    _tie_to(int(argv[0]), int(argv[1]))
    command = list(argv[3:])
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
