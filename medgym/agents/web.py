"""The clinician web chat: FastAPI + one small page (vanilla JS, no CDN).

Upload an image (PNG, JPEG, DICOM, NIfTI), ask questions, watch each step stream in (the model's
turn, every tool result with its crops and mask overlays), and get the answer with its overlay and
reliability score. Conversations live in LangGraph's SQLite checkpointer, so they survive restarts;
the page keeps the session id in the address (``#s=<id>``) and reloads the history from the server.

Routes: ``GET /`` the page; ``POST /api/upload`` a file -> upload id; ``POST /api/chat`` a question ->
a stream of JSON lines (one event per line); ``GET /api/sessions[/<id>]`` list / history;
``GET /api/images/<sha256>.png`` an image from the store. Everything that enters is checked: sizes,
formats, dimensions, ids (patterns, then resolved paths inside their folders).

Every request first passes :class:`RequestGuard`, the outermost ASGI layer: the ``Host`` must be an
allowed name (loopback by default: a DNS-rebinding page cannot reach the server), a state-changing
request must carry JSON (multipart for uploads) and, when it has an ``Origin``, come from this
server's own page (no cross-site posts), ``/api/`` calls carry the access token when one is set
(required off loopback), bodies are counted as they arrive and refused with 413 past the limit,
and every response, errors included, carries a strict Content-Security-Policy and friends.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medgym.agents.graph import AgentContext
from medgym.agents.session import ChatAgent, SessionError
from medgym.agents.studies import (
    MAX_UPLOAD_BYTES,
    LoadedStudy,
    UploadError,
    load_upload_bytes,
    question_images,
)

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")
ERR_BAD_SESSION = "Unknown session id {id!r}: ids are 32 hexadecimal characters."
ERR_NO_SESSION = "No session {id!r} here. Start one by uploading an image and asking a question."
ERR_NO_IMAGE = "No image {id!r} here."
ERR_NEED_STUDY = "A new session needs an image: upload one first (or give a phantom case_seed)."
ERR_BAD_HOST = (
    "This server does not answer to host {host!r}. Open it as http://127.0.0.1:PORT/, or start `medgym web` "
    "with --allowed-hosts {name} to serve that name."
)
ERR_BAD_ORIGIN = (
    "Refused a request from the page at {origin!r}: this server takes changes only from its own page "
    "(http://{host}/). Open the chat from the server's address and try there."
)
ERR_MEDIA_TYPE = "{path} takes {expected} bodies, not {got!r}. Send the body as {expected}."
ERR_BODY_TOO_LARGE = (
    "The request body is over the limit of {limit} bytes for {path}. Upload a smaller file (one series or slice)."
)
ERR_NEED_TOKEN = (
    "This server needs its access token: open the page once as /?token=TOKEN (the page keeps it in a cookie), "
    "or send the header 'Authorization: Bearer TOKEN'."
)
ERR_BAD_TOKEN = "Wrong access token. Use the token `medgym web` was started with (--token or $MEDGYM_TOKEN)."
ERR_BIND_NEEDS_TOKEN = (
    "Refusing to serve on {host}, which is not a loopback address, without an access token: anyone who can "
    "reach it could read every conversation. Set one with the environment variable MEDGYM_TOKEN (or --token), "
    "e.g. MEDGYM_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe())'), or bind 127.0.0.1."
)
ERR_WEAK_TOKEN = (
    "The access token has {n} characters; use at least {min} "
    "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')."
)
STATIC = resources.files("medgym.agents") / "static"

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
UPLOAD_PATH = "/api/upload"
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file
MAX_JSON_BYTES = 64 * 1024  # a question is at most 2000 characters; JSON escapes make that <= 12 kB
MIN_TOKEN_CHARS = 16
TOKEN_COOKIE = "medgym_token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The page is one HTML file, one script and one stylesheet from this server, images from /api/images.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)


class ChatRequest(BaseModel):
    """A question from the page."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(
        default="", max_length=2000, description="The question; empty asks a phantom case's own question."
    )
    session_id: str | None = Field(default=None, description="Continue this session; omit to start one.")
    upload_id: str | None = Field(default=None, description="The uploaded image a new session is about.")
    case_seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="A phantom case for a new session.")
    reliability_n: int = Field(default=0, ge=0, le=10, description="Sampled runs for the reliability index (0: off).")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def host_name(host: str) -> str:
    """The name in a ``Host`` header or an allowed-hosts entry, without port or IPv6 brackets.

    >>> [host_name(h) for h in ("127.0.0.1:7860", "[::1]:80", "[::1]", "LocalHost.", "::1")]
    ['127.0.0.1', '::1', '::1', 'localhost', '::1']
    """
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.split(":")[0]
    return host.rstrip(".")


