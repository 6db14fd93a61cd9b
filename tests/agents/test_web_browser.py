"""The web chat in headless Chromium: upload, ask, watch the streamed answer and overlay, restart, history kept."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium at /usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, tmp: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "medgym.cli",
        "web",
        "--port",
        str(port),
        "--backend",
        "expert",
        "--db",
        str(tmp / "chat.sqlite"),
        "--data",
        str(tmp / "data"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read().decode()) from None
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("medgym web did not start in 60 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_upload_ask_stream_overlay_and_history_after_restart(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    arr = np.full((200, 240), 30, np.uint8)
    yy, xx = np.mgrid[:200, :240]
    arr[(yy - 100) ** 2 + (xx - 120) ** 2 < 22**2] = 210  # a bright disc at the centre
    png = tmp_path / "disc.png"
    Image.fromarray(arr).save(png)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = start_server(port, tmp_path)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1100, "height": 1400})
            page.goto(url)
            page.set_input_files("#file", str(png))
            expect(page.locator("#preview")).to_be_visible(timeout=20_000)
            page.fill("#question", "How large is the bright disc?")
            page.click("#ask")
            result = page.locator(".msg.result")
            expect(result).to_be_visible(timeout=60_000)
            assert "mm" in result.locator(".answer").inner_text()
            overlay = result.locator("img.overlay")
            expect(overlay).to_be_visible()
            assert overlay.evaluate("img => img.complete && img.naturalWidth") == 240
            tools = page.locator(".msg.tool")
            assert tools.count() == 4 and page.locator(".msg.tool img.tool-image").count() == 3
            assert "Scripted demo (not a model)" in page.locator(".msg.turn").first.inner_text()
            (REPO / "artifacts").mkdir(exist_ok=True)
            page.screenshot(path=str(REPO / "artifacts" / "web_chat.png"), full_page=True)
            session_url = page.url
            assert "#s=" in session_url
            browser.close()
        stop_server(proc)
        proc = start_server(port, tmp_path)  # same DB file: the history must come back
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1100, "height": 1400})
            page.goto(session_url)
            expect(page.locator(".msg.result")).to_have_count(1, timeout=20_000)
            expect(page.locator(".msg.question")).to_contain_text("How large is the bright disc?")
            page.fill("#question", "Is it round?")
            page.click("#ask")
            expect(page.locator(".msg.result")).to_have_count(2, timeout=60_000)
            expect(page.locator(".msg.question")).to_have_count(2)
            page.screenshot(path=str(REPO / "artifacts" / "web_chat_after_restart.png"), full_page=True)
            browser.close()
    finally:
        stop_server(proc)
