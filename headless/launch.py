"""`--nproc N`: start N ranks of the headless runner on this machine, as torchrun would (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT in their environment), and watch them: when one fails or dies, the others
get a short grace to report their own error and are then stopped, so no rank is left waiting.
Ctrl-C is passed on to every rank once (they agree on a step to stop after, and checkpoint it).
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

MAIN = Path(__file__).resolve().with_name("__main__.py")
GRACE_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """Linux: a rank gets SIGTERM when the launcher dies, even by kill -9."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def launch(argv: list[str], nproc: int, cpu: bool) -> int:
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        # Own session: a terminal's Ctrl-C reaches the launcher only, which passes it on exactly once.
        procs.append(subprocess.Popen([sys.executable, str(MAIN), *argv], env=env, start_new_session=True,
                                      preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None))
        print(f"[launcher] rank {rank}: pid {procs[-1].pid}", flush=True)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    codes: list[int | None] = [None] * nproc
    failed_at = None
    try:
        while any(c is None for c in codes):
            for rank, p in enumerate(procs):
                if codes[rank] is None and p.poll() is not None:
                    codes[rank] = p.returncode
                    if p.returncode != 0 and failed_at is None:
                        failed_at = time.monotonic()
                        how = f"was killed by signal {-p.returncode}" if p.returncode < 0 else \
                            "was cancelled" if p.returncode == 130 else f"exited with {p.returncode}"
                        print(f"[launcher] rank {rank} {how}; stopping the other ranks", file=sys.stderr, flush=True)
            if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                if time.monotonic() - failed_at > GRACE_S + 10:
                    for p in procs:
                        if p.poll() is None:
                            p.kill()
            time.sleep(0.1)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
    if all(c == 0 for c in codes):
        return 0
    return exit_status(codes[0]) if codes[0] != 0 else exit_status(next(c for c in codes if c != 0))