def is_loopback(host: str) -> bool:
    """Whether a bind address or host name stays on this machine.

    >>> is_loopback("127.0.0.2"), is_loopback("localhost"), is_loopback("0.0.0.0"), is_loopback("::")
    (True, True, False, False)
    """
    name = host_name(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_token(token: str | None, host: str = "127.0.0.1") -> None:
    """Refuse (ValueError naming the fix) a non-loopback ``host`` without a token, and a short token."""
    if token is None and not is_loopback(host):
        raise ValueError(ERR_BIND_NEEDS_TOKEN.format(host=host))
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ValueError(ERR_WEAK_TOKEN.format(n=len(token), min=MIN_TOKEN_CHARS))


def body_limit(path: str) -> int:
    """The most bytes a request body to ``path`` may have (read at call time: tests patch the limit)."""
    return MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD if path == UPLOAD_PATH else MAX_JSON_BYTES


class BodyTooLarge(HTTPException):
    """Raised from ``receive()`` once a body passes its limit; the guard has already answered 413."""

    def __init__(self, path: str, limit: int):
        super().__init__(413, ERR_BODY_TOO_LARGE.format(limit=limit, path=path))


class RequestGuard:
    """Pure ASGI layer around the whole app (outside its error handler, so 500s get the headers too).

    Checks, in order: Host (421), Origin of state-changing requests (403), the access token on
    ``/api/`` (401; ``/?token=`` sets the cookie the page then sends), the media type of
    state-changing requests (415), the body size, declared (413 before reading) or counted as
    ``receive()`` yields it (413 as soon as it passes, without buffering the rest).
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str], token: str | None = None):
        self.app = app
        hosts = {host_name(h) for h in allowed_hosts}
        self.any_host = "*" in hosts
        self.allowed_hosts = frozenset(hosts - {"*"})
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": [*kept, *SECURITY_HEADERS]}
            await send(message)

        path = scope["path"]
        refusal = self._refusal(scope, path)
        if refusal is not None:
            await refusal(scope, receive, send_secured)
            return
        limit = body_limit(path)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._too_large(path, limit)(scope, receive, send_secured)
            return

        received, started, answered = 0, False, False

        async def receive_counted() -> Message:
            nonlocal received, answered
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not started:  # answer now; the app's own reply to the exception is dropped
                        answered = True
                        await self._too_large(path, limit)(scope, receive, send_secured)
                    raise BodyTooLarge(path, limit)
            return message

        async def send_app(message: Message) -> None:
            nonlocal started
            if answered:
                return
            started = started or message["type"] == "http.response.start"
            await send_secured(message)

        try:
            await self.app(scope, receive_counted, send_app)
        except BodyTooLarge:
            if not answered:
                raise

    @staticmethod
    def _too_large(path: str, limit: int) -> Response:
        # close the connection: the rest of the body is never read
        return _error(413, ERR_BODY_TOO_LARGE.format(limit=limit, path=path), {"Connection": "close"})

    def _refusal(self, scope: Scope, path: str) -> Response | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not self.any_host and host_name(host) not in self.allowed_hosts:
            return _error(421, ERR_BAD_HOST.format(host=host[:200], name=host_name(host)[:200] or "NAME"))
        unsafe = scope["method"] in UNSAFE_METHODS
        origin = headers.get("origin")
        if unsafe and origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            return _error(403, ERR_BAD_ORIGIN.format(origin=origin[:200], host=host[:200]))
        if self.token is not None:
            query_token = QueryParams(scope.get("query_string", b"")).get("token")
            if path == "/" and query_token is not None:
                if not hmac.compare_digest(query_token.encode(), self.token):
                    return _error(401, ERR_BAD_TOKEN)
                # keep the token in a cookie the page's requests (fetch, <img>) carry; drop it from the address
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(TOKEN_COOKIE, query_token, httponly=True, samesite="strict", path="/")
                return response
            if path.startswith("/api/") and not self._has_token(headers):
                return _error(401, ERR_NEED_TOKEN, {"WWW-Authenticate": "Bearer"})
        if unsafe:
            expected = "multipart/form-data" if path == UPLOAD_PATH else "application/json"
            got = headers.get("content-type", "").split(";")[0].strip().lower()
            if got != expected:
                return _error(415, ERR_MEDIA_TYPE.format(path=path, expected=expected, got=got[:100]))
        return None

    def _has_token(self, headers: Headers) -> bool:
        assert self.token is not None
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token):
            return True
        cookie = cookie_parser(headers.get("cookie", "")).get(TOKEN_COOKIE)
        return cookie is not None and hmac.compare_digest(cookie.encode(), self.token)


class GuardedApp(FastAPI):
    """FastAPI with :class:`RequestGuard` outermost (``add_middleware`` would put it inside the 500 handler)."""

    def __init__(self, *, allowed_hosts: Iterable[str], token: str | None, **kwargs: Any):
        self.guard_options = {"allowed_hosts": list(allowed_hosts), "token": token}
        super().__init__(**kwargs)

    def build_middleware_stack(self) -> ASGIApp:
        return RequestGuard(super().build_middleware_stack(), **self.guard_options)


def create_app(
    db: str | Path,
    data_dir: str | Path,
    backend: str = "embedded",
    context: AgentContext | None = None,
    *,
    constrained: bool = True,
    allowed_hosts: Iterable[str] = LOOPBACK_HOSTS,
    token: str | None = None,
) -> FastAPI:
    """The web app over a ChatAgent on ``db``; images and uploads under ``data_dir``.

    Without a ``context``, sessions run ``backend`` (a policy spec, see :mod:`medgym.agents.backends`):
    by default the embedded policy, decoded under the turn grammar (``constrained``), whose answers
    about uploads come with a note that it is trained on phantoms (:mod:`medgym.agents.session`).
    With ``backend="expert"``, phantom sessions follow the case's expert trace and upload sessions
    use the scripted demo (uploads have no expert trace); every step says which one ran.
    ``allowed_hosts``: the names (any port) the ``Host`` header may carry, ``"*"`` for any;
    ``token``: when set, every ``/api/`` call needs it (see :class:`RequestGuard`).
    """
    check_token(token)
    context = context or AgentContext(backend=backend, backend_options={"constrained": constrained})
    context.data_dir = str(data_dir)
    agent = ChatAgent(db, context)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        agent.close()

    app = GuardedApp(
        allowed_hosts=allowed_hosts,
        token=token,
        title="medgym chat",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.agent = agent

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"Internal error ({type(exc).__name__}); the session is saved, try again.")

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)  # no icon; browsers ask anyway

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in {"app.js", "style.css"}:
            return _error(404, f"No static file {name!r}.")
        media = "text/javascript" if name.endswith(".js") else "text/css"
        return Response((STATIC / name).read_text(encoding="utf-8"), media_type=media)

    def store_upload(data: bytes, filename: str) -> dict[str, Any]:
        study = load_upload_bytes(data, filename)
        upload_id = context.uploads.save(study, filename)
        preview = context.store.put(question_images(LoadedStudy(study=study))[0])
        h, w = study.shape2d
        return {
            "upload_id": upload_id,
            "width": w,
            "height": h,
            "slices": int(study.image.shape[0]) if study.is_3d else 1,
            "modality": study.modality,
            "preview": preview,
        }

    @app.post(UPLOAD_PATH)
    async def upload(file: Annotated[UploadFile, File()]) -> JSONResponse:
        # the guard has bounded the body; decoding and saving are slow: off the event loop
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        try:
            return JSONResponse(await run_in_threadpool(store_upload, data, file.filename or ""))
        except UploadError as exc:
            return _error(exc.status, str(exc))

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        try:
            body = ChatRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
            return _error(422, f"Bad request: {details}")
        session_id = body.session_id or ChatAgent.new_thread_id()
        if not SESSION_ID.match(session_id):
            return _error(404, ERR_BAD_SESSION.format(id=session_id[:80]))
        state = await run_in_threadpool(agent.state, session_id)  # SQLite: off the event loop
        if body.session_id and not state.get("messages"):
            return _error(404, ERR_NO_SESSION.format(id=session_id))
        study = state.get("study")
        if study is None:
            if body.upload_id is not None:
                try:
                    if not context.uploads.path(body.upload_id).exists():  # id pattern and folder check first
                        raise UploadError(f"No upload {body.upload_id!r} here. Upload the image again.", 404)
                except UploadError as exc:
                    return _error(exc.status, str(exc))
                study = {"kind": "upload", "id": body.upload_id}
            elif body.case_seed is not None:
                study = {"kind": "phantom", "seed": body.case_seed}
            else:
                return _error(400, ERR_NEED_STUDY)
        overrides: dict[str, Any] = {"reliability_n": body.reliability_n}
        if context.backend == "expert" and study.get("kind") == "upload":
            overrides["backend"] = "demo"

        # a sync iterator: Starlette runs each step of it in the thread pool, never on the event loop
        def events() -> Iterator[bytes]:
            yield (json.dumps({"kind": "session", "session_id": session_id, "study": study}) + "\n").encode()
            try:
                for event in agent.ask(session_id, body.question, study, **overrides):
                    yield (json.dumps(event, default=str) + "\n").encode()
            except SessionError as exc:
                yield (json.dumps({"kind": "error", "content": str(exc)}) + "\n").encode()
            except Exception as exc:  # the stream has started: report in-band, keep the server up
                log.exception("chat run failed")
                yield (
                    json.dumps(
                        {"kind": "error", "content": f"The run failed ({type(exc).__name__}); the session is saved."}
                    )
                    + "\n"
                ).encode()

        return StreamingResponse(events(), media_type="application/x-ndjson", headers={"Cache-Control": "no-store"})

    @app.get("/api/sessions")
    def sessions() -> JSONResponse:
        return JSONResponse({"sessions": agent.threads()})

    @app.get("/api/sessions/{session_id}")
    def session(session_id: str) -> JSONResponse:
        if not SESSION_ID.match(session_id):
            return _error(404, ERR_BAD_SESSION.format(id=session_id[:80]))
        state = agent.state(session_id)
        if not state.get("messages"):
            return _error(404, ERR_NO_SESSION.format(id=session_id))
        return JSONResponse(
            json.loads(
                json.dumps(
                    {"session_id": session_id, "study": state.get("study"), "messages": state["messages"]}, default=str
                )
            )
        )

    @app.get("/api/images/{name}")
    def image(name: str) -> Response:
        digest = name[:-4] if name.endswith(".png") else name
        if not IMAGE_ID.match(digest):
            return _error(404, ERR_NO_IMAGE.format(id=name[:80]))
        root = context.store.root.resolve()
        path = context.store.path(digest).resolve()
        if path.parent != root or not path.is_file():
            return _error(404, ERR_NO_IMAGE.format(id=name[:80]))
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "max-age=86400, immutable"})

    return app


def serving_hosts(host: str, extra: Iterable[str] = ()) -> list[str]:
    """The Host names a server bound to ``host`` answers to: loopback, the bound address, ``extra``.

    >>> serving_hosts("0.0.0.0", ["chat.lan"])
    ['127.0.0.1', 'localhost', '::1', 'chat.lan']
    >>> serving_hosts("192.168.1.5")
    ['127.0.0.1', 'localhost', '::1', '192.168.1.5']
    """
    hosts = list(LOOPBACK_HOSTS)
    if host_name(host) not in ("0.0.0.0", "::", "") and host_name(host) not in hosts:
        hosts.append(host_name(host))
    return hosts + [h for h in extra if h and h not in hosts]


def serve(
    host: str,
    port: int,
    db: str | Path,
    data_dir: str | Path,
    context: AgentContext,
    *,
    allowed_hosts: Iterable[str] = (),
    token: str | None = None,
) -> None:
    """Run the web chat with uvicorn (blocking). Off loopback it needs ``token`` (ValueError otherwise)."""
    import uvicorn

    check_token(token, host)
    app = create_app(db, data_dir, context=context, allowed_hosts=serving_hosts(host, allowed_hosts), token=token)
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["ChatRequest", "RequestGuard", "check_token", "create_app", "serve", "serving_hosts"]
