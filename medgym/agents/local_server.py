"""Running ``medgym web`` as a child process on loopback (load checks, browser tests, demos)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_web(port: int, folder: Path, backend: str = "expert", timeout: float = 90.0) -> subprocess.Popen:
    """Start ``medgym web`` with its database and data under ``folder``; return once it answers."""
    cmd = [sys.executable, "-m", "medgym.cli", "web", "--port", str(port), "--backend", backend]
    cmd += ["--db", str(folder / "chat.sqlite"), "--data", str(folder / "data")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise RuntimeError(f"medgym web exited: {out[-2000:]}") from None
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"medgym web did not answer within {timeout:g} s")


def stop_web(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop the server politely, then forcefully."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
