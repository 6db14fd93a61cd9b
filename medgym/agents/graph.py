"""The agent loop as a LangGraph ``StateGraph``.

::

    intake -> planner -> (tool calls) -> tools -> planner -> ... -> finish -> END
                     \\-> (format error, budget left) -> planner
                     \\-> (answer | budget used | error) -> finish

- **intake** turns the input ``{"study": ref, "question": text}`` into the question message (the
  first question of a thread carries the image(s) and their description, follow-ups only text);
- **planner** asks the backend (:mod:`medgym.agents.backends`) for the next turn and parses it with
  :func:`medgym.environments.parsing.parse_action`, the env's parser; a malformed turn gets the
  parser's error text back as a message the model can read;
- **tools** runs the calls through :func:`medgym.environments.runner.run_calls` — the env's call
  runner — and feeds back their text *and* images as the contract's tool messages; tool errors
  are messages;
- **finish** closes the question: budget note, an overlay of the masks and answer box on the image,
  the optional reliability index (N sampled runs), the score on case questions, and the trace.

Per-run settings (backend, budget, temperature, segmenter, tool mode, data folder) travel in the graph's
runtime context (:class:`AgentContext`, LangGraph's ``context_schema``), never in globals.

Checkpointable state. The state holds only JSON-like values, so LangGraph's ``SqliteSaver`` can
store it: images are content hashes into :class:`medgym.traces.ImageStore` (``<data>/images``);
the study is a reference (phantom seed or upload id, see :mod:`medgym.agents.studies`); the
``ToolContext`` is rebuilt in each tools step from the reference and the masks. Masks are stored
as PNG in the same image store (3D masks as their slices stacked vertically) with their shape —
chosen over re-running recorded segment calls because it is exact whatever the segmenter, and
cheap. A session therefore resumes in a new process with its masks intact.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import threading
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict

import numpy as np
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from medgym.agents.backends import BackendUnavailable, PlannerBackend, make_policy
from medgym.agents.reliability import agreement
from medgym.agents.studies import (
    LoadedStudy,
    UploadError,
    UploadStore,
    load_study,
    question_images,
    question_text,
)
from medgym.environments.contract import (
    DEFAULT_TOOL_MODE,
    LAST_TURN_KIND,
    NOTE_LAST_TURN,
    check_tool_mode,
    limit_images,
    system_prompt,
    tool_messages,
)
from medgym.environments.parsing import parse_action
from medgym.environments.policies import ERR_EXPERT_NO_CASE
from medgym.environments.recorder import EpisodeRecorder, RunSettings, open_header
from medgym.environments.rewards import score_parts, total_reward
from medgym.environments.runner import run_calls
from medgym.tools import ToolContext
from medgym.tools.imaging import draw_overlay
from medgym.traces import ImageStore, TraceWriter

log = logging.getLogger(__name__)

ERR_BUDGET = (
    "Stopped: the step budget of {budget} model turns was used up without an answer. "
    "Ask again, or raise the budget (--max-steps)."
)
ERR_BACKEND = "The planner backend failed: {details}"
ERR_NO_QUESTION = "No question was asked. Send a question about the image."

Status = Literal["running", "answered", "truncated", "error"]


def _merge(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any]:
    return {**(a or {}), **(b or {})}


class AgentState(TypedDict, total=False):
    """The checkpointed state: JSON-like values only (images and masks are hashes)."""

    study: dict[str, Any]  # a study reference: {"kind": "phantom", "seed": 3} or {"kind": "upload", "id": ...}
    question: str | None  # input: the question to ask next (intake consumes it)
    messages: Annotated[list[dict[str, Any]], operator.add]
    masks: Annotated[dict[str, dict[str, Any]], _merge]  # mask id -> {"hash", "shape", "question"}
    candidates: Annotated[dict[str, list[dict[str, Any]]], _merge]  # study -> the last detect call's candidates
    n_turns: int  # model turns for the current question
    pending: list[dict[str, Any]]  # tool calls of the last turn, for the tools node
    status: Status
    answer: str | None
    box: list[float] | None
    overlay: str | None
    reliability: dict[str, Any] | None


def default_data_dir() -> Path:
    return Path(os.environ.get("MEDGYM_CACHE", "~/.cache/medgym")).expanduser() / "agent"


@dataclass
class AgentContext:
    """Per-run settings, passed as ``context=`` to ``invoke``/``stream`` (LangGraph runtime context)."""

    backend: str | PlannerBackend = "embedded"  # a policy object, or a spec for make_policy (see agents.backends)
    backend_options: dict[str, Any] = field(default_factory=dict)
    max_steps: int = 8  # model turns per question before the run stops
    temperature: float = 0.0
    reliability_n: int = 0  # >1: also run this many sampled trajectories and report their agreement
    reliability_temperature: float = 0.7
    segmenter: str = "medsam"
    sam_checkpoint: str | None = None
    tool_mode: str = DEFAULT_TOOL_MODE  # "predicted" (no tool reads ground truth) or "oracle" (upper bound)
    data_dir: str | None = None  # images/, uploads/ and traces.jsonl live here
    record: bool = True  # write a medgym trace per question to <data_dir>/traces.jsonl
    max_images: int = 8  # images shown to the model per turn (question images + the most recent ones)

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.reliability_n > 1 and self.reliability_temperature <= 0:
            raise ValueError("reliability needs sampling: set reliability_temperature > 0")
        check_tool_mode(self.tool_mode)

    @property
    def root(self) -> Path:
        return Path(self.data_dir) if self.data_dir else default_data_dir()

    @property
    def store(self) -> ImageStore:
        return _image_store(str(self.root / "images"))

    @property
    def uploads(self) -> UploadStore:
        return _upload_store(str(self.root / "uploads"))


@lru_cache(maxsize=16)
def _image_store(root: str) -> ImageStore:
    return ImageStore(root)


@lru_cache(maxsize=16)
def _upload_store(root: str) -> UploadStore:
    return UploadStore(root)


_BACKENDS: dict[str, PlannerBackend] = {}
_BACKENDS_LOCK = threading.Lock()
_TRACE_LOCK = threading.Lock()


def resolve_backend(ctx: AgentContext, loaded: LoadedStudy) -> PlannerBackend:
    """The policy for this run: given directly, or made from its spec (cached unless it depends on the case)."""
    if not isinstance(ctx.backend, str):
        policy = ctx.backend
    elif ctx.backend == "expert":
        policy = make_policy("expert", case=loaded.case, tool_mode=ctx.tool_mode)
    else:
        key = ctx.backend + json.dumps(ctx.backend_options, sort_keys=True, default=str)
        with _BACKENDS_LOCK:
            if key not in _BACKENDS:
                _BACKENDS[key] = make_policy(ctx.backend, tool_mode=ctx.tool_mode, **ctx.backend_options)
            policy = _BACKENDS[key]
    for_case = getattr(policy, "for_case", None)
    if callable(for_case):  # a case-bound policy (the expert) given as an object
        if loaded.case is None:
            raise BackendUnavailable(ERR_EXPERT_NO_CASE)
        policy = for_case(loaded.case)
    return policy


# ----------------------------------------------------------------------------- masks and images


def encode_mask(store: ImageStore, mask: np.ndarray) -> dict[str, Any]:
    """A mask as a PNG in the image store: 2D as is, 3D with its slices stacked vertically."""
    flat = mask.reshape(-1, mask.shape[-1]).astype(np.uint8) * 255
    return {"hash": store.put(flat), "shape": list(mask.shape)}


@lru_cache(maxsize=256)
def _decode_cached(root: str, digest: str, shape: tuple[int, ...]) -> np.ndarray:
    mask = (ImageStore(root).get(digest) > 0).reshape(shape)
    mask.setflags(write=False)
    return mask


def decode_mask(store: ImageStore, entry: dict[str, Any]) -> np.ndarray:
    return _decode_cached(str(store.root), entry["hash"], tuple(entry["shape"]))


def tool_context(state: AgentState, ctx: AgentContext, loaded: LoadedStudy) -> ToolContext:
    """Rebuild the tools' context from the state: the study from its reference, masks from the store."""
    masks = {mid: decode_mask(ctx.store, entry) for mid, entry in (state.get("masks") or {}).items()}
    return ToolContext(
        study=loaded.study,
        prior=loaded.case.prior if loaded.case is not None else None,
        masks=masks,
        candidates={k: list(v) for k, v in (state.get("candidates") or {}).items()},
        segmenter=ctx.segmenter,
        sam_checkpoint=ctx.sam_checkpoint,
        tool_mode=ctx.tool_mode,
    )


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def question_index(messages: list[dict[str, Any]]) -> int:
    """Index of the current (last) question message."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("kind") == "question":
            return i
    return 0


def model_messages(
    messages: list[dict[str, Any]], store: ImageStore, max_images: int, tool_mode: str = DEFAULT_TOOL_MODE
) -> list[dict[str, Any]]:
    """What the policy sees: the contract's system prompt, then the conversation with images loaded.

    Event messages (results, notes for the user) are left out; the image budget is the contract's
    (:func:`medgym.environments.contract.limit_images`).
    """
    out: list[dict[str, Any]] = [{"role": "system", "content": system_prompt(tool_mode), "images": []}]
    for m in messages:
        if m["role"] not in ("user", "assistant", "tool"):
            continue
        out.append({**m, "images": [store.get(d) for d in m.get("images", [])]})
    return limit_images(out, max_images)


def _event(kind: str, content: str, **fields: Any) -> dict[str, Any]:
    return {"role": "event", "kind": kind, "content": content, "images": [], **fields}


# ----------------------------------------------------------------------------- nodes


def run_context(runtime: Runtime[AgentContext]) -> AgentContext:
    """This run's settings; the defaults when none were given (e.g. a bare call on LangGraph's server)."""
    ctx = runtime.context
    if isinstance(ctx, AgentContext):
        return ctx
    if isinstance(ctx, dict):
        return AgentContext(**ctx)
    return AgentContext()


def intake(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    ctx = run_context(runtime)
    messages = state.get("messages") or []
    first = not any(m.get("kind") == "question" for m in messages)
    reset: dict[str, Any] = {
        "question": None,
        "n_turns": 0,
        "pending": [],
        "answer": None,
        "box": None,
        "overlay": None,
        "reliability": None,
    }
    question = (state.get("question") or "").strip()
    try:
        loaded = load_study(state.get("study") or {}, ctx.uploads)
    except UploadError as exc:
        return {**reset, "status": "error", "messages": [_event("error", str(exc))]}
    if first:
        if not question and loaded.case is None:
            return {**reset, "status": "error", "messages": [_event("error", ERR_NO_QUESTION)]}
        images = [ctx.store.put(img) for img in question_images(loaded)]
        text = question_text(loaded, question or None, ctx.tool_mode)
    else:
        if not question:
            return {**reset, "status": "error", "messages": [_event("error", ERR_NO_QUESTION)]}
        images, text = [], question
    msg = {"role": "user", "kind": "question", "content": text, "images": images, "asked": question or None}
    return {**reset, "status": "running", "messages": [msg]}


def planner(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    ctx = run_context(runtime)
    n = state.get("n_turns", 0) + 1
    try:
        loaded = load_study(state["study"], ctx.uploads)
        backend = resolve_backend(ctx, loaded)
        prompt = model_messages(state["messages"], ctx.store, ctx.max_images, ctx.tool_mode)
        if n == ctx.max_steps and n > 1:  # the budget's last turn: say so (a constrained backend then only answers)
            prompt.append({"role": "user", "content": NOTE_LAST_TURN, "images": [], "kind": LAST_TURN_KIND})
        text = backend.next_turn(prompt, temperature=ctx.temperature)
    except (BackendUnavailable, UploadError) as exc:
        return {
            "n_turns": n,
            "pending": [],
            "status": "error",
            "messages": [_event("error", ERR_BACKEND.format(details=exc))],
        }
    except Exception as exc:  # a network error or a crashed model must not lose the session
        details = f"{type(exc).__name__}: {exc}"
        log.warning("planner backend failed: %s", details, exc_info=log.isEnabledFor(logging.DEBUG))
        return {
            "n_turns": n,
            "pending": [],
            "status": "error",
            "messages": [_event("error", ERR_BACKEND.format(details=details))],
        }
    text = text if isinstance(text, str) else str(text)
    turn = {
        "role": "assistant",
        "kind": "turn",
        "content": text,
        "images": [],
        "model_id": getattr(backend, "model_id", "unknown"),
    }
    action = parse_action(text)
    if action.error is not None:
        note = {"role": "user", "kind": "format_error", "content": action.error, "images": []}
        status = "running" if n < ctx.max_steps else "truncated"
        return {"n_turns": n, "pending": [], "status": status, "messages": [turn, note]}
    if action.calls:
        return {"n_turns": n, "pending": action.calls, "status": "running", "messages": [turn]}
    return {
        "n_turns": n,
        "pending": [],
        "status": "answered",
        "answer": action.answer,
        "box": action.box,
        "messages": [turn],
    }


def tools(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    ctx = run_context(runtime)
    loaded = load_study(state["study"], ctx.uploads)
    tctx = tool_context(state, ctx, loaded)
    before = set(tctx.masks)
    q = sum(m.get("kind") == "question" for m in state["messages"])
    records, note = run_calls(state.get("pending") or [], tctx)
    out: list[dict[str, Any]] = []
    for r, m in zip(records, tool_messages(records), strict=True):
        # Stored JSON-safe with images by hash; the trace record keeps the same fields.
        rec = r.to_trace(ctx.store)
        out.append(
            {
                **m,
                "arguments": rec.arguments,
                "data": rec.data,
                "images": rec.images,
                "seconds": rec.seconds,
                "tool_version": rec.tool_version,
            }
        )
    if note is not None:
        out.append({"role": "user", "kind": "format_error", "content": note, "images": []})
    new_masks = {
        mid: {**encode_mask(ctx.store, tctx.masks[mid]), "question": q} for mid in tctx.masks if mid not in before
    }
    status = "running" if state.get("n_turns", 0) < ctx.max_steps else "truncated"
    update = {"messages": out, "masks": new_masks, "pending": [], "status": status}
    if tctx.candidates:
        update["candidates"] = _json_safe(tctx.candidates)
    return update


def finish(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    ctx = run_context(runtime)
    status = state.get("status", "error")
    messages = state["messages"]
    qi = question_index(messages)
    out: list[dict[str, Any]] = []
    if status == "error":
        return {"pending": []}  # the error event is already in the conversation
    if status == "truncated":
        out.append(_event("budget", ERR_BUDGET.format(budget=ctx.max_steps)))
    loaded = load_study(state["study"], ctx.uploads)
    overlay = _overlay(state, ctx, loaded, qi)
    reliability = None
    if status == "answered" and ctx.reliability_n > 1:
        reliability = _reliability(state, ctx, loaded, qi)
    score = _score(state, loaded, qi)
    answer = state.get("answer")
    summary = "No answer." if answer is None else f"Answer: {answer}"
    if reliability is not None:
        summary += f" (reliability {reliability['score']:.2f}: {round(reliability['score'] * reliability['n'])} of {reliability['n']} sampled runs agree)"
    out.append(
        _event(
            "result",
            summary,
            status=status,
            answer=answer,
            box=state.get("box"),
            overlay=overlay,
            reliability=reliability,
            score=score,
            images=[overlay] if overlay else [],
        )
    )
    if ctx.record:
        _record(state, ctx, loaded, qi, score)
    return {"messages": out, "overlay": overlay, "reliability": reliability, "pending": []}


def _overlay(state: AgentState, ctx: AgentContext, loaded: LoadedStudy, qi: int) -> str | None:
    """The question image with this question's masks and the answer box drawn on it."""
    first = next((m for m in state["messages"] if m.get("kind") == "question" and m.get("images")), None)
    if first is None:
        return None
    q = sum(m.get("kind") == "question" for m in state["messages"])
    base = ctx.store.get(first["images"][0])
    shown_z = loaded.study.display_slice
    masks = []
    for entry in (state.get("masks") or {}).values():
        if entry.get("question") != q:
            continue
        mask = decode_mask(ctx.store, entry)
        if mask.ndim == 3:
            mask = mask[shown_z] if mask[shown_z].any() else mask.any(axis=0)
        if mask.shape == base.shape[:2]:
            masks.append(mask)
    boxes = [state["box"]] if state.get("box") else []
    if not masks and not boxes:
        return None
    return ctx.store.put(draw_overlay(base, masks, boxes))


