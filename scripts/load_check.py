"""Load check for the web chat: N concurrent chat sessions against `medgym web` on loopback.

Starts `medgym web` (expert backend: phantom sessions follow the expert trace, upload sessions run
the scripted demo) on a free port with a temporary DB, runs N sessions at once (half upload a PNG,
half chat over a phantom case), checks every one is answered, restarts the server on the same DB
and checks every history is still there. Prints latency p50/p95 and the total time.

    python scripts/load_check.py [--sessions 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import io
import json
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


def one_session(base: str, i: int) -> dict:
    """Upload (or pick a phantom case), ask, read the stream to the end; the latency of the ask."""
    with httpx.Client(base_url=base, timeout=300) as client:
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
        latency = time.perf_counter() - start
    done = events[-1]
    return {
        "session": events[0]["session_id"],
        "latency": latency,
        "answered": done.get("kind") == "done" and done.get("status") == "answered",
        "answer": done.get("answer"),
        "steps": sum(e.get("kind") == "tool" for e in events),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--keep", default=None, help="folder for the DB and data (default: a temporary one)")
    args = p.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="medgym-load-"))
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = spawn_web(port, folder)
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.sessions) as pool:
            results = list(pool.map(lambda i: one_session(base, i), range(args.sessions)))
        total = time.perf_counter() - t0
    finally:
        stop_web(proc)
    proc = spawn_web(port, folder)
    try:
        missing = []
        for r in results:
            h = httpx.get(f"{base}/api/sessions/{r['session']}", timeout=30)
            msgs = h.json().get("messages", []) if h.status_code == 200 else []
            result = [m for m in msgs if m.get("kind") == "result"]
            if not result or result[-1].get("answer") != r["answer"]:
                missing.append(r["session"])
    finally:
        stop_web(proc)
    lat = sorted(r["latency"] for r in results)
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
    answered = sum(r["answered"] for r in results)
    print(
        f"sessions            {len(results)} concurrent ({sum(1 for i in range(len(results)) if i % 2 == 0)} uploads + demo, "
        f"{len(results) // 2} phantom + expert)"
    )
    print(f"answered            {answered}/{len(results)}")
    print(f"tool calls          {sum(r['steps'] for r in results)}")
    print(f"latency p50         {statistics.median(lat):.2f} s")
    print(f"latency p95         {p95:.2f} s")
    print(f"latency max         {lat[-1]:.2f} s")
    print(f"total (wall)        {total:.2f} s")
    print(f"history after restart  {len(results) - len(missing)}/{len(results)} sessions intact")
    print(f"db                  {folder / 'chat.sqlite'} ({(folder / 'chat.sqlite').stat().st_size / 1e6:.1f} MB)")
    ok = answered == len(results) and not missing
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
