"""Property-based fuzz (hypothesis): nothing a model writes makes the env, a tool, a reward or the
trace writer raise, and every rejection is an error the model can read.

Fuzzed: env actions (any text, any JSON inside ``<tool_call>``, numbers of any size and precision
with NaN, infinities, 1e308 and -0.0, deep nesting, control characters, lone surrogates, huge boxes
and lists), tool arguments to ``run_call`` for every registered tool (in both tool modes, on 2D,
3D and follow-up studies), completions to every reward function against real case columns, and
trace episodes with odd texts through ``TraceWriter.write`` and back.

The default run is small and derandomized (the same examples every run); ``-m slow`` runs the
same properties on fresh random examples, with at least 10,000 env actions.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from medgym.environments import ENV_ID
from medgym.environments.checks import check_context
from medgym.environments.rewards import FORMAT_PENALTY, REWARD_FUNCS, score_parts, total_reward
from medgym.environments.runner import CallRecord, run_call
from medgym.environments.sources import PhantomSource
from medgym.tools import TOOLS, ToolContext
from medgym.tools.imaging import WINDOW_PRESETS
from medgym.traces import ImageStore, ToolCallRecord, TraceEpisode, TraceHeader, TraceStep, TraceWriter, read_traces
from medgym.traces.replay import ImageChecker, verify_episode

MODES = ("predicted", "oracle")
POOL_SEEDS = range(40)  # phantom cases 0..39: CT slices and volumes, chest CT, X-ray, follow-ups with a prior
SLOW_ENV_ACTIONS = 10_000
# An error result names itself as one ("Error: unknown tool ...", "Error in segment: ...") and says what to fix.
READABLE_ERROR = re.compile(r"^Error(: | in \S+: )\S")

COMMON = dict(
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
QUICK = settings(derandomize=True, **COMMON)
THOROUGH = settings(derandomize=False, **COMMON)


@pytest.fixture(autouse=True)
def _quiet_tool_logs(caplog):
    # A tool crash is logged with its traceback by the runner; the fuzz asserts there are none.
    caplog.set_level(logging.CRITICAL, logger="medgym")


@pytest.fixture(scope="module")
def cases():
    source = PhantomSource()
    return [source.case(seed) for seed in POOL_SEEDS]


# ----------------------------------------------------------------- strategies

ODD_CHARS = [
    "\x00", "\x01", "\x1b", "\x7f", "\x85", "\ud800", "\udfff", "\u200b", "\u202e", "\u2028", "\ufeff", "\uffff",
    "\U0001f600", "\U0010ffff", "\u00e9", "\n", "\r", "\t", "<", ">", "/", '"', "\\", "{", "}", "[", "]", ",", ":",
]  # fmt: skip
TAGS = ["<tool_call>", "</tool_call>", "<answer>", "</answer>", "<box>", "</box>"]
chars = st.one_of(st.characters(codec=None, exclude_categories=()), st.sampled_from(ODD_CHARS))
texts = st.text(chars, max_size=30)
# What a trace can store (UTF-8): everything but lone surrogates, which the env and the runner replace.
UTF8_ODD_CHARS = [c for c in ODD_CHARS if not "\ud800" <= c <= "\udfff"]
valid_texts = st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(UTF8_ODD_CHARS)), max_size=30)

EXTREMES = [
    0,
    -0.0,
    1e308,
    -1e308,
    1.7976931348623157e308,
    5e-324,
    -5e-324,
    1e-300,
    2**53 + 1,
    2**63,
    2**64,
    -(2**63) - 1,
]
NON_FINITE = [math.nan, math.inf, -math.inf]
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),  # NaN, infinities, -0.0 and subnormals included
    st.sampled_from(EXTREMES + NON_FINITE),
)
finite_numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30), st.floats(allow_nan=False, allow_infinity=False)
)
# Number literals only JSON text can hold: thousands of digits, exponents beyond the float range.
LITERALS = ["9" * 5000, "-" + "1" * 4400, "1e999", "-1e999", "1e-999", "-0", "0.0e0", "1E+308", "NaN", "Infinity",
            "-Infinity", "00", "1.", ".5", "+1", "0x10", "1_000", "1e", "--1"]  # fmt: skip
number_literals = st.one_of(numbers.map(lambda v: json.dumps(v)), st.sampled_from(LITERALS))

coordinate = st.one_of(st.integers(-20, 300), st.floats(-20, 300), numbers)
plausible_box = st.builds(
    lambda x, y, w, h: [x, y, x + w, y + h],
    st.integers(0, 250) | st.floats(0, 250),
    st.integers(0, 250) | st.floats(0, 250),
    st.integers(1, 120) | st.floats(0.01, 120),
    st.integers(1, 120) | st.floats(0.01, 120),
)
any_box = st.one_of(
    plausible_box, st.lists(coordinate, min_size=4, max_size=4), st.lists(coordinate, max_size=7), numbers
)
slice_index = st.one_of(st.none(), st.integers(-3, 25), numbers, texts)
study_name = st.sampled_from(["current", "prior", "other", "", None, 1])
structure_name = st.one_of(
    st.sampled_from(["lesion", "lesion_1", "lesion_2", "liver", "lung_left", "body", "empty", ""]), texts
)
mask_name = st.one_of(st.sampled_from(["mask_1", "mask_2", "mask_3", "mask_0"]), structure_name)

json_leaf = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    json_leaf, lambda kids: st.lists(kids, max_size=5) | st.dictionaries(texts, kids, max_size=5), max_leaves=20
)


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` nine times in ten: calls must often pass validation to reach the tools' code."""
    return st.integers(0, 9).flatmap(lambda i: bad if i == 9 else good)


