"""Real faults for the reliability tests: a small tmpfs that fills up, kill -9 of a writing process, and a
real address-space limit. Nothing here patches the pack."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_disk(folder: Path, size: str = "2M"):
    """`folder` becomes a tmpfs of `size` for the block (mount needs root; unmounted afterwards)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount, which needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave: int = 0) -> None:
    """Fill the file system of `folder` until at most `leave` bytes are free."""
    filler = folder / "filler.bin"
    with open(filler, "ab") as f:
        while True:
            free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
            if free <= leave:
                break
            try:
                f.write(b"\0" * min(free - leave, 1 << 16))
                f.flush()
            except OSError:
                break


def kill_while_running(argv: list[str], delay_s: float, env=None, ready_line: str | None = None,
                       cwd=None) -> str:
    """Start `argv`, wait for `ready_line` on its stdout (if given), sleep `delay_s`, then SIGKILL it.
    Returns what it printed."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    out = []
    if ready_line is not None:
        deadline = time.time() + 120
        for line in proc.stdout:
            out.append(line)
            if ready_line in line or time.time() > deadline:
                break
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the writer ended by itself ({proc.returncode}):\n{''.join(out)}{rest}"
    return "".join(out) + rest


@contextmanager
def address_space_limit(extra_bytes: int):
    """A real RLIMIT_AS (as `prlimit --as` sets it) of the current address space plus `extra_bytes`, for
    the block; the soft limit is restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (current + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


PYTHON = sys.executable
