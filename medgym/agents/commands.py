"""Commands of the agent: chat in the terminal (``medgym chat``), on the web (``medgym web``), and any policy
behind an OpenAI-compatible endpoint (``medgym serve``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from medgym import add_tool_mode_option

BACKEND_CHOICES = ["expert", "demo", "openai", "transformers", "embedded", "embedded-sft"]
MODEL_BACKENDS = ("openai", "transformers", "embedded", "embedded-sft")
DEFAULT_BACKEND = "embedded"  # the chat and the web page run the project's own policy, constrained


def backend_spec(text: str) -> str:
    """``--backend``: a name from :data:`BACKEND_CHOICES`, or a full spec (``openai:MODEL@URL``, ``embedded:PATH``)."""
    name = text.partition(":")[0]
    if name not in BACKEND_CHOICES:
        raise argparse.ArgumentTypeError(
            f"unknown backend {text!r}; write one of {', '.join(BACKEND_CHOICES)} "
            "(or a spec: openai:MODEL@URL, transformers:PATH, embedded:PATH)"
        )
    return text


def constrained_default(flag: bool | None, backend: str) -> bool:
    """``--constrained`` as given, else on for local models and off for endpoints (the grammar is a vLLM extension).

    >>> constrained_default(None, "embedded"), constrained_default(None, "openai:m@http://h/v1"), constrained_default(True, "openai")
    (True, False, True)
    """
    return flag if flag is not None else backend.partition(":")[0] != "openai"


def _context(args: argparse.Namespace, backend: str):
    from medgym.agents.backends import BackendUnavailable, make_backend, parse_spec
    from medgym.agents.graph import AgentContext

    options: dict[str, Any] = {
        "model": args.model or "default",
        "base_url": args.base_url,
        "model_path": args.model,
        "checkpoint": args.checkpoint,
        "constrained": constrained_default(args.constrained, backend),
    }
    chosen: Any = backend
    if parse_spec(backend)[0] in MODEL_BACKENDS:
        try:
            chosen = make_backend(backend, **options)  # load once, fail early with a clear message
        except BackendUnavailable as exc:
            raise SystemExit(f"medgym: {exc}") from None
    return AgentContext(
        backend=chosen,
        max_steps=args.max_steps,
        temperature=args.temperature,
        reliability_n=args.reliability,
        segmenter=args.segmenter,
        sam_checkpoint=args.sam_checkpoint,
        tool_mode=args.tool_mode,
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        default=DEFAULT_BACKEND,
        type=backend_spec,
        metavar="BACKEND",
        help="planner: embedded (default: the shipped policy, trained on phantoms; --checkpoint), "
        "openai:MODEL@URL or openai (--base-url, --model), transformers:PATH or transformers (--model PATH), "
        "expert (phantom cases; uploads use the scripted demo), demo (scripted, not a model)",
    )
    p.add_argument(
        "--constrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode under the turn grammar, so every model turn parses: on by default for local models "
        "(embedded, transformers; --no-constrained turns it off); for openai endpoints only when given "
        "(it sends the grammar as vLLM's extra_body structured_outputs)",
    )
    p.add_argument("--model", default=None, help="openai: model name; transformers: model folder")
    p.add_argument(
        "--base-url", default=None, help="openai: endpoint, e.g. http://127.0.0.1:8000/v1 (else $OPENAI_BASE_URL)"
    )
    p.add_argument("--checkpoint", default=None, help="embedded: checkpoint folder (default: the shipped one)")
    p.add_argument("--max-steps", type=int, default=8, help="model turns per question before stopping")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--reliability",
        type=int,
        default=0,
        metavar="N",
        help="also run N sampled trajectories (temperature 0.7) and report how many agree",
    )
    p.add_argument("--segmenter", default="medsam", choices=["threshold", "medsam", "sam"])
    add_tool_mode_option(
        p, "predicted: no tool reads ground truth (default); oracle: tools read a case's structures (upper bound)"
    )
    p.add_argument("--sam-checkpoint", default=None, help="segment-anything checkpoint for --segmenter sam")


def _print_event(event: dict[str, Any], out: Path, step: list[int]) -> None:
    from medgym.agents.graph import _image_store

    store = _image_store(str(out / "images"))
    kind = event.get("kind")
    if kind == "question":
        print(f"? {event['content']}")
    elif kind == "turn":
        step[0] += 1
        print(f"\n[{step[0]}] {event.get('model_id', 'model')}: {event['content']}")
    elif kind == "tool":
        saved = []
        for j, digest in enumerate(event.get("images") or [], start=1):
            path = out / f"step{step[0]}_{event['name']}_{j}.png"
            path.write_bytes(store.path(digest).read_bytes())
            saved.append(path.name)
        flag = " (error)" if event.get("error") else ""
        print(f"    -> {event['name']}{flag}: {event['text']}" + (f"  [saved {', '.join(saved)}]" if saved else ""))
    elif kind in ("format_error", "error", "budget"):
        print(f"    !! {event['content']}")
    elif kind == "note":
        print(event["content"])
    elif kind == "result":
        line = "ANSWER: " + (event.get("answer") or "(none)")
        rel = event.get("reliability")
        if rel:
            line += f"   reliability {rel['score']:.2f} over {rel['n']} sampled runs"
        print("\n" + line)
        if event.get("overlay"):
            path = out / "answer_overlay.png"
            path.write_bytes(store.path(event["overlay"]).read_bytes())
            print(f"overlay: {path}")


def cmd_chat(args: argparse.Namespace) -> int:
    from medgym.agents.session import ChatAgent
    from medgym.agents.studies import UploadError, load_upload_bytes

    image, question = args.image, args.question
    if args.case_seed is not None and question is None:
        image, question = None, image  # `medgym chat --case-seed 3 "question"`
    if image is None and args.case_seed is None:
        raise SystemExit("medgym chat: give an IMAGE file, or --case-seed N to chat over a phantom case")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = args.backend
    ctx = _context(args, "demo" if backend == "expert" and image is not None else backend)
    ctx.data_dir = str(out)
    if backend == "expert" and image is not None:
        print("note: uploaded images have no expert trace; running the SCRIPTED DEMO (not a model).", file=sys.stderr)
    with ChatAgent(Path(args.db) if args.db else out / "chat.sqlite", ctx) as agent:
        if image is not None:
            try:
                study = load_upload_bytes(Path(image).read_bytes(), Path(image).name)
            except (UploadError, OSError) as exc:
                raise SystemExit(f"medgym chat: {exc}") from None
            ref = {"kind": "upload", "id": ctx.uploads.save(study, Path(image).name)}
        else:
            ref = {"kind": "phantom", "seed": args.case_seed}
        thread = args.session or agent.new_thread_id()
        step = [0]
        final: dict[str, Any] = {}
        for event in agent.ask(thread, question or "", ref):
            if event["kind"] == "done":
                final = event
            else:
                _print_event(event, out, step)
        (out / "answer.json").write_text(json.dumps(final, indent=1))
        print(f"session {thread} (continue with --session {thread} --db {agent.db})")
    return 0 if final.get("status") == "answered" else 1


def _checked_token(args: argparse.Namespace, command: str) -> str | None:
    """The token (--token or $MEDGYM_TOKEN), checked against the bind address before any model loads."""
    from medgym.agents.web import check_token

    token = args.token or os.environ.get("MEDGYM_TOKEN") or None
    try:
        check_token(token, args.host)  # refuse at once, saying how to fix it
    except ValueError as exc:
        raise SystemExit(f"medgym {command}: {exc}") from None
    return token


def cmd_web(args: argparse.Namespace) -> int:
    from medgym.agents.web import serve

    token = _checked_token(args, "web")
    data = Path(args.data)
    ctx = _context(args, args.backend)
    hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    url = f"http://{args.host}:{args.port}/" + ("?token=YOUR_TOKEN  (once; the page keeps it)" if token else "")
    grammar = "constrained" if constrained_default(args.constrained, args.backend) else "unconstrained"
    print(f"medgym web on {url}  (db {args.db}, data {data}, backend {args.backend}, {grammar})")
    serve(args.host, args.port, args.db, data, ctx, allowed_hosts=hosts, token=token)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from medgym.agents.backends import BackendUnavailable, make_policy
    from medgym.agents.serve import check_servable, serve

    token = _checked_token(args, "serve")
    try:
        policy = make_policy(args.policy, device=args.device, constrained=args.constrained)
        check_servable(policy)
    except BackendUnavailable as exc:
        raise SystemExit(f"medgym serve: {exc}") from None
    host = f"[{args.host}]" if ":" in args.host else args.host
    auth = "; send 'Authorization: Bearer TOKEN' (the API key)" if token else ""
    print(f"medgym serve: {args.policy} as model {policy.model_id!r} on http://{host}:{args.port}/v1{auth}")
    serve(policy, args.host, args.port, token=token)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this subpackage's subcommands to the `medgym` parser."""
    c = sub.add_parser("chat", help="ask the agent about an image; streams every step, saves overlays")
    c.add_argument("image", nargs="?", help="PNG, JPEG, DICOM or NIfTI file (omit with --case-seed)")
    c.add_argument("question", nargs="?", help="the question (omit with --case-seed to ask the case's own)")
    c.add_argument(
        "--case-seed", type=int, default=None, help="chat over phantom case N (expert backend follows its trace)"
    )
    c.add_argument("--out", default="medgym-chat", help="folder for overlays, answer.json, images and traces")
    c.add_argument("--db", default=None, help="SQLite file of the conversations (default OUT/chat.sqlite)")
    c.add_argument("--session", default=None, help="continue this session with a follow-up question")
    _add_run_options(c)
    c.set_defaults(func=cmd_chat)

    w = sub.add_parser("web", help="the clinician web chat (FastAPI + a small page)")
    w.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    w.add_argument("--port", type=int, default=7860)
    w.add_argument("--db", default="medgym-web/chat.sqlite", help="SQLite file of the conversations")
    w.add_argument("--data", default="medgym-web", help="folder for uploads, images and traces")
    w.add_argument(
        "--token",
        default=None,
        help="access token every /api/ call needs (else $MEDGYM_TOKEN, preferred: a command line is visible to "
        "other users); required off loopback. Open the page once as /?token=TOKEN",
    )
    w.add_argument(
        "--allowed-hosts",
        default="",
        metavar="NAMES",
        help="comma-separated host names the server answers to besides loopback and the bound address "
        "(e.g. chat.lan,192.168.1.5; '*' for any)",
    )
    _add_run_options(w)
    w.set_defaults(func=cmd_web)

    s = sub.add_parser("serve", help="serve a local policy behind an OpenAI-compatible endpoint (/v1/chat/completions)")
    s.add_argument(
        "--policy",
        required=True,
        help="the policy to serve: embedded, embedded-sft, embedded:PATH, transformers:PATH or demo "
        "(the expert needs a case, so it cannot be served)",
    )
    s.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--token",
        default=None,
        help="access token every request needs as 'Authorization: Bearer TOKEN' (else $MEDGYM_TOKEN, preferred: "
        "a command line is visible to other users); required off loopback",
    )
    s.add_argument(
        "--device", default=None, help="transformers/embedded: torch device (default: cuda if present, embedded: cpu)"
    )
    s.add_argument(
        "--constrained",
        action="store_true",
        help="decode the served model under the turn grammar, so every turn it serves parses (off by default)",
    )
    s.set_defaults(func=cmd_serve)
