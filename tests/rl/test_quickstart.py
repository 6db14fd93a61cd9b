"""``medgym quickstart`` end to end on a few cases: the README's first command, made small."""

from __future__ import annotations

import json


def test_quickstart_evaluates_trains_with_the_recipe_and_reports(tmp_path):
    from medgym.rl.quickstart import GAIN_COMMANDS, RECIPE_GRPO, run_quickstart

    summary = run_quickstart(tmp_path, n_eval=2, grpo_steps=1, n_train=2, progress=False)
    assert summary["before"]["n"] == summary["after"]["n"] == 2
    assert summary["before"]["format_errors"] == 0 and summary["after"]["format_errors"] == 0  # constrained turns
    assert summary["grpo"]["steps"] == 1 and summary["tool_mode"] == "predicted"
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "reward" in r)
    # the recipe's GRPO: answer turns only, every one of them an answer that ends within its budget (the format
    # reward also asks for the question's form, a letter or a number, so it is not 1 for every answer)
    assert step["completions/mean_length"] <= RECIPE_GRPO["max_completion_length"]
    assert step["completions/clipped_ratio"] == 0.0 and step.get("tools/call_frequency", 0.0) == 0.0
    recipe = json.loads((tmp_path / "grpo" / "final" / "medgym.json").read_text())["recipe"]["grpo"]
    assert recipe["answer_evidence"] == "expert" and recipe["temperature"] == 0.5
    page = (tmp_path / "summary.html").read_text()
    assert "smoke run" in page and GAIN_COMMANDS[0] in page
    assert (tmp_path / "summary.png").stat().st_size > 0