def _args(*shapes: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Arguments of one of the tool's shapes, now and then with an extra key or pure garbage."""
    typed = st.one_of(*shapes)
    extra = st.builds(lambda a, b: {**a, **b}, typed, st.dictionaries(texts, json_values, min_size=1, max_size=2))
    return mostly(typed, st.one_of(extra, st.dictionaries(texts, json_values, max_size=4)))


def _with(required: dict[str, Any], **optional: st.SearchStrategy) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(required, optional=optional)


where = {
    "slice_index": mostly(st.none() | st.integers(0, 20), slice_index),
    "study": mostly(st.just("current"), study_name),
}
good_box = mostly(plausible_box, any_box)
good_point = mostly(
    st.lists(st.integers(0, 255) | st.floats(0, 255.99), min_size=2, max_size=2), st.lists(coordinate, max_size=4)
)
good_component = mostly(st.integers(1, 4), st.integers(-2, 6) | numbers)
TOOL_ARGS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "zoom": _args(
        _with(
            {"boxes": mostly(st.lists(good_box, min_size=1, max_size=4), st.lists(any_box, max_size=6) | any_box)},
            size=mostly(st.integers(32, 512), st.integers(0, 600) | numbers),
            **where,
        )
    ),
    "window": _args(
        _with({"preset": mostly(st.sampled_from(sorted(WINDOW_PRESETS)), st.none() | texts)}, **where),
        _with(
            {
                "center": mostly(st.floats(-3000, 3000) | st.integers(-3000, 3000), numbers),
                "width": mostly(st.floats(0.001, 5000) | st.integers(1, 5000), numbers),
            },
            **where,
        ),
    ),
    "detect": _args(_with({}, max_candidates=mostly(st.integers(1, 10), st.integers(-2, 20) | numbers), **where)),
    "segment": _args(
        _with({"box": good_box}, propagate=st.booleans() | json_leaf, **where),
        _with({"point": good_point}, propagate=st.booleans(), **where),
        _with(
            {"candidate": mostly(st.integers(1, 10), st.integers(-2, 12) | numbers)}, propagate=st.booleans(), **where
        ),
        _with({"structure": structure_name}, **where),
        _with({}, box=any_box, point=good_point, structure=structure_name, **where),
    ),
    "measure": _args(
        _with({"target": mask_name}, component=good_component, to=mask_name, **where),
        _with({"box": good_box}, **where),
        _with({}, target=mask_name, box=any_box, component=good_component, to=mask_name, **where),
    ),
    "retrieve": _args(
        _with({"query": mostly(st.text(min_size=3, max_size=80), st.text(chars, max_size=600))}, k=good_component)
    ),
}
assert set(TOOL_ARGS) == set(TOOLS), "a new tool needs fuzzing arguments here"

tool_names = st.one_of(st.sampled_from(sorted(TOOLS)), texts)
# retrieve runs a sentence encoder (the slowest call by far) over text its schema already bounds: fewer draws.
TOOL_WEIGHTS = [name for name in sorted(TOOLS) for _ in range(1 if name == "retrieve" else 4)]
any_arguments = st.one_of(json_values, st.text(chars, max_size=40), st.none())


