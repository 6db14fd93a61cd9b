"""The answer-prior baseline: what answer rewards alone could teach a policy that does not look."""

from __future__ import annotations

import collections

import pytest


@pytest.fixture(scope="module")
def prior():
    from medgym.agents.backends import make_policy

    return make_policy("prior:80", source="phantom")


def test_prior_answers_each_template_with_its_training_majority(prior):
    from medgym.environments.policies import PRIOR_FIRST_SEED
    from medgym.environments.sources import make_source

    source = make_source("phantom")
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for seed in range(PRIOR_FIRST_SEED, PRIOR_FIRST_SEED + 80):
        case = source.case(seed)
        if case.answer_type in ("mc", "yesno"):
            seen[case.template][case.answer] += 1
    assert len(seen) >= 5
    for template, counts in seen.items():
        top = counts.most_common(1)[0][1]
        assert prior.answers[template] in {f"<answer>{a}</answer>" for a, c in counts.items() if c == top}


def test_prior_scores_what_its_table_says_and_calls_no_tool(prior):
    from medgym.environments.evaluate import evaluate
    from medgym.environments.rewards import score_answer
    from medgym.environments.sources import make_source

    rows: list[dict] = []
    result = evaluate(prior, source="phantom", n=24, seed=0, progress=False, segmenter="threshold", per_case=rows)
    assert result["tool_calls"] == 0 and result["format_errors"] == 0
    source = make_source("phantom")
    expected = []
    for seed in range(24):
        case = source.case(seed)
        text = prior.answers[case.template].split("<answer>")[1].split("</answer>")[0]
        box = case.answer_box if case.answer_type == "box" else None
        if box is not None:
            box = [float(v) for v in text.strip("[]").split(",")]
        expected.append(
            score_answer(
                text,
                box,
                case.answer,
                case.answer_type,
                case.choices,
                case.tolerance,
                case.abs_tolerance,
                case.answer_box,
            )
        )
    assert [r["correct"] for r in rows] == pytest.approx(expected)
    assert result["accuracy"] == pytest.approx(sum(expected) / 24)


def test_prior_needs_a_case_and_a_number():
    from medgym.agents.backends import BackendUnavailable, make_policy
    from medgym.environments.policies import AnswerPriorPolicy

    with pytest.raises(BackendUnavailable, match="number of training cases"):
        make_policy("prior:many")
    with pytest.raises(ValueError, match="uploaded image"):
        AnswerPriorPolicy(n=3).next_turn([{"role": "user", "content": "what is this?"}])


def test_bench_takes_the_prior_beside_checkpoints():
    from medgym.rl.bench import run_bench

    bench = run_bench({"prior": "prior:40", "again": "prior:40"}, n=6, seed=0, progress=False)
    assert list(bench["results"]) == ["expert", "prior", "again"]
    assert bench["results"]["prior"]["tool_calls"] == 0 and bench["results"]["expert"]["tool_calls"] > 0
    same = bench["differences"]["again - prior"]["accuracy"]
    assert same["difference"] == same["low"] == same["high"] == 0.0, same


def test_bench_runs_a_policy_blind_beside_itself():
    """``blind:SPEC`` runs SPEC with black pictures, recorded in the bench's paths; the prior never looks, so its
    blind twin answers exactly as it does."""
    from medgym.rl.bench import run_bench

    bench = run_bench({"prior": "prior:40", "prior-blind": "blind:prior:40"}, n=4, seed=0, progress=False)
    assert bench["paths"]["prior-blind"] == "blind:prior:40" and bench["paths"]["prior"] == "prior:40"
    same = bench["differences"]["prior-blind - prior"]["accuracy"]
    assert same["difference"] == same["low"] == same["high"] == 0.0, same


def test_a_reused_bench_reruns_a_checkpoint_whose_weights_changed(tmp_path, monkeypatch):
    """``--reuse`` lends a policy's earlier results only when its path and its weights are the same: a checkpoint
    re-shipped in place keeps its path, so the digest of its ``model.safetensors`` decides."""
    import medgym.agents.backends as backends
    import medgym.environments.evaluate as evaluate_module
    from medgym.agents.backends import make_policy
    from medgym.rl.bench import run_bench

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"first weights")
    ran, real_evaluate = [], evaluate_module.evaluate

    def evaluate(policy, **kw):  # the checkpoint's episodes are the prior's (no model to load here)
        if isinstance(policy, str):
            ran.append(policy)
            policy = make_policy("prior:40", source="phantom")
        return real_evaluate(policy, **kw)

    monkeypatch.setattr(backends, "EmbeddedBackend", lambda spec, constrained=False: spec)
    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
    first = run_bench({"policy": str(checkpoint)}, n=3, seed=0, progress=False)
    assert ran == [str(checkpoint)] and first["weights"]["policy"] and first["weights"]["expert"] == ""
    again = run_bench({"policy": str(checkpoint)}, n=3, seed=0, progress=False, previous=first)
    assert ran == [str(checkpoint)] and again["results"] == first["results"]

    (checkpoint / "model.safetensors").write_bytes(b"weights trained again")
    changed = run_bench({"policy": str(checkpoint)}, n=3, seed=0, progress=False, previous=first)
    assert len(ran) == 2 and changed["weights"]["policy"] != first["weights"]["policy"]
    legacy = {k: v for k, v in first.items() if k != "weights"}  # a bench from before digests: the path decides
    run_bench({"policy": str(checkpoint)}, n=3, seed=0, progress=False, previous=legacy)
    assert len(ran) == 2
