"""``medgym serve``: any local policy behind an OpenAI-compatible chat-completions endpoint.

Routes: ``POST /v1/chat/completions`` and ``GET /v1/models``. A request is checked by pydantic,
turned into the contract's messages (:mod:`medgym.environments.contract`), given to the policy's
one method (``next_turn``), and the turn comes back in OpenAI's shape. The conversion is the
inverse of :func:`medgym.agents.backends.openai_messages`, the client side, so a policy behind
``medgym serve`` reads through :class:`~medgym.agents.backends.OpenAIBackend` what it would read
in process:

- content is a string or a list of ``text`` and ``image_url`` parts; an image must be a ``data:``
  URL (PNG, JPEG or WebP) and becomes an RGB uint8 array. A URL is never fetched;
- assistant ``tool_calls`` become ``<tool_call>`` blocks again (medgym's turn format);
- a ``tool`` message is named after the call it answers (``tool_call_id``). The ``tool`` role carries
  only text in the OpenAI API, so clients send the tools' images in the user message right after;
  those images go back onto the tool turn (all of them onto its last message: which call made which
  picture is not sent);
- a user message without images is a new question, unless it is a runtime note (the parser's
  ``Format error: ...``, the runner's ``Error: ...``) after a turn that did not answer: scripted
  policies count their turns from the last question.

The reply: a turn that parses to tool calls gives ``message.tool_calls`` (ids, ``type: function``,
the arguments as a JSON string), the text around the calls as ``content`` and
``finish_reason: "tool_calls"``; any other turn (an answer, or text the parser refuses) is the
``content``, with ``finish_reason: "stop"``: the client's parser, the env's, judges it.
``tools`` are validated and otherwise ignored (the policy knows medgym's tools), and so are sampling
settings besides ``temperature`` (0, greedy, when left out). ``model`` may be any name: one policy
is served, and the reply names it. Token counts in ``usage`` are 0 (not counted).

Safety, as ``medgym web``: loopback by default. Without a token the server answers only loopback
``Host`` names (a DNS-rebinding page cannot reach it); another bind address needs a token
(:func:`medgym.agents.web.check_token`), sent as ``Authorization: Bearer TOKEN`` (OpenAI clients'
API key). A POST must carry JSON (browsers cannot send that cross-site without asking first), the
body is counted as it arrives and refused past :data:`MAX_REQUEST_BYTES`, and images are bounded
in bytes, pixels and number. Every error, ours or the framework's, is OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with a message that says what to change.

Turns run one at a time (a lock per served policy) in a worker thread, off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medgym.agents.backends import BackendUnavailable, calls_text
from medgym.agents.studies import MAX_SIDE
from medgym.agents.web import check_token, host_name, serving_hosts
from medgym.environments.contract import Message
from medgym.environments.parsing import InvalidJSON, load_json, parse_action
from medgym.environments.policies import Policy

log = logging.getLogger(__name__)

# Limits, read at call time (tests lower them).
MAX_REQUEST_BYTES = 64 * 1024 * 1024  # a whole request: a conversation with its pictures
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # one picture's file (OpenAI's own limit)
MAX_IMAGE_SIDE = MAX_SIDE  # pixels on a side, as for uploads to `medgym web`
MAX_IMAGES = 64  # pictures in one request
MAX_REQUEST_PIXELS = 100_000_000  # pixels over all of a request's pictures (decoded RGB: 3 bytes each)
MAX_MESSAGES = 1000

IMAGE_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),(?P<data>.*)$", re.S)
TOOL_CALL_BLOCK = re.compile(r"<tool_call>.*?</tool_call>", re.S)
TOOL_IMAGES_TEXT = "Images returned by the tools:"  # what OpenAIBackend writes before the tools' pictures
NOTE_PREFIXES = ("Format error", "Error:")  # the parser's and the call runner's notes to the model

ERR_NOT_DATA_URL = (
    "{where}: only data: URLs are accepted (data:image/png;base64,...); this server never fetches a URL. "
    "Read the file and send its bytes base64-encoded."
)
ERR_NOT_BASE64 = "{where}: the data URL must be base64-encoded (data:image/png;base64,...)."
ERR_BAD_BASE64 = "{where}: the image data is not valid base64 ({details}). Encode the file's bytes with base64."
ERR_IMAGE_TYPE = "{where}: images of type {mime!r} are not accepted. Send PNG, JPEG or WebP (image/png, ...)."
ERR_IMAGE_BYTES = "{where}: the image is {size} bytes; the limit is {limit}. Send a smaller picture."
ERR_IMAGE_SIDE = (
    "{where}: the image is {width} x {height} pixels, more than {limit} on a side. Downsample or crop it first."
)
ERR_BAD_IMAGE = "{where}: the image could not be decoded ({details}). Send a valid PNG, JPEG or WebP file."
ERR_TOO_MANY_IMAGES = "The request holds more than {limit} images. Send the most recent ones only."
ERR_TOO_MANY_PIXELS = (
    "{where}: the request's images hold more than {limit} pixels in all. Send fewer or smaller pictures."
)
ERR_IMAGES_NOT_HERE = "{where}: {role} messages cannot hold images. Put pictures in user (or tool) messages."
ERR_NO_CALL_ID = "{where}: a tool message needs the tool_call_id of the assistant tool call it answers."
ERR_UNKNOWN_CALL = (
    "{where}: tool_call_id {id!r} answers no earlier assistant tool call. "
    "Send the assistant message with that call before its result."
)
ERR_BAD_REQUEST = "Bad request: {details}"
ERR_BODY_TOO_LARGE = "The request body is over the limit of {limit} bytes. Send fewer or smaller images."
ERR_MEDIA_TYPE = "POST bodies must be JSON (Content-Type: application/json), not {got!r}."
ERR_BAD_HOST = (
    "This server answers only loopback names, not host {host!r}. Call it as http://127.0.0.1:PORT/v1, or start "
    "`medgym serve` with a token (--token or $MEDGYM_TOKEN) to serve other names."
)
ERR_NEED_TOKEN = (
    "This server needs its access token: send 'Authorization: Bearer TOKEN' (OpenAI clients: the API key, "
    "e.g. OPENAI_API_KEY=TOKEN), the token `medgym serve` was started with (--token or $MEDGYM_TOKEN)."
)
ERR_POLICY_FAILED = "The served policy failed ({details}). The server is still up; check its log, then try again."
ERR_NEEDS_CASE = (
    "The expert follows a case's expert trace, and a server has no case: it cannot be served. "
    "Serve demo, embedded[:PATH] or transformers:PATH."
)
ROUTES = "This server has POST /v1/chat/completions and GET /v1/models."
ERR_INTERNAL = "Internal error ({name}); the server is still up. Check its log."


class RequestError(ValueError):
    """A request this server refuses: HTTP status, the message (says how to fix it), the field at fault."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


