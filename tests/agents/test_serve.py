"""``medgym serve``: local policies behind an OpenAI-compatible endpoint, through the real client on loopback."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from medgym.agents import serve as serve_module
from medgym.agents.backends import DemoBackend, EmbeddedBackend, OpenAIBackend, openai_messages, png_data_url
from medgym.agents.graph import AgentContext
from medgym.agents.local_server import serve_in_thread
from medgym.agents.serve import ChatCompletionRequest, contract_messages, create_app
from medgym.agents.session import ChatAgent
from medgym.agents.web import ERR_BIND_NEEDS_TOKEN
from medgym.environments.contract import tool_schemas
from medgym.environments.parsing import parse_action

PHANTOM = {"kind": "phantom", "seed": 4}
TOKEN = "t0ken-for-the-serve-tests"


class Recording:
    """A policy that records what it is shown and what it writes (on either side of the wire)."""

    def __init__(self, policy):
        self.policy = policy
        self.model_id = policy.model_id
        self.shown: list[list[dict]] = []
        self.turns: list[str] = []

    def next_turn(self, messages, *, temperature=0.0):
        self.shown.append(messages)
        self.turns.append(self.policy.next_turn(messages, temperature=temperature))
        return self.turns[-1]


@contextmanager
def served(policy, **options) -> Iterator[str]:
    """``policy`` served on a free loopback port; yields the base URL the OpenAI client takes (``.../v1``)."""
    with serve_in_thread(create_app(policy, **options)) as url:
        yield url + "/v1"


def chat_run(backend, folder: Path, **context):
    """One chat question over the phantom case, through the agent graph: (done event, history)."""
    ctx = AgentContext(backend=backend, data_dir=str(folder), segmenter="threshold", **context)
    with ChatAgent(folder / "chat.sqlite", ctx) as agent:
        done = agent.run("t", "", PHANTOM)
        return done, agent.history("t")


def same_view(sent: list[dict], got: list[dict]) -> None:
    """The served policy read what the client's policy view held: roles, texts, tool names, pixels."""
    assert [m["role"] for m in got] == [m["role"] for m in sent]
    for a, b in zip(sent, got, strict=True):
        assert b["content"] == a["content"]
        assert b.get("name") == (a.get("name") if a["role"] == "tool" else None)
        assert len(b["images"]) == len(a.get("images") or [])
        for x, y in zip(a.get("images") or [], b["images"], strict=True):
            assert y.dtype == np.uint8 and y.ndim == 3 and y.shape[2] == 3
            assert np.array_equal(np.asarray(x), y)


def post(url: str, body, **headers) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{url}/chat/completions", content=content, headers={"Content-Type": "application/json", **headers}, timeout=30
    )


def question(*parts) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}]}


def png_part(size: int = 16) -> dict:
    return {"type": "image_url", "image_url": {"url": png_data_url(np.full((size, size, 3), 90, np.uint8))}}


# ----------------------------------------------------------------------------- the client talks to the server


def test_demo_policy_calls_tools_and_answers_through_the_openai_client(tmp_path):
    """The chat graph with OpenAIBackend against `medgym serve --policy demo` runs as with the demo in process."""
    demo = Recording(DemoBackend())
    with served(demo) as url:
        client = Recording(OpenAIBackend(demo.model_id, base_url=url, api_key="unused"))
        done, history = chat_run(client, tmp_path / "served")
    local_done, local_history = chat_run(DemoBackend(), tmp_path / "local")

    assert done["status"] == "answered" and done["answer"] == local_done["answer"] and "mm" in done["answer"]
    assert done["box"] == local_done["box"]
    tools = [m["name"] for m in history if m["role"] == "tool"]
    assert (
        tools == [m["name"] for m in local_history if m["role"] == "tool"] == ["zoom", "window", "segment", "measure"]
    )
    # every turn crossed the wire: the client got structured tool calls back and wrote them as turns
    assert len(demo.turns) == len(client.turns) == 5
    for served_turn, client_turn in zip(demo.turns, client.turns, strict=True):
        a, b = parse_action(served_turn), parse_action(client_turn)
        assert (a.calls, a.answer, a.box, a.error) == (b.calls, b.answer, b.box, b.error)
    # and the served policy read what the client's policy view held, tool pictures on the tool turns as arrays
    for sent, got in zip(client.shown, demo.shown, strict=True):
        same_view(sent, got)
    last = demo.shown[-1]
    assert [len(m["images"]) for m in last if m["role"] == "tool"] == [1, 1, 1, 0]
    assert next(m for m in last if m["role"] == "tool" and m["name"] == "zoom")["images"][0].shape == (224, 224, 3)
    assert [m.get("kind") for m in last if m["role"] == "user"] == ["question"]


