"""`dit-compress sensitivity`: per-layer ranking and a mixed-precision plan that respects its budget."""

import dataclasses

import torch
import yaml
from typer.testing import CliRunner

from compress import apply_recipe
from compress.cli import app
from compress.passes import CalibrationConfig
from compress.recipe import parse_recipe
from compress.sensitivity import FULL, measure_sensitivity
from tests.conftest import TINY_NATIVE, randomized_dit

CAL = CalibrationConfig(samples=4, steps=4, batch_size=4)


def test_plan_fits_budget_and_beats_uniform_estimate():
    tiny_native = randomized_dit(dataclasses.replace(TINY_NATIVE, hidden_size=64))
    with torch.no_grad():  # one very sensitive layer: the plan should keep it out of 4-bit
        tiny_native.blocks[1].mlp.fc2.weight.mul_(30)
    sens = measure_sensitivity(tiny_native, ["w4a8", "w8a8-int8"], calibration=CAL)
    assert len(sens.layers) == 16 and sens.formats == [FULL, "w4a8", "w8a8-int8"]
    assert all(sens.size[n]["w4a8"] < sens.size[n]["w8a8-int8"] < sens.size[n][FULL] for n in sens.layers)
    assert all(sens.error[n]["w4a8"] > sens.error[n]["w8a8-int8"] > 0 for n in sens.layers)
    budget = sens.plan_size(sens.uniform("w8a8-int8"))
    plan = sens.plan(budget)
    assert sens.plan_size(plan) <= budget
    est = lambda p: sum(sens.error[n][p[n]] for n in sens.layers)  # noqa: E731
    assert est(plan) <= est(sens.uniform("w8a8-int8"))
    assert plan["blocks.1.mlp.fc2"] != "w4a8"
    data = sens.recipe(plan, "mixed", "test")
    planned = {n for p in data["passes"] for n in p["layers"]["include"]}
    assert planned == {n for n in sens.layers if plan[n] != FULL}
    q = apply_recipe(tiny_native, parse_recipe({**data, "defaults": {"calibration": CAL.model_dump()}}),
                     show_progress=False)
    for n in sens.layers:
        assert (type(q.get_submodule(n)).__name__ == "Linear") == (plan[n] == FULL)


def test_sensitivity_cli_writes_a_recipe_that_validates(tmp_path):
    out = tmp_path / "plan.yaml"
    r = CliRunner().invoke(app, ["sensitivity", "reference", "--samples", "2", "--steps", "3", "--out", str(out),
                                 "--top", "5"])
    assert r.exit_code == 0, r.output
    assert "blocks." in r.output and "uniform w8a8-int8" in r.output
    data = yaml.safe_load(out.read_text())
    parse_recipe(data)
    assert data["passes"]


def test_budget_below_smallest_plan_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(app, ["sensitivity", "reference", "--samples", "2", "--steps", "3", "--budget", "0.1",
                                 "--out", str(tmp_path / "p.yaml")])
    assert r.exit_code != 0
    assert "below the smallest plan" in str(r.exception) + r.output
    assert not (tmp_path / "p.yaml").exists()