@st.composite
def tool_call(draw) -> tuple[Any, Any]:
    """(name, arguments): mostly a real tool with arguments near its schema, sometimes anything."""
    if draw(st.integers(0, 9)) < 8:
        name = draw(st.sampled_from(TOOL_WEIGHTS))
        args = draw(TOOL_ARGS[name])
        return name, (json.dumps(args, allow_nan=True) if draw(st.integers(0, 9)) == 0 else args)
    return draw(st.one_of(tool_names, json_leaf)), draw(any_arguments)


def call_block(name: Any, args: Any, ensure_ascii: bool) -> str:
    try:
        body = json.dumps({"name": name, "arguments": args}, allow_nan=True, ensure_ascii=ensure_ascii)
    except (ValueError, TypeError):  # an int json cannot write (over 4300 digits): write it by hand
        body = '{"name": "zoom", "arguments": {"boxes": [[' + "9" * 5000 + ", 0, 1, 1]]}}"
    return f"<tool_call>{body}</tool_call>"


json_texts = st.recursive(
    st.one_of(number_literals, texts.map(json.dumps), st.sampled_from(["true", "false", "null"]), texts),
    lambda kids: (
        st.lists(kids, max_size=5).map(lambda xs: "[" + ",".join(xs) + "]")
        | st.lists(st.tuples(texts, kids), max_size=5).map(
            lambda kv: "{" + ",".join(json.dumps(k) + ":" + v for k, v in kv) + "}"
        )
    ),
    max_leaves=25,
)
deep_json = st.integers(1, 3000).flatmap(
    lambda n: st.sampled_from(
        [
            "[" * n + "]" * n,
            '{"name": "zoom", "arguments": {"boxes": ' + "[" * n + "]" * n + "}}",
            '{"name": "measure", "arguments": ' + '{"a": ' * n + "1" + "}" * n + "}",
            '{"name": "zoom", "arguments": "' + "[" * n + "]" * n + '"}',
            "[" * n,
        ]
    )
)
box_texts = st.one_of(
    st.lists(number_literals, max_size=8).map(lambda xs: "[" + ", ".join(xs) + "]"),
    st.lists(finite_numbers, min_size=4, max_size=4).map(json.dumps),
    st.integers(0, 200_000).map(lambda n: "[" + ",".join(["1"] * n) + "]"),  # a huge list
    json_texts,
    texts,
)
answer_texts = st.one_of(texts, number_literals, st.sampled_from(["A", "b)", "yes", "No.", "12.5 mm", "left lung"]))