def test_embedded_policy_serves_its_turns_to_the_chat_graph(tmp_path):
    """The shipped embedded policy behind the server: the graph runs on its turns, as the model wrote them."""
    policy = Recording(EmbeddedBackend(max_new_tokens=48))  # short turns: this checks the plumbing, not the model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 3M-parameter model: one thread is the fastest, and much faster on a busy CPU
    try:
        with served(policy) as url:
            client = OpenAIBackend(policy.model_id, base_url=url, api_key="unused")
            done, history = chat_run(client, tmp_path, max_steps=2)
    finally:
        torch.set_num_threads(threads)
    assert done["status"] in ("answered", "truncated")
    turns = [m for m in history if m["role"] == "assistant"]
    assert len(turns) == len(policy.turns) >= 1
    assert all(t["model_id"] == f"openai:{policy.model_id}" for t in turns)
    for turn, raw in zip(turns, policy.turns, strict=True):
        a, b = parse_action(raw), parse_action(turn["content"])
        assert (a.calls, a.answer, a.box, a.error) == (b.calls, b.answer, b.box, b.error)
    for k, view in enumerate(policy.shown):  # the model's earlier turns came back to it as it wrote them
        back = [parse_action(m["content"]) for m in view if m["role"] == "assistant"]
        wrote = [parse_action(t) for t in policy.turns[:k]]
        assert [(a.calls, a.answer, a.error) for a in back] == [(a.calls, a.answer, a.error) for a in wrote]
    first = policy.shown[0]
    assert [m["role"] for m in first] == ["system", "user"] and first[1]["images"][0].shape == (256, 256, 3)


def test_eval_against_the_served_demo_prints_the_same_summary_as_the_demo_itself(tmp_path, capsys):
    from medgym.cli import main
    from medgym.environments.evaluate import SUMMARY_KEYS

    summaries = {}
    with served(DemoBackend()) as url:
        for spec in (f"openai:scripted-demo@{url}", "demo"):
            out = tmp_path / spec.split(":")[0]
            argv = ["eval", "--policy", spec, "--n", "2", "--json", "--segmenter", "threshold", "--out", str(out)]
            assert main(argv) == 0
            summaries[spec] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    remote, local = summaries.values()
    assert tuple(remote) == tuple(local) == SUMMARY_KEYS
    assert remote["policy"] == "openai:scripted-demo" and local["policy"] == "scripted-demo"
    same = [k for k in SUMMARY_KEYS if k not in ("policy", "seconds_per_turn", "traces")]
    assert {k: remote[k] for k in same} == {k: local[k] for k in same}
    assert remote["tool_calls"] > 0


def test_models_lists_the_served_policy():
    with served(DemoBackend()) as url:
        models = openai.OpenAI(base_url=url, api_key="unused").models.list()
    assert [m.id for m in models.data] == ["scripted-demo"]


def test_the_reply_has_openai_shape_with_ids_usage_and_finish_reasons():
    turns = iter(
        ['Look. <tool_call>{"name": "zoom", "arguments": {"boxes": [[0, 0, 8, 8]]}}</tool_call>', "<answer>7</answer>"]
    )

    class TwoTurns:
        model_id = "two-turns"

        def next_turn(self, messages, *, temperature=0.0):
            return next(turns)

    with served(TwoTurns()) as url:
        client = openai.OpenAI(base_url=url, api_key="unused")
        ask = {"model": "anything", "messages": [{"role": "user", "content": "q"}], "tools": tool_schemas()}
        first = client.chat.completions.create(**ask)
        second = client.chat.completions.create(**ask)
    assert first.id.startswith("chatcmpl-") and first.created > 0 and first.model == "two-turns"
    assert first.usage is not None and first.usage.total_tokens == 0
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Look."
    call = choice.message.tool_calls[0]
    assert call.id and call.type == "function" and call.function.name == "zoom"
    assert json.loads(call.function.arguments) == {"boxes": [[0, 0, 8, 8]]}
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.content == "<answer>7</answer>"
    assert not second.choices[0].message.tool_calls