def _is_case_question(messages: list[dict[str, Any]], qi: int, loaded: LoadedStudy) -> bool:
    """The case's own question (first question, asked without custom text): its answer is known."""
    first_q = question_index(messages[: qi + 1]) == qi and not any(m.get("kind") == "question" for m in messages[:qi])
    return loaded.case is not None and first_q and not messages[qi].get("asked")


def _score(state: AgentState, loaded: LoadedStudy, qi: int) -> dict[str, Any] | None:
    messages = state["messages"]
    if not _is_case_question(messages, qi, loaded) or state.get("status") != "answered":
        return None
    assert loaded.case is not None
    ok = sum(1 for m in messages[qi:] if m["role"] == "tool" and not m.get("error"))
    last = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
    parts = score_parts(last, loaded.case.reward_columns(), ok)
    return {"parts": parts, "reward": total_reward(parts), "correct": parts["answer"] == 1.0}


def _reliability(state: AgentState, ctx: AgentContext, loaded: LoadedStudy, qi: int) -> dict[str, Any]:
    """Run the question N more times at the sampling temperature, from the state it was asked in."""
    q = sum(m.get("kind") == "question" for m in state["messages"])
    base_masks = {k: v for k, v in (state.get("masks") or {}).items() if v.get("question", 0) < q}
    sample_ctx = replace(ctx, temperature=ctx.reliability_temperature, reliability_n=0, record=False)
    graph = _sampler()
    answers = []
    for _ in range(ctx.reliability_n):
        # From the state before the question: intake asks it again, as it did for the main run.
        start = {
            "study": state["study"],
            "messages": state["messages"][:qi],
            "masks": base_masks,
            "question": state["messages"][qi].get("asked") or "",
        }
        final = graph.invoke(start, {"recursion_limit": recursion_limit(ctx.max_steps)}, context=sample_ctx)
        answers.append(final.get("answer"))
    case = loaded.case if _is_case_question(state["messages"], qi, loaded) else None
    result = agreement(answers, case)
    result["temperature"] = ctx.reliability_temperature
    return result


