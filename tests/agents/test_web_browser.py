"""The web chat in headless Chromium: upload, ask, watch the streamed answer and overlay, restart, history kept.

The server runs with an access token (the page gets it from ``/?token=``, then keeps it in a cookie)
and its Content-Security-Policy: the page must work under both, with no CSP violation reported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgym.agents.local_server import free_port, spawn_web, stop_web

REPO = Path(__file__).resolve().parents[2]
TOKEN = "browser-test-token-0123456789"


def watch_console(page, problems: list[str]) -> None:
    """Collect CSP violations and script errors the page reports."""
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))


def test_upload_ask_stream_overlay_and_history_after_restart(tmp_path, chromium):
    from playwright.sync_api import expect, sync_playwright

    arr = np.full((200, 240), 30, np.uint8)
    yy, xx = np.mgrid[:200, :240]
    arr[(yy - 100) ** 2 + (xx - 120) ** 2 < 22**2] = 210  # a bright disc at the centre
    png = tmp_path / "disc.png"
    Image.fromarray(arr).save(png)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    problems: list[str] = []
    proc = spawn_web(port, tmp_path, token=TOKEN)
    try:
        with sync_playwright() as pw:
            browser = chromium(pw)
            page = browser.new_page(viewport={"width": 1100, "height": 1400})
            page.goto(url)  # no token yet: the page says how to give it
            expect(page.locator("#upload-status")).to_contain_text("/?token=TOKEN", timeout=20_000)
            page.goto(f"{url}?token={TOKEN}")
            assert page.url == url  # the token left the address; a cookie carries it
            watch_console(page, problems)
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
        stop_web(proc)
        proc = spawn_web(port, tmp_path, token=TOKEN)  # same DB file: the history must come back
        with sync_playwright() as pw:
            browser = chromium(pw)
            page = browser.new_page(viewport={"width": 1100, "height": 1400})
            watch_console(page, problems)
            session_hash = session_url[session_url.index("#") :]
            page.goto(f"{url}?token={TOKEN}{session_hash}")  # a fresh browser: token again, session kept
            assert page.url == url + session_hash
            expect(page.locator(".msg.result")).to_have_count(1, timeout=20_000)
            expect(page.locator(".msg.question")).to_contain_text("How large is the bright disc?")
            page.fill("#question", "Is it round?")
            page.click("#ask")
            expect(page.locator(".msg.result")).to_have_count(2, timeout=60_000)
            expect(page.locator(".msg.question")).to_have_count(2)
            page.screenshot(path=str(REPO / "artifacts" / "web_chat_after_restart.png"), full_page=True)
            browser.close()
        assert not problems, problems
    finally:
        stop_web(proc)


@pytest.mark.slow
def test_a_real_dicom_with_the_default_backend_gets_a_parsed_answer_and_the_out_of_domain_note(tmp_path, chromium):
    """The default web chat (the embedded policy, constrained) on a real CT slice: an answer, no format
    error, and the note that the policy is trained on phantoms, shown with the answer and after a reload."""
    from playwright.sync_api import expect, sync_playwright
    from pydicom.data import get_testdata_file

    from medgym.agents.commands import DEFAULT_BACKEND
    from medgym.agents.session import OUT_OF_DOMAIN_NOTE

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    problems: list[str] = []
    proc = spawn_web(port, tmp_path, backend=DEFAULT_BACKEND, token=TOKEN)  # constrained: the default
    try:
        with sync_playwright() as pw:
            browser = chromium(pw)
            page = browser.new_page(viewport={"width": 1100, "height": 1400})
            page.goto(f"{url}?token={TOKEN}")
            watch_console(page, problems)
            page.set_input_files("#file", get_testdata_file("CT_small.dcm"))
            expect(page.locator("#preview")).to_be_visible(timeout=30_000)
            page.fill("#question", "Is there a lesion? If so, how large is it in mm?")
            page.click("#ask")
            # up to 8 turns of the policy on a busy CPU; a failed run shows an error instead of a result
            expect(page.locator(".msg.result, .msg.error").first).to_be_visible(timeout=400_000)
            assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").all_inner_texts()
            result = page.locator(".msg.result")
            expect(result.locator(".note-for-user")).to_have_text(OUT_OF_DOMAIN_NOTE, timeout=20_000)
            assert page.locator(".msg.format_error").count() == 0
            turns = page.locator(".msg.turn")
            assert turns.count() >= 1 and "embedded" in turns.first.inner_text().lower()
            assert all(OUT_OF_DOMAIN_NOTE not in t for t in turns.all_inner_texts())  # the model's turns stay raw
            (REPO / "artifacts").mkdir(exist_ok=True)
            page.screenshot(path=str(REPO / "artifacts" / "web_chat_dicom_default.png"), full_page=True)
            page.reload()  # the history from the server shows the note with the answer again
            expect(page.locator(".msg.result .note-for-user")).to_have_text(OUT_OF_DOMAIN_NOTE, timeout=20_000)
            browser.close()
        assert not problems, problems
    finally:
        stop_web(proc)
