"""Load check for the web chat: N concurrent chat sessions against `medgym web` on loopback.

Starts `medgym web` (expert backend: phantom sessions follow the expert trace, upload sessions run
the scripted demo) on a free port with a temporary DB and an access token (every call goes through
the request guard), runs N sessions at once (half upload a PNG, half chat over a phantom case),
checks every one is answered with no error, restarts the server on the same DB and checks every
history is still there. Prints throughput, latency p50/p95 and the total time; exits 1 on any failure.

    python scripts/load_check.py [--sessions 50] [--keep DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import secrets
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from medgym.agents.local_server import free_port, spawn_web, stop_web


def picture(i: int) -> bytes:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 40, (256, 256)).astype(np.uint8)
    yy, xx = np.mgrid[:256, :256]
    r = 15 + 3 * (i % 7)
    arr[(yy - 128) ** 2 + (xx - 128) ** 2 < r * r] = 200
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def one_session(base: str, token: str, i: int) -> dict:
    """Upload (or pick a phantom case), ask, read the stream to the end; the latency of the ask.

    Never raises: a failure is reported in ``error``.
    """
    result: dict = {"i": i, "session": None, "latency": None, "answered": False, "answer": None, "steps": 0}
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=base, timeout=600, headers=headers) as client:
            body: dict = {"question": "How large is the object in the centre?"}
            if i % 2 == 0:
                r = client.post("/api/upload", files={"file": (f"s{i}.png", picture(i), "image/png")})
                r.raise_for_status()
                body["upload_id"] = r.json()["upload_id"]
            else:
                body = {"case_seed": i, "question": ""}
            start = time.perf_counter()
            events = []
            with client.stream("POST", "/api/chat", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.strip():
                        events.append(json.loads(line))
            result["latency"] = time.perf_counter() - start
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    done = events[-1] if events else {}
    errors = [e.get("content") for e in events if e.get("kind") == "error"]
    result.update(
        session=events[0].get("session_id") if events else None,
        answered=done.get("kind") == "done" and done.get("status") == "answered",
        status=done.get("status"),
        answer=done.get("answer"),
        steps=sum(e.get("kind") == "tool" for e in events),
    )
    if errors:
        result["error"] = "; ".join(map(str, errors))
    return result


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--keep", default=None, help="folder for the DB and data (default: a temporary one)")
    args = p.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="medgym-load-"))
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    token = secrets.token_urlsafe()
    proc = spawn_web(port, folder, token=token)
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.sessions) as pool:
            results = list(pool.map(lambda i: one_session(base, token, i), range(args.sessions)))
        total = time.perf_counter() - t0
    finally:
        stop_web(proc)
    proc = spawn_web(port, folder, token=token)
    try:
        missing = []
        for r in results:
            if r["session"] is None:
                missing.append(f"#{r['i']} (no session)")
                continue
            h = httpx.get(
                f"{base}/api/sessions/{r['session']}", timeout=60, headers={"Authorization": f"Bearer {token}"}
            )
            msgs = h.json().get("messages", []) if h.status_code == 200 else []
            result = [m for m in msgs if m.get("kind") == "result"]
            if not result or result[-1].get("answer") != r["answer"]:
                missing.append(r["session"])
    finally:
        stop_web(proc)
    n = len(results)
    errors = [r for r in results if r.get("error")]
    unanswered = [r for r in results if not r["answered"]]
    lat = [r["latency"] for r in results if r["latency"] is not None]
    uploads = sum(1 for i in range(n) if i % 2 == 0)
    print(f"sessions            {n} concurrent ({uploads} uploads + demo, {n - uploads} phantom + expert)")
    print(f"answered            {n - len(unanswered)}/{n}")
    print(f"errors              {len(errors)}")
    print(f"tool calls          {sum(r['steps'] for r in results)}")
    print(
        f"throughput          {n / total:.2f} sessions/s ({sum(r['steps'] for r in results) / total:.1f} tool calls/s)"
    )
    if lat:
        print(f"latency p50         {statistics.median(lat):.2f} s")
        print(f"latency p95         {percentile(lat, 0.95):.2f} s")
        print(f"latency max         {max(lat):.2f} s")
    print(f"total (wall)        {total:.2f} s")
    print(f"history after restart  {n - len(missing)}/{n} sessions intact")
    print(f"db                  {folder / 'chat.sqlite'} ({(folder / 'chat.sqlite').stat().st_size / 1e6:.1f} MB)")
    for r in (errors + [r for r in unanswered if not r.get("error")])[:10]:
        print(f"  session #{r['i']}: status {r.get('status')}, {r.get('error') or 'no answer'}")
    ok = not unanswered and not errors and not missing
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