# ----------------------------------------------------------------------------- the request


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send many optional fields; unknown ones are ignored


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL | str = Field(description="A data: URL (some clients send the bare string).")


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Lenient):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = Field(default="{}", description="JSON text (OpenAI), or an object.")


class ToolCall(_Lenient):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionSpec(_Lenient):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSchema(_Lenient):
    type: Literal["function"]
    function: FunctionSpec


class ChatCompletionRequest(_Lenient):
    """The part of OpenAI's chat-completions request this server reads."""

    model: str = Field(min_length=1, description="Any name: one policy is served.")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: list[ToolSchema] | None = Field(
        default=None, description="Validated, then ignored: the policy knows medgym's tools."
    )
    tool_choice: str | dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="0 (greedy) when left out.")
    n: int = 1
    stream: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("medgym serve writes one completion per request: send n=1 (or leave it out)")
        return n

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, stream: bool) -> bool:
        if stream:
            raise ValueError("streaming is not supported: send stream=false (or leave it out)")
        return stream


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """A pydantic error as one readable line, and the first field at fault."""
    errors = exc.errors(include_url=False)
    locs = [".".join(map(str, e["loc"])) or "body" for e in errors]
    details = "; ".join(f"{loc}: {e['msg']}" for loc, e in zip(locs, errors, strict=True))
    return ERR_BAD_REQUEST.format(details=details[:2000]), locs[0] if locs else None


# ----------------------------------------------------------------------------- request -> contract