@st.composite
def actions(draw) -> Any:
    """One model turn: tool calls, an answer, broken markup, or not text at all."""
    kind = draw(st.integers(0, 19))
    prefix = draw(texts)
    if kind < 8:  # well-formed calls, arguments near each tool's schema
        calls = draw(st.lists(tool_call(), min_size=1, max_size=3))
        ascii_only = draw(st.booleans())
        return prefix + "".join(call_block(n, a, ascii_only) for n, a in calls) + draw(texts)
    if kind < 10:  # any JSON-ish text inside the tags
        return prefix + "".join(
            f"<tool_call>{j}</tool_call>" for j in draw(st.lists(json_texts, min_size=1, max_size=2))
        )
    if kind == 10:
        return f"<tool_call>{draw(deep_json)}</tool_call>"
    if kind < 14:  # an answer, with or without a box
        box = f"<box>{draw(box_texts)}</box>" if draw(st.booleans()) else ""
        inner_box = f"<box>{draw(box_texts)}</box>" if draw(st.integers(0, 4)) == 0 else ""
        return f"{prefix}<answer>{draw(answer_texts)}{inner_box}</answer>{box}{draw(texts)}"
    if kind < 17:  # tag soup: tags in any order, unclosed, both calls and answers
        pieces = st.one_of(st.sampled_from(TAGS), texts, json_texts)
        return "".join(draw(st.lists(pieces, max_size=12)))
    if kind == 17:
        return draw(st.text(chars, max_size=300))
    if kind == 18:  # long turns
        return draw(st.integers(0, 300_000).map(lambda n: prefix * (n // max(1, len(prefix))) + "x" * (n % 7)))
    return draw(st.one_of(st.none(), numbers, st.binary(max_size=10), st.lists(texts, max_size=3), json_values))


# ----------------------------------------------------------------- env


class EnvFuzz:
    """Two recording envs (predicted and oracle tools) and what the fuzz saw in them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.counts: Counter[str] = Counter()
        self.envs = {
            mode: gym.make(
                ENV_ID,
                source="phantom",
                segmenter="threshold",
                tool_mode=mode,
                record_to=folder / mode / "traces.jsonl",
                model_id="fuzz",
            )
            for mode in MODES
        }

    def episode(self, mode: str, case: Any, turns: list[Any]) -> None:
        env = self.envs[mode]
        obs, _ = env.reset(options={"case": case})
        assert env.observation_space.contains(obs)
        self.counts["episodes"] += 1
        for turn in turns:
            self.step(env, turn)
            if self._ended:
                break

    def step(self, env: gym.Env, action: Any) -> None:
        obs, reward, terminated, truncated, info = env.step(action)
        self.counts["actions"] += 1
        self._ended = terminated or truncated
        assert env.observation_space.contains(obs), repr(obs["text"])[:200]
        assert isinstance(reward, float) and math.isfinite(reward)
        if "format_error" in info:
            self.counts["format_errors"] += 1
            assert reward == FORMAT_PENALTY and info["format_error"].startswith("Format error: ")
            assert obs["text"].startswith("Format error: ")
        elif "calls" in info:
            records: list[CallRecord] = info["calls"]
            self.counts["tool_calls"] += len(records)
            self.counts["tool_errors"] += sum(r.error for r in records)
            for r in records:
                assert r.crash is None, f"{r.name} raised {r.crash} on {r.arguments!r}"[:2000]
                assert isinstance(r.text, str) and r.text.strip(), f"{r.name} returned an empty text"
                assert not r.error or READABLE_ERROR.match(r.text), r.text[:300]
            assert obs["text"].strip()
        else:
            assert terminated, "a turn is a format error, tool calls or an answer"
            self.counts["answers"] += 1
            parts = info["reward_parts"]
            assert all(v is None or (isinstance(v, float) and math.isfinite(v)) for v in parts.values()), parts

    def close_and_check_traces(self) -> None:
        """Every episode the envs recorded loads back, seals and names images that are on disk."""
        for mode, env in self.envs.items():
            env.close()
            if not (self.folder / mode / "traces.jsonl").exists():  # no episode in this mode yet
                continue
            trace = read_traces(self.folder / mode / "traces.jsonl")
            assert trace.problems == []
            checker = ImageChecker(ImageStore(self.folder / mode / "images", create=False))
            for episode in trace.episodes:
                assert verify_episode(episode, checker) == [], episode.header.case_id
            self.counts["episodes_read_back"] += len(trace.episodes)


def run_env_fuzz(cases: list[Any], folder: Path, examples: int, config: settings, chunk: int = 0) -> Counter[str]:
    """Fuzz the envs; with ``chunk``, start fresh envs (and trace folders) every ``chunk`` examples."""
    total: Counter[str] = Counter()
    fuzz = EnvFuzz(folder / "0")
    seen = [0]

    @given(
        mode=st.sampled_from(MODES),
        case_index=st.integers(0, len(cases) - 1),
        turns=st.lists(actions(), min_size=1, max_size=4),
    )
    def episode(mode: str, case_index: int, turns: list[Any]) -> None:
        nonlocal fuzz
        seen[0] += 1
        if chunk and seen[0] % chunk == 0:  # bound the disk the traces' images take
            fuzz.close_and_check_traces()
            total.update(fuzz.counts)
            shutil.rmtree(fuzz.folder)
            fuzz = EnvFuzz(folder / str(seen[0]))
        fuzz.episode(mode, cases[case_index], turns)

    settings(config, max_examples=examples)(episode)()
    fuzz.close_and_check_traces()
    total.update(fuzz.counts)
    print(f"env fuzz: {dict(total)}")
    return total


def test_env_never_raises_on_any_action(cases, tmp_path):
    counts = run_env_fuzz(cases, tmp_path, examples=120, config=QUICK)
    assert counts["actions"] >= 120 and counts["tool_calls"] > 0 and counts["answers"] > 0
    assert counts["episodes_read_back"] == counts["episodes"]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_env_never_raises_on_ten_thousand_actions(cases, tmp_path):
    counts = run_env_fuzz(cases, tmp_path, examples=6000, config=THOROUGH, chunk=500)
    assert counts["actions"] >= SLOW_ENV_ACTIONS, counts
    assert counts["episodes_read_back"] == counts["episodes"]


def test_turns_that_used_to_raise_are_format_errors(cases):
    """The inputs that made the parser or the trace recorder raise before this fuzz existed."""
    env = gym.make(ENV_ID, segmenter="threshold", tool_mode="predicted", record_to=None)
    bad = [
        "<tool_call>" + "[" * 100_000 + "]" * 100_000 + "</tool_call>",  # RecursionError in json
        '<tool_call>{"name": "zoom", "arguments": {"boxes": [[' + "9" * 5000 + ", 0, 1, 1]]}}</tool_call>",  # int limit
        '<tool_call>{"name": "zoom", "arguments": {"boxes": ' + "[" * 600 + "]" * 600 + "}}</tool_call>",  # trace depth
        "<answer>x</answer><box>[" + "9" * 400 + ", 0, 1, 1]</box>",  # OverflowError in isfinite
    ]
    for turn in bad:
        env.reset(options={"case": cases[1]})
        obs, reward, terminated, _, info = env.step(turn)
        assert reward == FORMAT_PENALTY and obs["text"].startswith("Format error") and not terminated, obs["text"]
    env.close()


# ----------------------------------------------------------------- tools through run_call


@pytest.fixture(scope="module")
def studies(cases):
    """(study, prior) pairs: the standard check slice, a volume, a follow-up pair, an X-ray."""
    volume = next(c for c in cases if c.study.is_3d)
    follow_up = next(c for c in cases if c.prior is not None)
    xray = next(c for c in cases if c.study.modality == "XR")
    return [(check_context().study, None), (volume.study, None), (follow_up.study, follow_up.prior), (xray.study, None)]


def run_call_fuzz(studies: list[Any], examples: int, config: settings) -> Counter[str]:
    counts: Counter[str] = Counter()

    @given(
        mode=st.sampled_from(MODES),
        which=st.integers(0, len(studies) - 1),
        calls=st.lists(tool_call(), min_size=1, max_size=4),
    )
    def calls_on_a_fresh_context(mode: str, which: int, calls: list[tuple[Any, Any]]) -> None:
        study, prior = studies[which]
        ctx = ToolContext(study=study, prior=prior, segmenter="threshold", tool_mode=mode)
        for name, args in calls:
            record = run_call(name, args, ctx)
            counts["calls"] += 1
            counts["errors"] += record.error
            if name in TOOLS:
                counts[f"{name} {'error' if record.error else 'ok'}"] += 1
            # run_call runs run_tool and turns what it raises into ``crash``: None means run_tool did not raise.
            assert record.crash is None, f"{name} raised {record.crash} on {args!r}"[:2000]
            assert isinstance(record.text, str) and record.text.strip()
            assert not record.error or READABLE_ERROR.match(record.text), record.text[:300]
            assert all(isinstance(img, np.ndarray) and img.dtype == np.uint8 for img in record.images)
            # The trace record of any call is JSON and reads back as itself.
            trace = record.to_trace(None, [f"{i:064x}" for i in range(len(record.images))])
            assert ToolCallRecord.model_validate_json(trace.model_dump_json()) == trace

    # Each tool's own first example, so every tool is sure to run its code at least once.
    known_good = [(name, dict(spec.examples[0])) for name, spec in TOOLS.items()]
    calls_on_a_fresh_context = example(mode="oracle", which=0, calls=known_good)(calls_on_a_fresh_context)
    settings(config, max_examples=examples)(calls_on_a_fresh_context)()
    print(f"run_call fuzz: {dict(counts)}")
    return counts


def test_every_tool_returns_results_never_raises(studies):
    counts = run_call_fuzz(studies, examples=200, config=QUICK)
    assert counts["calls"] >= 200
    assert all(counts[f"{name} ok"] for name in TOOLS) and counts["errors"], counts  # every tool ran; some refused


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_tool_returns_results_never_raises_thorough(studies):
    counts = run_call_fuzz(studies, examples=3000, config=THOROUGH)
    assert counts["calls"] >= 3000


def test_the_trace_record_of_unserialisable_arguments_is_json():
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    record = run_call("zoom", {"boxes": deep, "nan": math.nan, "big": 10**5000, "s": "\ud800"}, check_context())
    trace = record.to_trace(None)
    assert ToolCallRecord.model_validate_json(trace.model_dump_json()) == trace
    assert trace.arguments["nan"] == "NaN" and trace.arguments["s"] == "?"


# ----------------------------------------------------------------- rewards

message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["assistant", "user", "tool", "system"]) | json_leaf,
        "content": st.one_of(
            actions(),
            st.lists(
                st.one_of(
                    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(actions(), json_leaf)}),
                    json_values,
                ),
                max_size=3,
            ),
        ),
    },
)
completions = st.one_of(actions(), st.lists(st.one_of(message, json_leaf), max_size=4), message, json_values)


# What each reward can be (None: not applicable): answer 0 / 0.5 / 1, IoU in [0, 1], a penalty down to -1.
REWARD_RANGES = {"answer": (0, 1), "grounding": (0, 1), "format": (0, 1), "tool_use": (0, 1), "length": (-1, 0)}


def reward_fuzz(cases: list[Any], examples: int, config: settings) -> Counter[str]:
    counts: Counter[str] = Counter()
    assert set(REWARD_RANGES) == set(REWARD_FUNCS), "a new reward needs its range in REWARD_RANGES"
    columns = [c.reward_columns() for c in cases]
    columns.append({**columns[0], "answer": "left lung", "answer_type": "open", "choices": [], "answer_box": None})
    assert {c["answer_type"] for c in columns} == {"mc", "yesno", "numeric", "box", "open"}

    @given(
        which=st.integers(0, len(columns) - 1),
        batch=st.lists(completions, min_size=1, max_size=3),
        tool_calls_ok=st.one_of(st.none(), st.integers(), st.integers(-(10**30), 10**30)),
    )
    def rewards(which: int, batch: list[Any], tool_calls_ok: int | None) -> None:
        cols = columns[which]
        kwargs = {k: [v] * len(batch) for k, v in cols.items()} | {"tool_calls_ok": [tool_calls_ok] * len(batch)}
        for name, fn in REWARD_FUNCS.items():
            out = fn(batch, **kwargs)
            counts["rewards"] += len(batch)
            assert len(out) == len(batch), name
            assert all(v is None or (isinstance(v, float) and math.isfinite(v)) for v in out), (name, out)
        for completion in batch:
            parts = score_parts(completion, cols, tool_calls_ok or 0)
            for name, value in parts.items():
                assert value is None or REWARD_RANGES[name][0] <= value <= REWARD_RANGES[name][1], (name, value)
            assert math.isfinite(total_reward(parts))
            counts["completions"] += 1

    settings(config, max_examples=examples)(rewards)()
    print(f"reward fuzz: {dict(counts)}")
    return counts


def test_reward_functions_score_anything(cases):
    assert reward_fuzz(cases, examples=250, config=QUICK)["completions"] >= 250


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_reward_functions_score_anything_thorough(cases):
    assert reward_fuzz(cases, examples=5000, config=THOROUGH)["completions"] >= 5000


# ----------------------------------------------------------------- trace writer

images = st.lists(
    st.tuples(st.integers(1, 6), st.integers(1, 6), st.sampled_from([0, 3, 4]), st.integers(0, 2**32 - 1)).map(
        lambda t: np.random.default_rng(t[3]).integers(0, 256, t[:2] + ((t[2],) if t[2] else ()), dtype=np.uint8)
    ),
    max_size=3,
)
finite = st.floats(allow_nan=False, allow_infinity=False)
boxes = st.none() | st.lists(finite, min_size=4, max_size=4)


@st.composite
def episodes(draw, store: ImageStore) -> TraceEpisode:
    """An episode with odd texts everywhere; calls go through the runner's record, as every runtime's do."""
    header = TraceHeader(
        episode_id=draw(valid_texts),
        source=draw(valid_texts),
        seed=draw(st.none() | st.integers(min_value=-(10**30), max_value=10**30)),
        case_id=draw(valid_texts),
        stage=draw(valid_texts),
        template=draw(valid_texts),
        question=draw(st.text(st.characters(codec="utf-8"), max_size=500)),
        answer=draw(valid_texts),
        answer_type=draw(st.sampled_from(["mc", "yesno", "numeric", "box", "open"])),
        choices=draw(st.lists(valid_texts, max_size=4)),
        answer_box=draw(boxes),
        model_id=draw(valid_texts),
        source_config=draw(st.dictionaries(valid_texts, st.none() | st.booleans() | finite | valid_texts, max_size=3)),
        unit=draw(st.none() | valid_texts),
        tolerance=draw(st.none() | finite),
    )
    steps = []
    for index in range(1, draw(st.integers(0, 3)) + 1):
        calls = []
        for _ in range(draw(st.integers(0, 2))):
            record = CallRecord(
                name=draw(texts | json_leaf),
                arguments=draw(json_values),
                tool_version=draw(st.none() | valid_texts),
                text=draw(texts),
                data=draw(st.dictionaries(texts, json_values, max_size=3)),
                images=draw(images),
                error=draw(st.booleans()),
                seconds=draw(st.floats(0, 1e6)),
            )
            calls.append(record.to_trace(store))
        steps.append(
            TraceStep(
                index=index,
                model_text=draw(st.text(st.characters(codec="utf-8"), max_size=300)),
                calls=calls,
                answer=draw(st.none() | valid_texts),
                box=draw(boxes),
                format_error=draw(st.none() | valid_texts),
                reward=draw(finite),
            )
        )
    return TraceEpisode(
        header=header,
        steps=steps,
        final_answer=draw(st.none() | valid_texts),
        final_box=draw(boxes),
        score=draw(st.dictionaries(st.sampled_from(sorted(REWARD_FUNCS)), st.none() | finite)),
        reward=draw(finite),
        truncated=draw(st.booleans()),
    )


def trace_writer_fuzz(examples: int, config: settings) -> int:
    written = [0]

    @given(data=st.data())
    def write_and_read_back(data: st.DataObject) -> None:
        folder = Path(tempfile.mkdtemp(prefix="medgym-fuzz-"))
        try:
            writer = TraceWriter(folder / "traces.jsonl")
            episode = data.draw(episodes(writer.images))
            sealed = writer.write(episode)
            writer.close()
            written[0] += 1
            trace = read_traces(folder / "traces.jsonl")
            assert trace.problems == [] and trace.episodes == [sealed]
            checker = ImageChecker(ImageStore(folder / "images", create=False))
            assert verify_episode(trace.episodes[0], checker) == []
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    settings(config, max_examples=examples)(write_and_read_back)()
    print(f"trace writer fuzz: {written[0]} episodes")
    return written[0]


def test_trace_writer_writes_and_reads_back_odd_episodes():
    assert trace_writer_fuzz(examples=60, config=QUICK) >= 60


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_trace_writer_writes_and_reads_back_odd_episodes_thorough():
    assert trace_writer_fuzz(examples=2000, config=THOROUGH) >= 2000


# ----------------------------------------------------------------- found here, to fix in medgym/traces (not edited here)


def _bare_episode(**fields: Any) -> TraceEpisode:
    header = TraceHeader(
        episode_id="e", source="s", case_id="c", stage="recognition", template="t", question="q", answer="a",
        answer_type="open",
    )  # fmt: skip
    return TraceEpisode(header=header, **fields)


@pytest.mark.xfail(
    reason="medgym/traces/store.py: TraceWriter.write raises PydanticSerializationError on a lone surrogate "
    "(the env and the runner now replace them before they reach a trace; other callers do not)",
    strict=False,
)
def test_trace_writer_takes_text_with_lone_surrogates(tmp_path):
    writer = TraceWriter(tmp_path / "traces.jsonl")
    writer.write(_bare_episode(final_answer="\ud800"))
    assert len(read_traces(tmp_path / "traces.jsonl").episodes) == 1


@pytest.mark.xfail(
    reason="medgym/traces/schema.py: a non-finite float is written as null, so the line no longer loads "
    "(reward, final_box) or no longer matches its hash (score); refuse NaN/inf when an episode is built",
    strict=False,
)
@pytest.mark.parametrize(
    "fields", [{"reward": math.nan}, {"final_box": [math.inf] * 4}, {"score": {"answer": math.nan}}]
)
def test_trace_writer_never_writes_a_line_it_cannot_read_back(tmp_path, fields):
    writer = TraceWriter(tmp_path / "traces.jsonl")
    try:
        writer.write(_bare_episode(**fields))
    except ValueError:
        return  # refusing the episode is as good
    trace = read_traces(tmp_path / "traces.jsonl")
    assert trace.problems == [] and verify_episode(trace.episodes[0], None) == []
