"""Running the web chat on loopback: ``medgym web`` as a child process (load checks, browser tests,
demos) or an app in a background thread (API tests against a real server)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_web(
    port: int, folder: Path, backend: str = "expert", timeout: float = 90.0, token: str | None = None
) -> subprocess.Popen:
    """Start ``medgym web`` with its database and data under ``folder``; return once it answers.

    ``token`` reaches the server as ``$MEDGYM_TOKEN`` (a command line is visible to other users).
    """
    cmd = [sys.executable, "-m", "medgym.cli", "web", "--port", str(port), "--backend", backend]
    cmd += ["--db", str(folder / "chat.sqlite"), "--data", str(folder / "data")]
    env = {k: v for k, v in os.environ.items() if k != "MEDGYM_TOKEN"}
    if token:
        env["MEDGYM_TOKEN"] = token
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()  # the page needs no token
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


@contextmanager
def serve_in_thread(app: Any, timeout: float = 30.0) -> Iterator[str]:
    """Serve an ASGI ``app`` with uvicorn on a free loopback port in a daemon thread; yield its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError(f"the test server did not start on port {port} within {timeout:g} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
