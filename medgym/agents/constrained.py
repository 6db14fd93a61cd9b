"""Constrained decoding: every turn a local model generates parses, by construction.

A turn is decoded under a grammar (xgrammar, one of the engines behind vLLM's structured outputs)
that accepts exactly what :func:`medgym.environments.parsing.parse_action` reads without a format
error::

    turn     ::= thoughts (calls | answer)
    thoughts ::= up to N characters, no "<"
    calls    ::= <tool_call> ws {"name": TOOL, "arguments": ARGS} ws </tool_call>  (ws another call)*  ws
    answer   ::= <answer> up to M characters, no "<" </answer>  (ws <box>[x0, y0, x1, y1]</box>)?  ws

where ``{"name": ..., "arguments": ...}`` is one of the prompted tools with arguments matching its
parameters schema (unknown tools, unknown arguments and wrong types are refused; string arguments
are bounded and hold no ``<``, so no tag can hide inside one). The end-of-turn token is allowed only
where the grammar is complete.

The free text is bounded (:class:`TurnLimits`, sized from the token budget by
:meth:`TurnLimits.for_budget`), so a turn that follows the grammar ends within ``max_new_tokens``.
When the budget still runs out mid-turn (a long JSON number, say), the text is cut inside an open
tag or before any tag, which the parser reports as a format error. To keep that true, a turn that
could end may start another call (or its box) only while the budget has room for the whole opening
tag: a cut inside a half-written ``<tool_call>`` (``<`` or ``<tool`` spelled out) would still parse.

For the training loop and any ``generate`` call::

    processor = constrained_logits_processor(tokenizer, tools, max_new_tokens=n)   # one per generate call
    model.generate(**inputs, max_new_tokens=n, logits_processor=LogitsProcessorList([processor]), ...)

The processor keeps one matcher per row, so batched generation (several prompts, or
``num_return_sequences`` samples) works; it is not meant for beam search (beams reorder rows).
Compiled grammars are cached per (tokenizer, vocabulary size, stop tokens, tools, limits).
:func:`turn_grammar` gives the same grammar as EBNF text, for endpoints that take one (vLLM's
``structured_outputs.grammar``).
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor

log = logging.getLogger(__name__)

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
BOX_OPEN, BOX_CLOSE = "<box>", "</box>"
OPENING_TAGS = (TOOL_CALL_OPEN, ANSWER_OPEN, BOX_OPEN)
# A box coordinate: a finite decimal (parse_box refuses NaN and infinities; JSON has no "+" or ".5").
_COORDINATE = r"-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,4})?"


@dataclass(frozen=True)
class TurnLimits:
    """How much free text a constrained turn may hold (characters; a token is at least one)."""

    thought_chars: int = 256  # text before the calls or the answer
    answer_chars: int = 256  # inside <answer>...</answer>
    string_chars: int = 200  # each string argument of a tool call (mask ids, look-up queries)
    whitespace: int = 2  # between and around tags, and in a row inside the call JSON
    max_calls: int = 0  # tool calls a turn may hold (0: any number); a policy trained on one a turn writes one

    def __post_init__(self) -> None:
        for name in ("thought_chars", "answer_chars", "string_chars", "whitespace", "max_calls"):
            if getattr(self, name) < 0:
                raise ValueError(f"TurnLimits.{name} must be 0 or more, got {getattr(self, name)}")

    @classmethod
    def for_budget(cls, max_new_tokens: int) -> TurnLimits:
        """Limits that leave a turn room to finish within ``max_new_tokens``.

        Thoughts get a quarter of the budget, the answer and each string argument half of it (at one
        character per token, the worst case: digits are single tokens in many tokenizers), capped at the
        defaults. A string bounded only by its own cap could outrun a small budget: a policy that never
        closes one (a drifting GRPO policy filling ``structure`` with syllables) was cut mid-call, a format
        error under a grammar meant to rule them out.

        >>> TurnLimits.for_budget(128)
        TurnLimits(thought_chars=32, answer_chars=64, string_chars=64, whitespace=2, max_calls=0)
        """
        return cls(
            thought_chars=min(cls.thought_chars, max_new_tokens // 4),
            answer_chars=min(cls.answer_chars, max(1, max_new_tokens // 2)),
            string_chars=min(cls.string_chars, max(1, max_new_tokens // 2)),
        )


# ----------------------------------------------------------------------------- the grammar


def _bounded(schema: Any, string_chars: int) -> Any:
    """A parameters schema as the grammar should read it.

    OpenAPI's ``nullable: true`` (the tool schemas use it) becomes "or null", and free strings get a
    length bound and lose ``<`` and the characters JSON would have to escape, so a tag can never
    appear inside an argument (``parse_action`` splits calls on the first ``</tool_call>``).
    Descriptions are dropped: they do not constrain anything.
    """
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("description", "title", "nullable"):
            continue
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: _bounded(sub, string_chars) for name, sub in value.items()}
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems") and isinstance(value, list):
            out[key] = [_bounded(sub, string_chars) for sub in value]
        elif key in ("items", "additionalProperties", "not"):
            out[key] = _bounded(value, string_chars)
        else:
            out[key] = value
    if out.get("type") == "string" and not any(k in out for k in ("enum", "const", "pattern", "format")):
        longest = min(string_chars, int(out.pop("maxLength", string_chars)))
        out.pop("minLength", None)
        out["pattern"] = f'^[^<"\\\\\\x00-\\x1f]{{0,{longest}}}$'
    if schema.get("nullable") is True:
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def _array_branch(schema: Any) -> dict[str, Any] | None:
    """The array schema inside a (possibly ``anyOf``-with-null) argument model property, if any."""
    if not isinstance(schema, dict):
        return None
    for branch in schema.get("anyOf", [schema]):
        if isinstance(branch, dict) and branch.get("type") == "array":
            return branch
    return None


def _merge_lengths(prompted: dict[str, Any], model: dict[str, Any] | None) -> None:
    """Copy the argument model's ``minItems``/``maxItems`` into a prompted array schema, items included."""
    if model is None or prompted.get("type") != "array":
        return
    for key in ("minItems", "maxItems"):
        if key in model and key not in prompted:
            prompted[key] = model[key]
    if isinstance(prompted.get("items"), dict):
        _merge_lengths(prompted["items"], _array_branch(model.get("items")))


