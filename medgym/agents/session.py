"""Chat sessions over the agent graph, persisted in LangGraph's SQLite checkpointer.

A session is a LangGraph thread (``thread_id``). Its state — the conversation, the study
reference, the masks' hashes — is checkpointed in a SQLite file after every step, so a
session resumes after the process restarts: open a new :class:`ChatAgent` on the same file
and ask a follow-up with the same thread id.

:meth:`ChatAgent.ask` streams the run as events (one per message: the model's turn, each tool
result, format errors, the final result), which the terminal chat prints and the web page shows.

Out of domain: the embedded policy is trained on phantoms. When it answers about an upload (a real
image: a DICOM, a photo, any user file), the run ends with a ``note`` event saying so, after the
result: the user reads it with the answer; the model's own turns and the trace stay as they were.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from langgraph.checkpoint.sqlite import SqliteSaver

from medgym.agents.backends import EmbeddedBackend, parse_spec
from medgym.agents.graph import AgentContext, build_graph, recursion_limit

log = logging.getLogger(__name__)

ERR_UNKNOWN_THREAD = "Unknown session {id!r}: start a session by asking a question about an image."
ERR_NEEDS_STUDY = "A new session needs an image: upload one (or name a phantom case) with the first question."
OUT_OF_DOMAIN_NOTE = (
    "Note: the embedded policy is trained on phantoms, not on real images like this one; treat its answer as a "
    "demonstration. For real images connect a served model with --backend openai:MODEL@URL."
)


def is_embedded(backend: Any) -> bool:
    """Whether a context's backend (a spec or a policy) is the project's own embedded policy."""
    if isinstance(backend, str):
        return parse_spec(backend)[0] in ("embedded", "embedded-sft")
    return isinstance(backend, EmbeddedBackend)


def out_of_domain_note(study: dict[str, Any] | None, backend: Any) -> str | None:
    """The note the user gets with an answer the embedded policy gave about an upload (None: no note)."""
    if (study or {}).get("kind") == "upload" and is_embedded(backend):
        return OUT_OF_DOMAIN_NOTE
    return None


class SessionError(ValueError):
    """A request about a session that cannot be served; the message says why."""


class ChatAgent:
    """The compiled graph with a SQLite checkpointer, plus per-session helpers."""

    def __init__(self, db: str | Path, context: AgentContext | None = None):
        self.db = Path(db)
        self.db.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.db), check_same_thread=False, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
        self.saver = SqliteSaver(self.conn)
        self.saver.setup()
        self.graph = build_graph().compile(checkpointer=self.saver)
        self.context = context or AgentContext()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ChatAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def new_thread_id() -> str:
        return uuid.uuid4().hex

    def _config(self, thread_id: str, context: AgentContext) -> dict[str, Any]:
        return {"configurable": {"thread_id": thread_id}, "recursion_limit": recursion_limit(context.max_steps)}

    def state(self, thread_id: str) -> dict[str, Any]:
        """The saved state of a session ({} when it does not exist)."""
        snapshot = self.graph.get_state({"configurable": {"thread_id": thread_id}})
        return dict(snapshot.values or {})

    def exists(self, thread_id: str) -> bool:
        return bool(self.state(thread_id).get("messages"))

    def history(self, thread_id: str) -> list[dict[str, Any]]:
        """The session's messages in order (images are hashes into the image store)."""
        return list(self.state(thread_id).get("messages") or [])

    def threads(self) -> list[str]:
        rows = self.conn.execute("SELECT DISTINCT thread_id FROM checkpoints WHERE checkpoint_ns = ''").fetchall()
        return [r[0] for r in rows]

    def _lock(self, thread_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(thread_id, threading.Lock())

    def ask(
        self,
        thread_id: str,
        question: str,
        study: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> Iterator[dict[str, Any]]:
        """Run one question; yield each new message as it is made, then ``{"kind": "done", ...}``.

        ``study`` starts a new session (ignored when the session has one); ``overrides`` change
        this run's context (``backend=``, ``temperature=``, ``reliability_n=`` ...). The embedded
        policy's runs on an upload end with a ``note`` event (:data:`OUT_OF_DOMAIN_NOTE`), saved in the
        session after the result; ``done`` carries it as ``note``.
        """
        context = replace(self.context, **overrides) if overrides else self.context
        with self._lock(thread_id):  # one run at a time per session: its steps must not interleave
            existing = self.state(thread_id)
            payload: dict[str, Any] = {"question": question}
            if not existing.get("study"):
                if study is None:
                    raise SessionError(ERR_NEEDS_STUDY)
                payload["study"] = study
            config = self._config(thread_id, context)
            for chunk in self.graph.stream(payload, config, context=context, stream_mode="updates"):
                for node, update in chunk.items():
                    for message in (update or {}).get("messages", []) or []:
                        yield {"node": node, **message}
            note = out_of_domain_note(existing.get("study") or study, context.backend)
            if note is not None:
                # saved as a message for the user (an event: never shown to the model, never in the trace)
                event = {"role": "event", "kind": "note", "content": note, "images": []}
                self.graph.update_state(config, {"messages": [event]}, as_node="finish")
                yield {"node": "finish", **event}
            final = self.state(thread_id)
        yield {
            "kind": "done",
            "status": final.get("status"),
            "answer": final.get("answer"),
            "box": final.get("box"),
            "overlay": final.get("overlay"),
            "reliability": final.get("reliability"),
            "note": note,
            "thread_id": thread_id,
        }

    def run(
        self, thread_id: str, question: str, study: dict[str, Any] | None = None, **overrides: Any
    ) -> dict[str, Any]:
        """Run one question to the end; the ``done`` event."""
        events = list(self.ask(thread_id, question, study, **overrides))
        return events[-1]