def _record(state: AgentState, ctx: AgentContext, loaded: LoadedStudy, qi: int, score: dict[str, Any] | None) -> None:
    """Write this question as a medgym trace through the one episode recorder.

    The case's own question gets the case header (source spec, seed, study hash, segmenter, tool
    mode), so ``medgym replay --verify`` rebuilds it as it does env traces; a free question is an
    unscored 'open' one.
    """
    from medgym.traces import ToolCallRecord

    messages = state["messages"]
    writer = TraceWriter(ctx.root / "traces.jsonl")
    qmsg = messages[qi]
    case = loaded.case
    ref = state["study"]
    first_image = next((m["images"][0] for m in messages if m.get("kind") == "question" and m.get("images")), None)
    model_id = next((m.get("model_id", "unknown") for m in messages[qi:] if m["role"] == "assistant"), "unknown")
    phantom = ref.get("kind") == "phantom"
    settings = RunSettings(
        source_spec="phantom" if phantom else None,
        source_config={"size": int(ref["size"])} if phantom and "size" in ref else {},
        segmenter=ctx.segmenter,
        sam_checkpoint=ctx.sam_checkpoint,
        tool_mode=ctx.tool_mode,
        model_id=model_id,
    )
    if case is not None and _is_case_question(messages, qi, loaded):
        from medgym.environments.recorder import case_header

        header = case_header(case, settings, qmsg["content"], first_image, None)
    else:
        header = open_header(
            settings,
            qmsg["content"],
            first_image,
            source="upload" if ref.get("kind") == "upload" else str(ref.get("kind")),
            case_id=loaded.name,
            seed=ref.get("seed"),
            study_hash=loaded.study.content_hash(),
        )
    recorder = EpisodeRecorder(writer, header)
    for i, m in enumerate(messages[qi + 1 :], start=qi + 1):
        if m["role"] != "assistant":
            continue
        following = []
        for n in messages[i + 1 :]:
            if n["role"] == "assistant":
                break
            following.append(n)
        action = parse_action(m["content"])
        calls = [
            ToolCallRecord(
                name=t["name"],
                arguments=t.get("arguments") or {},
                tool_version=t.get("tool_version"),
                text=t.get("text", t["content"]),
                data=t.get("data") or {},
                images=t.get("images") or [],
                error=bool(t.get("error")),
                seconds=float(t.get("seconds", 0.0)),
            )
            for t in following
            if t["role"] == "tool"
        ]
        recorder.add_step(
            model_text=m["content"],
            calls=calls,
            answer=action.answer if not action.calls else None,
            box=action.box,
            format_error=action.error,
        )
    with _TRACE_LOCK:
        recorder.close(
            truncated=state.get("status") != "answered",
            answer=state.get("answer"),
            box=state.get("box"),
            score=(score or {}).get("parts", {}),
            reward=(score or {}).get("reward", 0.0),
        )