# ----------------------------------------------------------------------------- what enters is checked


def test_bad_input_gets_a_readable_400_and_the_server_keeps_answering(monkeypatch):
    monkeypatch.setattr(serve_module, "MAX_IMAGE_SIDE", 32)
    monkeypatch.setattr(serve_module, "MAX_IMAGES", 4)
    monkeypatch.setattr(serve_module, "MAX_REQUEST_PIXELS", 600)  # two 16-pixel squares, not three
    bad_png = "data:image/png;base64," + base64.b64encode(b"this is not a png").decode()
    cases = {
        "never fetches a URL": (question(png_part(), {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}), "only data: URLs"),
        "corrupt base64": (question({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not base64@@"}}), "not valid base64"),
        "not an image": (question({"type": "image_url", "image_url": {"url": bad_png}}), "could not be decoded"),
        "image type": (question({"type": "image_url", "image_url": {"url": "data:image/svg+xml;base64,PHN2Zy8+"}}), "not accepted"),
        "over-size image": (question(png_part(64)), "more than 32 on a side"),
        "too many pixels": (question(png_part(), png_part(), png_part()), "more than 600 pixels in all"),
        "too many images": (question(*[png_part(8)] * 5), "more than 4 images"),
        "no role": ({"model": "m", "messages": [{"content": "hi"}]}, "messages.0.role"),
        "messages not a list": ({"model": "m", "messages": "hi"}, "messages"),
        "no messages": ({"model": "m", "messages": []}, "messages"),
        "unknown part": (question({"type": "input_audio", "input_audio": {}}), "messages.0.content"),
        "image on an assistant turn": ({"model": "m", "messages": [{"role": "assistant", "content": [png_part()]}]}, "cannot hold images"),
        "orphan tool result": ({"model": "m", "messages": [{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "c9", "content": "x"}]}, "answers no earlier"),
        "streaming": ({**question(png_part()), "stream": True}, "streaming is not supported"),
        "not JSON": (b"{not json", "Bad request"),
    }  # fmt: skip
    good = question(png_part(), {"type": "text", "text": "CT image. What is it?"})
    with served(DemoBackend()) as url:
        for name, (body, expected) in cases.items():
            response = post(url, body)
            assert response.status_code == 400, name
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and expected in error["message"], (name, error)
            assert post(url, good).status_code == 200, f"the server stopped answering after: {name}"
        # the official client surfaces the message
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="never fetches a URL"):
            client.chat.completions.create(
                **question({"type": "image_url", "image_url": {"url": "https://x.org/a.png"}})
            )
        # a body over the limit is refused before it is read; a form post is refused outright
        monkeypatch.setattr(serve_module, "MAX_REQUEST_BYTES", 1000)
        too_large = post(url, question(png_part(), {"type": "text", "text": "x" * 2000}))
        assert too_large.status_code == 413 and "over the limit" in too_large.json()["error"]["message"]
        form = httpx.post(f"{url}/chat/completions", content="a=b", headers={"Content-Type": "text/plain"})
        assert form.status_code == 415 and "must be JSON" in form.json()["error"]["message"]
        missing = httpx.get(f"{url}/chat")
        assert missing.status_code == 404 and "GET /v1/models" in missing.json()["error"]["message"]
        monkeypatch.setattr(serve_module, "MAX_REQUEST_BYTES", 1 << 20)
        assert post(url, good).json()["choices"][0]["finish_reason"] == "tool_calls"


def test_a_crashing_policy_answers_500_and_the_server_stays_up():
    class Flaky:
        model_id = "flaky"
        n = 0

        def next_turn(self, messages, *, temperature=0.0):
            self.n += 1
            if self.n == 1:
                raise RuntimeError("out of memory")
            return "<answer>ok</answer>"

    with served(Flaky()) as url:
        failed = post(url, question({"type": "text", "text": "q"}))
        assert failed.status_code == 500 and "RuntimeError: out of memory" in failed.json()["error"]["message"]
        assert (
            post(url, question({"type": "text", "text": "q"})).json()["choices"][0]["message"]["content"]
            == "<answer>ok</answer>"
        )


def test_openai_messages_come_back_as_the_contract_messages_they_were_made_from():
    """The inverse of the client's conversion: notes stay notes, follow-ups are questions, tool pictures return."""
    img = np.arange(12 * 10 * 3, dtype=np.uint8).reshape(12, 10, 3)
    crop = np.full((5, 7, 3), 200, np.uint8)
    call = '<tool_call>{"name": "zoom", "arguments": {"boxes": [[0, 0, 5, 5]]}}</tool_call>'
    sent = [
        {"role": "system", "content": "sys", "images": []},
        {"role": "user", "kind": "question", "content": "CT image. Q?", "images": [img]},
        {"role": "assistant", "content": "hmm", "images": []},
        {"role": "user", "kind": "format_error", "content": "Format error: no <tool_call> or <answer> found.", "images": []},
        {"role": "assistant", "content": "Zoom." + call, "images": []},
        {"role": "tool", "name": "zoom", "content": "[zoom] Zoomed.", "images": [crop]},
        {"role": "assistant", "content": "<answer>3</answer>", "images": []},
        {"role": "user", "kind": "question", "content": "And the prior?", "images": []},
    ]  # fmt: skip
    wire = ChatCompletionRequest.model_validate({"model": "m", "messages": openai_messages(sent)})
    got = contract_messages(wire.messages)
    same_view(sent, got)
    assert [m.get("kind") for m in got if m["role"] == "user"] == ["question", "format_error", "question"]
    tool = next(m for m in got if m["role"] == "tool")
    assert tool["arguments"] == {"boxes": [[0, 0, 5, 5]]} and tool["text"] == "Zoomed."


# ----------------------------------------------------------------------------- who may call, and how many at once


def test_a_token_is_needed_off_loopback_and_checked_on_every_route(monkeypatch, capsys):
    from medgym.cli import main

    monkeypatch.delenv("MEDGYM_TOKEN", raising=False)
    monkeypatch.setattr(serve_module, "serve", lambda *a, **k: pytest.fail("must refuse before serving"))
    with pytest.raises(SystemExit, match="medgym serve: Refusing to serve on 0.0.0.0") as refused:
        main(["serve", "--policy", "demo", "--host", "0.0.0.0"])
    assert str(refused.value).endswith(ERR_BIND_NEEDS_TOKEN.format(host="0.0.0.0"))
    with pytest.raises(SystemExit, match="cannot be served"):
        main(["serve", "--policy", "expert"])

    with served(DemoBackend(), token=TOKEN) as url:
        denied = httpx.get(f"{url}/models")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert (
            httpx.get(f"{url}/models", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
        )
        models = openai.OpenAI(base_url=url, api_key=TOKEN).models.list()
        assert [m.id for m in models.data] == ["scripted-demo"]
        turn = OpenAIBackend("m", base_url=url, api_key=TOKEN).next_turn(
            [{"role": "user", "content": "CT image.", "images": [np.zeros((20, 20, 3), np.uint8)]}]
        )
        assert parse_action(turn).calls[0]["name"] == "zoom"
    # without a token only loopback names are answered (no DNS rebinding)
    with served(DemoBackend()) as url:
        rebound = httpx.get(f"{url}/models", headers={"Host": "evil.example:8000"})
        assert rebound.status_code == 421 and "loopback" in rebound.json()["error"]["message"]
        assert httpx.get(f"{url}/models", headers={"Host": "localhost"}).status_code == 200


def test_turns_run_one_at_a_time_off_the_event_loop():
    entered, release = threading.Semaphore(0), threading.Event()
    running, most = [0], [0]
    guard = threading.Lock()

    class Blocking:
        model_id = "blocking"

        def next_turn(self, messages, *, temperature=0.0):
            with guard:
                running[0] += 1
                most[0] = max(most[0], running[0])
            entered.release()
            release.wait(timeout=30)
            with guard:
                running[0] -= 1
            return "<answer>done</answer>"

    with served(Blocking()) as url:
        replies: list[httpx.Response] = []
        body = question({"type": "text", "text": "q"})
        workers = [threading.Thread(target=lambda: replies.append(post(url, body))) for _ in range(2)]
        for w in workers:
            w.start()
        assert entered.acquire(timeout=30)  # one turn is running
        # the event loop is free: other routes answer while a turn blocks
        assert httpx.get(f"{url}/models", timeout=10).status_code == 200
        assert not entered.acquire(timeout=0.5)  # the second turn waits for the first
        release.set()
        for w in workers:
            w.join(timeout=30)
    assert [r.status_code for r in replies] == [200, 200] and most[0] == 1
