"""The web server's guard, against a real uvicorn server on loopback: body limits, Host, Origin, media
types, the access token, security headers, SQLite work off the event loop, and the CLI's refusal to
serve off loopback without a token."""

from __future__ import annotations

import io
import select
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from medgym import cli
from medgym.agents import web
from medgym.agents.graph import AgentContext
from medgym.agents.local_server import serve_in_thread
from medgym.agents.studies import MAX_UPLOAD_BYTES

TOKEN = "t0ken-for-tests-0123456789"
REPO = Path(__file__).resolve().parents[2]


@contextmanager
def running(folder: Path, **options):
    app = web.create_app(folder / "chat.sqlite", folder / "data", context=AgentContext(backend="expert"), **options)
    with serve_in_thread(app) as base:
        yield base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with running(tmp_path_factory.mktemp("web")) as url:
        yield url


@pytest.fixture(scope="module")
def token_base(tmp_path_factory):
    with running(tmp_path_factory.mktemp("web-token"), token=TOKEN) as url:
        yield url


def png_bytes() -> bytes:
    arr = np.zeros((48, 64), np.uint8)
    arr[10:30, 20:40] = 200
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sent until it closed (it resets the connection over the unread body)."""
    data = b""
    try:
        while part := sock.recv(65536):
            data += part
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def status_and_body(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# 1. body limits --------------------------------------------------------------------------------------------


def test_chunked_upload_of_300_mb_is_refused_while_streaming_and_the_server_stays_up(base):
    """No Content-Length: the guard counts the bytes as they come and answers 413 once past the limit."""
    limit = web.body_limit(web.UPLOAD_PATH)
    port = port_of(base)
    chunk = b"\0" * (1 << 20)
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    preamble = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
    )
    sent = 0
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: multipart/form-data; boundary=XyZ\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + f"{len(preamble):x}\r\n".encode()
            + preamble
            + b"\r\n"
        )
        for _ in range(300):  # 300 MiB if the server never answered
            if select.select([sock], [], [], 0)[0]:
                break  # the answer is in: stop sending
            try:
                sock.sendall(framed)
            except OSError:  # the server closed the connection over the rest of the body
                break
            sent += len(chunk)
        raw = read_response(sock)
    status, body = status_and_body(raw)
    assert status == 413
    assert httpx.Response(413, content=body).json()["error"] == web.ERR_BODY_TOO_LARGE.format(
        limit=limit, path="/api/upload"
    )
    assert limit < sent < limit + 64 * (1 << 20), f"sent {sent} bytes: the server should stop reading at the limit"
    assert time.perf_counter() - start < 30
    assert httpx.get(base + "/").status_code == 200
    r = httpx.post(base + "/api/upload", files={"file": ("scan.png", png_bytes(), "image/png")})
    assert r.status_code == 200, r.text


def test_declared_length_over_the_limit_is_refused_before_the_body_is_sent(base):
    port = port_of(base)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: 300000000\r\n\r\n".encode()
        )
        raw = read_response(sock)  # not one byte of the body sent
    status, body = status_and_body(raw)
    assert status == 413 and b"connection: close" in raw.lower()
    assert b"over the limit of " in body
    r = httpx.post(base + "/api/chat", json={"question": "x" * 40_000, "padding": "y" * 40_000})
    assert r.status_code == 413  # JSON routes have a small limit
    assert r.json()["error"] == web.ERR_BODY_TOO_LARGE.format(limit=web.MAX_JSON_BYTES, path="/api/chat")
    assert httpx.get(base + "/").status_code == 200


def test_the_upload_limit_follows_max_upload_bytes():
    assert web.body_limit("/api/upload") == MAX_UPLOAD_BYTES + web.MULTIPART_OVERHEAD
    assert web.body_limit("/api/chat") == web.MAX_JSON_BYTES


# 2. Host ---------------------------------------------------------------------------------------------------


def test_wrong_host_header_is_refused_with_421(base):
    r = httpx.get(base + "/", headers={"Host": "evil.example:8000"})
    assert r.status_code == 421
    assert r.json()["error"] == web.ERR_BAD_HOST.format(host="evil.example:8000", name="evil.example")
    assert httpx.get(base + "/api/sessions", headers={"Host": "attacker.test"}).status_code == 421
    for host in ("localhost:9999", "127.0.0.1", "[::1]:80", "LOCALHOST"):
        assert httpx.get(base + "/", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_are_configurable(tmp_path):
    with running(tmp_path, allowed_hosts=["chat.lan", "[::1]"]) as url:
        assert httpx.get(url + "/", headers={"Host": "chat.lan:7860"}).status_code == 200
        assert httpx.get(url + "/", headers={"Host": "[::1]:7860"}).status_code == 200
        assert httpx.get(url + "/", headers={"Host": "localhost"}).status_code == 421
        assert httpx.get(url + "/", headers={"Host": "other.lan"}).status_code == 421
    assert web.serving_hosts("0.0.0.0", ["chat.lan"]) == ["127.0.0.1", "localhost", "::1", "chat.lan"]


# 3. media types and Origin ---------------------------------------------------------------------------------


def test_state_changing_requests_take_only_json_or_multipart_uploads(base):
    r = httpx.post(base + "/api/chat", content=b'{"case_seed": 1}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert r.json()["error"] == web.ERR_MEDIA_TYPE.format(
        path="/api/chat", expected="application/json", got="text/plain"
    )
    r = httpx.post(base + "/api/chat", data={"case_seed": "1"})  # a classic cross-site form post
    assert r.status_code == 415
    r = httpx.post(base + "/api/chat", files={"file": ("a.png", b"x")})
    assert r.status_code == 415
    r = httpx.post(base + "/api/upload", json={"file": "x"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]
    assert httpx.delete(base + "/api/sessions").status_code == 415
    r = httpx.post(base + "/api/chat", json={"question": "hi"})  # passes the guard; the app answers
    assert r.status_code == 400 and r.json()["error"] == web.ERR_NEED_STUDY


def test_a_foreign_origin_is_refused_with_403(base):
    for origin in ("http://evil.example", "http://127.0.0.1:1", "null"):
        r = httpx.post(base + "/api/chat", json={"question": "hi"}, headers={"Origin": origin})
        assert r.status_code == 403, origin
        assert r.json()["error"] == web.ERR_BAD_ORIGIN.format(origin=origin, host=base.removeprefix("http://"))
    r = httpx.post(
        base + "/api/upload", files={"file": ("scan.png", png_bytes())}, headers={"Origin": "https://evil.example"}
    )
    assert r.status_code == 403
    r = httpx.post(base + "/api/chat", json={"question": "hi"}, headers={"Origin": base})  # its own page
    assert r.status_code == 400
    assert httpx.get(base + "/api/sessions", headers={"Origin": "http://evil.example"}).status_code == 200


# 4. the access token ---------------------------------------------------------------------------------------


def test_api_calls_need_the_token_when_one_is_set(token_base):
    r = httpx.get(token_base + "/api/sessions")
    assert r.status_code == 401 and r.json()["error"] == web.ERR_NEED_TOKEN
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(token_base + "/api/sessions", headers={"Authorization": "Bearer wrong-token-0123456789"})
    assert r.status_code == 401
    assert httpx.post(token_base + "/api/chat", json={"case_seed": 1}).status_code == 401
    assert httpx.get(token_base + "/api/images/" + "0" * 64 + ".png").status_code == 401
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(token_base + "/api/sessions", headers=bearer).status_code == 200
    r = httpx.post(token_base + "/api/upload", files={"file": ("scan.png", png_bytes())}, headers=bearer)
    assert r.status_code == 200, r.text
    # the page and its files are open: they hold no data, and the page says how to give the token
    assert httpx.get(token_base + "/").status_code == 200
    assert httpx.get(token_base + "/static/app.js").status_code == 200


def test_opening_the_page_with_the_token_sets_the_cookie_the_page_sends(token_base):
    r = httpx.get(token_base + "/?token=wrong-token-0123456789")
    assert r.status_code == 401 and r.json()["error"] == web.ERR_BAD_TOKEN
    with httpx.Client(base_url=token_base, follow_redirects=True) as browser:
        r = browser.get(f"/?token={TOKEN}")
        assert r.status_code == 200 and r.history[0].status_code == 303  # redirected to / without the token
        assert str(r.url) == token_base + "/"
        cookie = r.history[0].headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert browser.get("/api/sessions").status_code == 200
        r = browser.post("/api/upload", files={"file": ("scan.png", png_bytes())})
        assert r.status_code == 200, r.text
        r = browser.post("/api/chat", json={"question": "hi"})  # past the guard: the app's own answer
        assert r.status_code == 400 and r.json()["error"] == web.ERR_NEED_STUDY


def test_a_token_on_loopback_is_honoured_and_a_short_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="use at least 16"):
        web.create_app(tmp_path / "c.sqlite", tmp_path / "data", token="short")
    web.check_token(None, "127.0.0.1")
    web.check_token(None, "::1")
    with pytest.raises(ValueError) as exc:
        web.check_token(None, "0.0.0.0")
    assert str(exc.value) == web.ERR_BIND_NEEDS_TOKEN.format(host="0.0.0.0")


def test_cli_refuses_a_public_address_without_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDGYM_TOKEN", raising=False)
    served = []
    monkeypatch.setattr(web, "serve", lambda *a, **kw: served.append((a, kw)))
    common = ["web", "--db", str(tmp_path / "c.sqlite"), "--data", str(tmp_path / "data")]
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        with pytest.raises(SystemExit) as exc:
            cli.main([*common, "--host", host])
        assert exc.value.code == "medgym web: " + web.ERR_BIND_NEEDS_TOKEN.format(host=host)  # exit status 1
    with pytest.raises(SystemExit) as exc:
        cli.main([*common, "--host", "0.0.0.0", "--token", "short"])
    assert exc.value.code == "medgym web: " + web.ERR_WEAK_TOKEN.format(n=5, min=web.MIN_TOKEN_CHARS)
    assert not served
    monkeypatch.setenv("MEDGYM_TOKEN", TOKEN)
    assert cli.main([*common, "--host", "0.0.0.0", "--allowed-hosts", "chat.lan, 10.0.0.2"]) == 0
    (host, _port, *_), options = served[-1]
    assert host == "0.0.0.0" and options == {"allowed_hosts": ["chat.lan", "10.0.0.2"], "token": TOKEN}
    monkeypatch.delenv("MEDGYM_TOKEN")
    assert cli.main([*common, "--token", TOKEN]) == 0  # loopback with a token
    assert served[-1][1]["token"] == TOKEN


def test_medgym_web_exits_non_zero_off_loopback_without_a_token(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "medgym.cli", "web", "--host", "0.0.0.0", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert web.ERR_BIND_NEEDS_TOKEN.format(host="0.0.0.0") in proc.stderr


# 5. security headers ---------------------------------------------------------------------------------------


def test_every_response_carries_the_security_headers(tmp_path):
    app = web.create_app(tmp_path / "c.sqlite", tmp_path / "data", token=TOKEN)

    def broken() -> list[str]:
        raise RuntimeError("boom")

    app.state.agent.threads = broken  # a 500 from the app's last-resort handler
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with serve_in_thread(app) as url:
        responses = {
            "page": httpx.get(url + "/"),
            "script": httpx.get(url + "/static/app.js"),
            "style": httpx.get(url + "/static/style.css"),
            "missing static": httpx.get(url + "/static/nope.js"),
            "no route": httpx.get(url + "/nowhere"),
            "no token": httpx.get(url + "/api/sessions"),
            "bad host": httpx.get(url + "/", headers={"Host": "evil.example"}),
            "bad type": httpx.post(url + "/api/chat", content=b"x", headers={"Content-Type": "text/plain", **bearer}),
            "bad origin": httpx.post(url + "/api/chat", json={}, headers={"Origin": "http://evil.example", **bearer}),
            "too large": httpx.post(url + "/api/chat", json={"question": "x" * 70_000}, headers=bearer),
            "no image": httpx.get(url + "/api/images/" + "0" * 64 + ".png", headers=bearer),
            "internal error": httpx.get(url + "/api/sessions", headers=bearer),
            "stream": httpx.post(url + "/api/chat", json={"case_seed": 1}, headers=bearer, timeout=120),
        }
    statuses = {name: r.status_code for name, r in responses.items()}
    assert statuses == {
        "page": 200,
        "script": 200,
        "style": 200,
        "missing static": 404,
        "no route": 404,
        "no token": 401,
        "bad host": 421,
        "bad type": 415,
        "bad origin": 403,
        "too large": 413,
        "no image": 404,
        "internal error": 500,
        "stream": 200,
    }
    for name, r in responses.items():
        assert r.headers["content-security-policy"] == web.CONTENT_SECURITY_POLICY, name
        assert r.headers["x-content-type-options"] == "nosniff", name
        assert r.headers["referrer-policy"] == "no-referrer", name
        assert r.headers["x-frame-options"] == "DENY", name
        assert len(r.headers.get_list("content-security-policy")) == 1, name
    assert "default-src 'self'" in web.CONTENT_SECURITY_POLICY and "unsafe-inline" not in web.CONTENT_SECURITY_POLICY


def test_the_page_has_no_inline_script_or_style():
    html = (REPO / "medgym/agents/static/index.html").read_text()
    assert "<script>" not in html and "<style" not in html and " style=" not in html
    assert " onclick=" not in html.lower() and "javascript:" not in html.lower()
    assert '<script src="/static/app.js"></script>' in html


# 6. SQLite and image work off the event loop ---------------------------------------------------------------


def test_slow_sqlite_and_upload_work_do_not_block_other_requests(tmp_path, monkeypatch):
    app = web.create_app(tmp_path / "c.sqlite", tmp_path / "data")
    agent = app.state.agent
    real_state, real_load = agent.state, web.load_upload_bytes

    def slow_state(thread_id):
        time.sleep(1.5)
        return real_state(thread_id)

    def slow_load(data, filename=""):
        time.sleep(1.5)
        return real_load(data, filename)

    agent.state = slow_state
    monkeypatch.setattr(web, "load_upload_bytes", slow_load)
    with serve_in_thread(app) as url:
        results: dict[str, int] = {}
        slow = [
            threading.Thread(target=lambda: results.update(chat=httpx.post(url + "/api/chat", json={}).status_code)),
            threading.Thread(
                target=lambda: results.update(
                    upload=httpx.post(url + "/api/upload", files={"file": ("a.png", png_bytes())}).status_code
                )
            ),
        ]
        for t in slow:
            t.start()
        time.sleep(0.4)  # both are inside their slow calls now
        start = time.perf_counter()
        assert httpx.get(url + "/static/style.css").status_code == 200
        took = time.perf_counter() - start
        for t in slow:
            t.join(timeout=30)
    assert results == {"chat": 400, "upload": 200}
    assert took < 0.8, f"a static file took {took:.2f} s while slow work ran: the event loop was blocked"


# 7. the load check ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_load_check_50_concurrent_sessions():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "load_check.py"), "--sessions", "50"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "errors              0" in proc.stdout and "50/50 sessions intact" in proc.stdout