def decode_image(url: str, where: str, max_pixels: int | None = None) -> np.ndarray:
    """A ``data:`` URL -> an RGB uint8 array, or :class:`RequestError` (never fetches anything).

    Sizes are checked from the header, before any pixel is decoded: at most :data:`MAX_IMAGE_SIDE`
    on a side and ``max_pixels`` in all.
    """
    match = DATA_URL.match(url) if url.startswith("data:") else None
    if match is None:
        raise RequestError(ERR_NOT_DATA_URL.format(where=where), param=where)
    mime = (match["mime"] or "").lower()
    if mime not in IMAGE_FORMATS:
        raise RequestError(ERR_IMAGE_TYPE.format(where=where, mime=mime or "none"), param=where)
    if "base64" not in [p.strip().lower() for p in match["params"].split(";")]:
        raise RequestError(ERR_NOT_BASE64.format(where=where), param=where)
    encoded = match["data"]
    if len(encoded) > MAX_IMAGE_BYTES * 4 // 3 + 4:  # before decoding: base64 is 4/3 of the bytes
        raise RequestError(
            ERR_IMAGE_BYTES.format(where=where, size=len(encoded) * 3 // 4, limit=MAX_IMAGE_BYTES), param=where
        )
    try:
        data = base64.b64decode(re.sub(r"\s+", "", encoded), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(ERR_BAD_BASE64.format(where=where, details=str(exc)[:120]), param=where) from None
    try:
        with Image.open(io.BytesIO(data), formats=sorted(set(IMAGE_FORMATS.values()))) as img:
            if max(img.width, img.height) > MAX_IMAGE_SIDE:
                raise RequestError(
                    ERR_IMAGE_SIDE.format(where=where, width=img.width, height=img.height, limit=MAX_IMAGE_SIDE),
                    param=where,
                )
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise RequestError(ERR_TOO_MANY_PIXELS.format(where=where, limit=MAX_REQUEST_PIXELS), param=where)
            img.load()
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError, SyntaxError) as exc:
        details = type(exc).__name__ if isinstance(exc, UnidentifiedImageError) else f"{type(exc).__name__}: {exc}"
        raise RequestError(ERR_BAD_IMAGE.format(where=where, details=details[:160]), param=where) from None


@dataclass
class _Budget:
    """What a request's pictures have used so far."""

    images: int = 0
    pixels: int = 0


def _content(message: ChatMessage, where: str, budget: _Budget) -> tuple[str, list[np.ndarray]]:
    """A message's text (text parts joined by newlines) and its decoded pictures."""
    content = message.content
    if content is None or isinstance(content, str):
        return content or "", []
    texts: list[str] = []
    images: list[np.ndarray] = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            texts.append(part.text)
            continue
        part_where = f"{where}.content[{j}].image_url"
        if message.role not in ("user", "tool"):
            raise RequestError(ERR_IMAGES_NOT_HERE.format(where=part_where, role=message.role), param=part_where)
        budget.images += 1
        if budget.images > MAX_IMAGES:
            raise RequestError(ERR_TOO_MANY_IMAGES.format(limit=MAX_IMAGES), param=part_where)
        url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
        images.append(decode_image(url, part_where, max_pixels=MAX_REQUEST_PIXELS - budget.pixels))
        budget.pixels += images[-1].shape[0] * images[-1].shape[1]
    return "\n".join(texts), images


def _arguments(call: FunctionCall) -> Any:
    """Arguments as the client wrote them: a JSON object when they load, else the raw text (the parser reports it)."""
    if isinstance(call.arguments, dict):
        return call.arguments
    try:
        return load_json(call.arguments) if call.arguments.strip() else {}
    except InvalidJSON:  # malformed, nested too deeply, absurd numbers
        return call.arguments


def _is_note(text: str, messages: list[Message]) -> bool:
    """Whether a text-only user message is a runtime note to the model rather than a new question."""
    last_turn = next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), None)
    if last_turn is None or parse_action(last_turn).answer is not None:
        return False
    return text.lstrip().startswith(NOTE_PREFIXES)


def contract_messages(messages: list[ChatMessage]) -> list[Message]:
    """OpenAI chat messages -> the contract's messages (see the module docstring); RequestError on bad input."""
    out: list[Message] = []
    calls: dict[str, dict[str, Any]] = {}  # tool_call_id -> the call it names
    budget = _Budget()
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        text, images = _content(m, where, budget)
        if m.role in ("system", "developer"):
            out.append({"role": "system", "content": text, "images": []})
        elif m.role == "assistant":
            turn_calls = [{"name": c.function.name, "arguments": _arguments(c.function)} for c in m.tool_calls or []]
            calls.update({c.id: tc for c, tc in zip(m.tool_calls or [], turn_calls, strict=True)})
            out.append({"role": "assistant", "content": text + calls_text(turn_calls), "images": []})
        elif m.role == "tool":
            if not m.tool_call_id:
                raise RequestError(ERR_NO_CALL_ID.format(where=where), param=f"{where}.tool_call_id")
            call = calls.get(m.tool_call_id)
            if call is None:
                raise RequestError(
                    ERR_UNKNOWN_CALL.format(where=where, id=m.tool_call_id[:80]), param=f"{where}.tool_call_id"
                )
            name = call["name"]
            out.append(
                {
                    "role": "tool",
                    "kind": "tool",
                    "name": name,
                    "content": text,
                    "images": images,
                    # what scripted policies read (medgym.environments.policies.tool_records)
                    "arguments": call["arguments"] if isinstance(call["arguments"], dict) else {},
                    "text": text.removeprefix(f"[{name}] "),
                }
            )
        elif images and out and out[-1]["role"] == "tool":
            # the pictures of the tool turn just before, sent in a user message (the tool role holds text only)
            tool = out[-1]
            tool["images"] = [*tool["images"], *images]
            extra = text.strip()
            if extra and extra != TOOL_IMAGES_TEXT:
                tool["content"] += "\n" + extra
        else:
            kind = "format_error" if not images and _is_note(text, out) else "question"
            out.append({"role": "user", "kind": kind, "content": text, "images": images})
    return out