def with_model_lengths(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """``parameters`` of a medgym tool with its argument model's array lengths (a box has 4 numbers).

    The schemas models are prompted with come from transformers' ``get_json_schema``, which drops them,
    so without this a grammar would let a model write a box of 3 numbers that the tool then refuses.
    Other tools' parameters are returned as given.
    """
    from medgym.tools import TOOLS

    spec = TOOLS.get(name)
    if spec is None:
        return parameters
    model = spec.input_model.model_json_schema().get("properties", {})
    for arg, prompted in (parameters.get("properties") or {}).items():
        if isinstance(prompted, dict):
            _merge_lengths(prompted, _array_branch(model.get(arg)))
    return parameters


def call_schema(tool: dict[str, Any], string_chars: int = TurnLimits.string_chars) -> dict[str, Any]:
    """The JSON schema of one call of ``tool`` (an OpenAI-style ``{"type": "function", "function": ...}``),
    with a medgym tool's array lengths (:func:`with_model_lengths`)."""
    function = tool.get("function", tool)
    parameters = copy.deepcopy(function.get("parameters") or {"type": "object", "properties": {}})
    parameters = with_model_lengths(function["name"], parameters)
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": _bounded(parameters, string_chars)},
        "required": ["name", "arguments"],
    }


def tools_key(tools: list[dict[str, Any]] | None) -> str:
    """A stable text key of a tool list (for caches)."""
    return json.dumps(tools or [], sort_keys=True)


def turn_format(tools: list[dict[str, Any]] | None, limits: TurnLimits = TurnLimits()) -> Any:
    """The turn as an xgrammar structural tag (see the module docstring); no tools: answers only."""
    from xgrammar import Grammar
    from xgrammar import structural_tag as st

    ws = st.RegexFormat(pattern=f"[ \\n]{{0,{limits.whitespace}}}")
    text = st.RegexFormat(pattern=f"[^<]{{0,{limits.answer_chars}}}")
    c = _COORDINATE
    box = st.TagFormat(
        begin=BOX_OPEN,
        content=st.RegexFormat(pattern=rf"\[{c}, ?{c}, ?{c}, ?{c}\]"),
        end=BOX_CLOSE,
    )
    answer = st.SequenceFormat(
        elements=[
            st.TagFormat(begin=ANSWER_OPEN, content=text, end=ANSWER_CLOSE),
            st.OptionalFormat(content=st.SequenceFormat(elements=[ws, box])),
            ws,
        ]
    )
    branches: list[Any] = [answer]
    if tools:
        calls_json = [
            # JSON with canonical separators, up to `whitespace` more characters in a row: the style every
            # chat template's examples use, with room for a model that writes it compactly or spaced out.
            st.GrammarFormat(
                grammar=str(
                    Grammar.from_json_schema(
                        call_schema(t, limits.string_chars),
                        any_whitespace=True,
                        max_whitespace_cnt=limits.whitespace,
                        strict_mode=True,
                    )
                )
            )
            for t in tools
        ]
        call = st.TagFormat(
            begin=TOOL_CALL_OPEN,
            content=st.SequenceFormat(elements=[ws, st.OrFormat(elements=calls_json), ws]),
            end=TOOL_CALL_CLOSE,
        )
        more: list[Any] = [st.StarFormat(content=st.SequenceFormat(elements=[ws, call]))]
        if limits.max_calls:  # up to max_calls - 1 more, each optional after the one before
            more = []
            for _ in range(limits.max_calls - 1):
                more = [st.OptionalFormat(content=st.SequenceFormat(elements=[ws, call, *more]))]
        calls = st.SequenceFormat(elements=[call, *more, ws])
        branches.insert(0, calls)
    thoughts = st.RegexFormat(pattern=f"[^<]{{0,{limits.thought_chars}}}")
    return st.StructuralTag(format=st.SequenceFormat(elements=[thoughts, st.OrFormat(elements=branches)]))


