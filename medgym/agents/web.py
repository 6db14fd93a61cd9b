"""The clinician web chat: FastAPI + one small page (vanilla JS, no CDN).

Upload an image (PNG, JPEG, DICOM, NIfTI), ask questions, watch each step stream in (the model's
turn, every tool result with its crops and mask overlays), and get the answer with its overlay and
reliability score. Conversations live in LangGraph's SQLite checkpointer, so they survive restarts;
the page keeps the session id in the address (``#s=<id>``) and reloads the history from the server.

Routes: ``GET /`` the page; ``POST /api/upload`` a file -> upload id; ``POST /api/chat`` a question ->
a stream of JSON lines (one event per line); ``GET /api/sessions[/<id>]`` list / history;
``GET /api/images/<sha256>.png`` an image from the store. Everything that enters is checked: sizes,
formats, dimensions, ids (patterns, then resolved paths inside their folders).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medgym.agents.graph import AgentContext
from medgym.agents.session import ChatAgent, SessionError
from medgym.agents.studies import (
    ERR_TOO_LARGE,
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
STATIC = resources.files("medgym.agents") / "static"


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


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(
    db: str | Path,
    data_dir: str | Path,
    backend: str = "expert",
    context: AgentContext | None = None,
) -> FastAPI:
    """The web app over a ChatAgent on ``db``; images and uploads under ``data_dir``.

    With ``backend="expert"``, phantom sessions follow the case's expert trace and upload sessions
    use the scripted demo (uploads have no expert trace); every step says which one ran.
    """
    context = context or AgentContext(backend=backend)
    context.data_dir = str(data_dir)
    agent = ChatAgent(db, context)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        agent.close()

    app = FastAPI(title="medgym chat", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.agent = agent

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"Internal error ({type(exc).__name__}); the session is saved, try again.")

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in {"app.js", "style.css"}:
            return _error(404, f"No static file {name!r}.")
        media = "text/javascript" if name.endswith(".js") else "text/css"
        return Response((STATIC / name).read_text(encoding="utf-8"), media_type=media)

    @app.post("/api/upload")
    async def upload(request: Request, file: Annotated[UploadFile, File()]) -> JSONResponse:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_UPLOAD_BYTES + 1_000_000:
            return _error(413, ERR_TOO_LARGE.format(size=int(length), limit=MAX_UPLOAD_BYTES))
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        try:
            study = load_upload_bytes(data, file.filename or "")
            upload_id = context.uploads.save(study, file.filename or "")
        except UploadError as exc:
            return _error(exc.status, str(exc))
        preview = context.store.put(question_images(LoadedStudy(study=study))[0])
        h, w = study.shape2d
        return JSONResponse(
            {
                "upload_id": upload_id,
                "width": w,
                "height": h,
                "slices": int(study.image.shape[0]) if study.is_3d else 1,
                "modality": study.modality,
                "preview": preview,
            }
        )

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
        state = agent.state(session_id)
        if body.session_id and not state.get("messages"):
            return _error(404, ERR_NO_SESSION.format(id=session_id))
        study = state.get("study")
        if study is None:
            if body.upload_id is not None:
                try:
                    context.uploads.path(body.upload_id)  # id pattern and folder check
                    if not context.uploads.path(body.upload_id).exists():
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


def serve(host: str, port: int, db: str | Path, data_dir: str | Path, context: AgentContext) -> None:
    """Run the web chat with uvicorn (blocking)."""
    import uvicorn

    app = create_app(db, data_dir, context=context)
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["ChatRequest", "create_app", "serve"]