# ----------------------------------------------------------------------------- turn -> response


def completion(text: str, model_id: str) -> dict[str, Any]:
    """A policy's turn as an OpenAI chat completion (tool calls structured when the turn parses to some)."""
    action = parse_action(text)
    message: dict[str, Any]
    if action.calls:
        thought = TOOL_CALL_BLOCK.sub("", text).strip()
        message = {
            "role": "assistant",
            "content": thought or None,
            "tool_calls": [
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
                }
                for c in action.calls
            ],
        }
        finish = "tool_calls"
    else:
        message, finish = {"role": "assistant", "content": text}, "stop"
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


# ----------------------------------------------------------------------------- the app


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error in OpenAI's shape."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def check_servable(policy: Any) -> None:
    """Refuse (BackendUnavailable naming the fix) a policy that needs a case: a server has none."""
    if callable(getattr(policy, "for_case", None)):
        raise BackendUnavailable(ERR_NEEDS_CASE)


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it passes :data:`MAX_REQUEST_BYTES` (declared or counted)."""
    limit = MAX_REQUEST_BYTES
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(ERR_BODY_TOO_LARGE.format(limit=limit), 413, code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(ERR_BODY_TOO_LARGE.format(limit=limit), 413, code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(policy: Policy, *, token: str | None = None, host: str = "127.0.0.1") -> FastAPI:
    """The OpenAI-compatible app over ``policy``; ``token``: Bearer auth on every route (any Host name then).

    Without a token only loopback Host names are answered; ``host`` is the bound address (also answered).
    """
    check_token(token, host)
    check_servable(policy)
    allowed_hosts = frozenset(serving_hosts(host))
    secret = token.encode() if token else None
    lock = threading.Lock()  # one turn at a time: a model (and its device) serves one request
    started = int(time.time())
    app = FastAPI(title="medgym serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.policy = policy

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        headers = request.headers
        if secret is None:
            if host_name(headers.get("host", "")) not in allowed_hosts:
                return error_response(421, ERR_BAD_HOST.format(host=headers.get("host", "")[:200]), code="bad_host")
        else:
            scheme, _, value = headers.get("authorization", "").partition(" ")
            if not (scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), secret)):
                return error_response(
                    401, ERR_NEED_TOKEN, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                )
        if request.method == "POST":
            got = headers.get("content-type", "").split(";")[0].strip().lower()
            if got != "application/json":
                return error_response(415, ERR_MEDIA_TYPE.format(got=got[:100]), code="unsupported_media_type")
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, str(exc), exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {request.url.path[:200]}. {ROUTES}"
        return error_response(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, ERR_INTERNAL.format(name=type(exc).__name__))

    def run_turn(messages: list[Message], temperature: float) -> str:
        with lock:
            try:
                text = policy.next_turn(messages, temperature=temperature)
            except Exception as exc:  # a crashed model answers 500; the server stays up
                log.exception("the served policy failed")
                details = f"{type(exc).__name__}: {str(exc)[:300]}"
                raise RequestError(ERR_POLICY_FAILED.format(details=details), 500) from None
        return text if isinstance(text, str) else str(text)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        body = await _read_body(request)
        try:
            req = ChatCompletionRequest.model_validate_json(body)
        except ValidationError as exc:
            message, param = validation_message(exc)
            raise RequestError(message, param=param) from None
        messages = await run_in_threadpool(contract_messages, req.messages)  # image decoding: CPU work
        text = await run_in_threadpool(run_turn, messages, req.temperature or 0.0)
        return JSONResponse(completion(text, policy.model_id))

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": policy.model_id, "object": "model", "created": started, "owned_by": "medgym"}],
        }

    return app


def serve(policy: Policy, host: str = "127.0.0.1", port: int = 8000, *, token: str | None = None) -> None:
    """Serve ``policy`` with uvicorn (blocking). Off loopback it needs ``token`` (ValueError otherwise)."""
    import uvicorn

    check_token(token, host)
    uvicorn.run(create_app(policy, token=token, host=host), host=host, port=port, log_level="warning")


__all__ = ["ChatCompletionRequest", "check_servable", "completion", "contract_messages", "create_app", "serve"]