def turn_grammar(tools: list[dict[str, Any]] | None, limits: TurnLimits = TurnLimits()) -> str:
    """The turn grammar as EBNF text (xgrammar's dialect, GBNF-like), e.g. for vLLM's ``structured_outputs``."""
    from xgrammar import Grammar

    return str(Grammar.from_structural_tag(turn_format(tools, limits)))


# ----------------------------------------------------------------------------- compiled, per tokenizer


class TokenizerGrammars:
    """What one tokenizer needs: xgrammar's view of its vocabulary, a compiler, and compiled turn grammars.

    The vocabulary is read with ``TokenizerInfo.from_huggingface`` (it detects byte-level BPE, SentencePiece
    and the like, and decodes added tokens such as ``<tool_call>`` to their text), then rebuilt with every
    special token but the stop tokens blanked: special tokens (``<|image_pad|>``, ``<|im_start|>``) are
    never part of a turn, even where their text would fit (inside an argument, say).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]):
        import xgrammar as xgr

        detected = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        specials = set(getattr(tokenizer, "all_special_ids", []) or []) - set(stop_token_ids)
        vocab = [b"" if i in specials else token for i, token in enumerate(detected.decoded_vocab)]
        self.info = xgr.TokenizerInfo(
            vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2)
        self._compiled: dict[tuple[str, TurnLimits], Any] = {}
        self._lock = threading.Lock()

    def compiled(self, tools: list[dict[str, Any]] | None, limits: TurnLimits) -> Any:
        key = (tools_key(tools), limits)
        with self._lock:
            if key not in self._compiled:
                self._compiled[key] = self.compiler.compile_structural_tag(turn_format(tools, limits))
            return self._compiled[key]


_CACHE: dict[tuple[int, int, tuple[int, ...]], tuple[weakref.ref, TokenizerGrammars]] = {}
_CACHE_LOCK = threading.Lock()


def stop_ids(tokenizer: Any, generation_config: Any = None) -> tuple[int, ...]:
    """The end-of-turn tokens: the generation config's ``eos_token_id`` (one or a list) and the tokenizer's."""
    ids: list[int] = []
    for source in (getattr(generation_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    if not ids:
        raise ValueError("constrained decoding needs an end-of-turn token: the tokenizer has no eos_token_id.")
    return tuple(ids)


def tokenizer_grammars(
    tokenizer: Any, vocab_size: int | None = None, stop_token_ids: tuple[int, ...] | None = None
) -> TokenizerGrammars:
    """The cached :class:`TokenizerGrammars` of a tokenizer (vocab size: the model's logits width)."""
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = tokenizer.tokenizer  # a processor: its tokenizer
    vocab_size = int(vocab_size or len(tokenizer))
    stops = tuple(stop_token_ids) if stop_token_ids else stop_ids(tokenizer)
    key = (id(tokenizer), vocab_size, stops)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0]() is tokenizer:
            return hit[1]
        for k in [k for k, (ref, _) in _CACHE.items() if ref() is None]:
            del _CACHE[k]  # a tokenizer that is gone (its id may be reused)
        entry = TokenizerGrammars(tokenizer, vocab_size, stops)
        _CACHE[key] = (weakref.ref(tokenizer), entry)
        return entry


# ----------------------------------------------------------------------------- the logits processor


