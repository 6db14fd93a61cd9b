"""The OpenAI-compatible backend against a small chat-completions server on 127.0.0.1, through the official client."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from PIL import Image

from medgym.agents.backends import OpenAIBackend
from medgym.agents.graph import AgentContext
from medgym.agents.session import ChatAgent
from medgym.tools import TOOLS

SCRIPT = [
    # 1: a native tool call
    {
        "content": "Let me look closer.",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "zoom", "arguments": '{"boxes": [[40, 40, 120, 120]]}'},
            }
        ],
    },
    # 2: a tool call written as text (the fallback some servers produce)
    {
        "content": '<tool_call>{"name": "segment", "arguments": {"box": [90, 90, 170, 170]}}</tool_call>',
        "tool_calls": None,
    },
    # 3: the answer
    {"content": "<answer>one lesion</answer>", "tool_calls": None},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    received: list[dict] = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        body = await request.json()
        received.append(body)
        turn = SCRIPT[min(len(received) - 1, len(SCRIPT) - 1)]
        message = {"role": "assistant", "content": turn["content"]}
        if turn["tool_calls"]:
            message["tool_calls"] = turn["tool_calls"]
        return {
            "id": f"chatcmpl-{len(received)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {"index": 0, "message": message, "finish_reason": "tool_calls" if turn["tool_calls"] else "stop"}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", received
    srv.should_exit = True
    thread.join(timeout=10)


def _data_url_images(message: dict) -> list[Image.Image]:
    out = []
    for part in message.get("content") or []:
        if isinstance(part, dict) and part.get("type") == "image_url":
            url = part["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            out.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    return out


def test_openai_backend_tool_calls_images_and_answer(server, tmp_path):
    base_url, received = server
    backend = OpenAIBackend("tiny-vlm", base_url=base_url, api_key="test")
    with ChatAgent(tmp_path / "c.sqlite", AgentContext(backend=backend, data_dir=str(tmp_path))) as agent:
        done = agent.run("t", "How many lesions?", {"kind": "phantom", "seed": 4})
        history = agent.history("t")
    assert done["status"] == "answered" and done["answer"] == "one lesion"
    assert [m["name"] for m in history if m["role"] == "tool"] == ["zoom", "segment"]
    assert len(received) == 3
    first, second, third = received
    # tools in the standard format, the question image as a data URL
    assert first["model"] == "tiny-vlm"
    assert sorted(t["function"]["name"] for t in first["tools"]) == sorted(TOOLS)
    assert all(t["type"] == "function" for t in first["tools"])
    assert first["messages"][0]["role"] == "system"
    assert len(_data_url_images(first["messages"][1])) >= 1
    # after the zoom: the call, its tool result, then the crop as an image the model sees
    msgs = second["messages"]
    call = next(m for m in msgs if m["role"] == "assistant")
    assert call["tool_calls"][0]["function"]["name"] == "zoom"
    tool = next(m for m in msgs if m["role"] == "tool")
    assert tool["tool_call_id"] == call["tool_calls"][0]["id"] and tool["content"].startswith("[zoom] Zoomed")
    crops = _data_url_images(msgs[-1])
    assert len(crops) == 1 and max(crops[0].size) == 224
    # the text-fallback segment call ran, and its overlay reached the model too
    assert len(_data_url_images(third["messages"][-1])) == 1
    assert "segment" in [m["tool_calls"][0]["function"]["name"] for m in third["messages"] if m.get("tool_calls")]


def test_eval_prints_the_same_summary_for_an_endpoint_and_the_embedded_policy(server, tmp_path, capsys):
    """medgym eval --policy openai:MODEL@URL goes through the one policy protocol, as embedded and expert do."""
    import json

    from medgym.cli import main
    from medgym.environments.evaluate import SUMMARY_KEYS

    base_url, received = server
    summaries = {}
    for spec in (f"openai:tiny-vlm@{base_url}", "embedded", "expert"):
        out = tmp_path / spec.split(":")[0]
        assert main(["eval", "--policy", spec, "--n", "2", "--seed", "3", "--segmenter", "threshold",
                     "--json", "--out", str(out)]) == 0  # fmt: skip
        summaries[spec] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (out / "traces.jsonl").exists()
    assert all(tuple(s) == SUMMARY_KEYS for s in summaries.values())
    assert summaries[f"openai:tiny-vlm@{base_url}"]["policy"] == "openai:tiny-vlm" or received
    assert len(received) >= 2 and all(r["model"] == "tiny-vlm" for r in received)