# ----------------------------------------------------------------------------- wiring


def after_intake(state: AgentState) -> str:
    return "planner" if state.get("status") == "running" else "finish"


def after_planner(state: AgentState) -> str:
    if state.get("pending"):
        return "tools"
    return "planner" if state.get("status") == "running" else "finish"


def after_tools(state: AgentState) -> str:
    return "planner" if state.get("status") == "running" else "finish"


def recursion_limit(max_steps: int) -> int:
    """LangGraph supersteps for a question: intake, two per model turn (planner, tools), finish, slack."""
    return 2 * max_steps + 6


def build_graph() -> StateGraph:
    """The uncompiled graph; compile it with a checkpointer to keep conversations."""
    g = StateGraph(AgentState, context_schema=AgentContext)
    g.add_node("intake", intake)
    g.add_node("planner", planner)
    g.add_node("tools", tools)
    g.add_node("finish", finish)
    g.add_edge(START, "intake")
    g.add_conditional_edges("intake", after_intake, ["planner", "finish"])
    g.add_conditional_edges("planner", after_planner, ["tools", "planner", "finish"])
    g.add_conditional_edges("tools", after_tools, ["planner", "finish"])
    g.add_edge("finish", END)
    return g


@lru_cache(maxsize=1)
def _sampler():
    # checkpointer=False: the sampled runs must not be saved as a subgraph of the chat's thread.
    return build_graph().compile(checkpointer=False)


def make_graph(config: Any = None):
    """The compiled graph for LangGraph's server / Studio (``langgraph.json``); the server adds persistence."""
    return build_graph().compile(name="medgym").with_config(recursion_limit=recursion_limit(AgentContext.max_steps))