class TurnGrammarProcessor(LogitsProcessor):
    """Masks every token the turn grammar refuses; one xgrammar matcher per row.

    State starts on the first call of a ``generate`` (the prompt) and follows one new token per
    row per call; a call that is not the next step of the same generation starts afresh, so an
    instance reused across ``generate`` calls is safe (a fresh one per call is the intended use).
    Rows whose matcher has accepted a stop token are left alone (``generate`` pads them).

    With ``max_new_tokens``, a row whose turn could end stops there (only stop tokens allowed) once
    fewer tokens are left than the longest opening tag and its whitespace need (see the module
    docstring): a budget cut then always falls inside an open tag, a format error.
    """

    def __init__(
        self,
        tokenizer: Any,
        tools: list[dict[str, Any]] | None,
        *,
        limits: TurnLimits = TurnLimits(),
        max_new_tokens: int | None = None,
        vocab_size: int | None = None,
        stop_token_ids: tuple[int, ...] | None = None,
    ):
        self.tokenizer = tokenizer
        self.tools = tools
        self.limits = limits
        self.max_new_tokens = max_new_tokens
        self.reserve = max(len(tag) for tag in OPENING_TAGS) + limits.whitespace
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.grammars: TokenizerGrammars | None = None
        self.matchers: list[Any] = []
        self.live: list[bool] = []
        self.prompt_length = 0
        self.length = -1
        self.bitmask: torch.Tensor | None = None

    def _start(self, batch: int, length: int, width: int) -> None:
        import xgrammar as xgr

        if self.grammars is None:
            self.grammars = tokenizer_grammars(self.tokenizer, self.vocab_size or width, self.stop_token_ids)
        compiled = self.grammars.compiled(self.tools, self.limits)
        self.matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
        self.live = [True] * batch
        self.prompt_length = length
        self.bitmask = xgr.allocate_token_bitmask(batch, self.grammars.vocab_size)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        import xgrammar as xgr

        batch, length = input_ids.shape
        if length != self.length + 1 or len(self.matchers) != batch:
            self._start(batch, length, scores.shape[-1])
        else:
            for row, token in enumerate(input_ids[:, -1].tolist()):
                matcher = self.matchers[row]
                if self.live[row] and not matcher.is_terminated() and not matcher.accept_token(token):
                    # only another processor forcing a token can get here; leave the row unconstrained
                    log.warning("constrained decoding: row %d took token %d outside the grammar", row, token)
                    self.live[row] = False
        self.length = length
        assert self.grammars is not None and self.bitmask is not None
        rows = [r for r in range(batch) if self.live[r] and not self.matchers[r].is_terminated()]
        if not rows:
            return scores
        for r in rows:
            self.matchers[r].fill_next_token_bitmask(self.bitmask, r)
        vocab = self.grammars.vocab_size
        xgr.apply_token_bitmask_inplace(
            scores, self.bitmask.to(scores.device), vocab_size=min(vocab, scores.shape[-1]), indices=rows
        )
        if scores.shape[-1] > vocab:  # logits past the grammar's vocabulary are never part of a turn
            scores[rows, vocab:] = -float("inf")
        left = None if self.max_new_tokens is None else self.max_new_tokens - (length - self.prompt_length)
        if left is not None and left < self.reserve:
            ending = [r for r in rows if self.matchers[r].is_completed()]
            if ending:  # no room to open and close another tag: end the turn here
                stops = list(self.grammars.stop_token_ids)
                kept = scores[ending][:, stops].clone()
                scores[ending] = -float("inf")
                scores[torch.tensor(ending)[:, None], torch.tensor(stops)[None, :]] = kept
        return scores

    def completed(self, row: int = 0) -> bool:
        """Whether row ``row`` ended where the grammar allows (False: the budget cut it mid-turn)."""
        if row >= len(self.matchers):
            return False
        matcher = self.matchers[row]
        return bool(matcher.is_terminated() or matcher.is_completed())


def constrained_logits_processor(
    tokenizer: Any,
    tools: list[dict[str, Any]] | None,
    *,
    limits: TurnLimits | None = None,
    max_new_tokens: int | None = None,
    vocab_size: int | None = None,
    stop_token_ids: tuple[int, ...] | list[int] | None = None,
) -> TurnGrammarProcessor:
    """A fresh processor for one ``generate`` call that keeps every row a well-formed medgym turn.

    ``tokenizer``: a Hugging Face tokenizer (or a processor holding one); ``tools``: the tool list the
    prompt carries (OpenAI-style schemas; None: answers only); ``limits``: free-text bounds (default:
    sized from ``max_new_tokens`` when given, else :class:`TurnLimits`); ``max_new_tokens``: the
    ``generate`` budget (pass it: near its end a turn that could stop does); ``vocab_size``: the model's
    logits width (default: read from the scores); ``stop_token_ids``: the end-of-turn tokens (default:
    the tokenizer's ``eos_token_id``; pass the generation config's too, see :func:`stop_ids`).
    """
    if limits is None:
        limits = TurnLimits.for_budget(max_new_tokens) if max_new_tokens else TurnLimits()
    return TurnGrammarProcessor(
        tokenizer,
        tools,
        limits=limits,
        max_new_tokens=max_new_tokens,
        vocab_size=vocab_size,
        stop_token_ids=tuple(stop_token_ids) if stop_token_ids else None,
    )


__all__ = [
    "TokenizerGrammars",
    "TurnGrammarProcessor",
    "TurnLimits",
    "call_schema",
    "constrained_logits_processor",
    "stop_ids",
    "tokenizer_grammars",
    "turn_format",
    "turn_grammar",
]
