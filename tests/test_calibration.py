"""Calibration data: recorded along the teacher's own trajectory, both CFG branches, seeded, cached."""

import torch

from compress.passes import CalibrationConfig, PassContext


def test_trajectory_rows_both_branches_and_cache(tiny_native):
    ctx = PassContext.for_model(tiny_native, show_progress=False)
    cfg = CalibrationConfig(samples=6, steps=4, cfg_scale=2.0, batch_size=4)
    calib = ctx.calibration.rows(cfg)
    assert len(calib) == 6 * 4 * 2  # every step, cond + uncond
    assert sorted(set(calib.step.tolist())) == [0, 1, 2, 3]
    assert (calib.cond["y"] == 10).sum() == 6 * 4  # half the rows are the null (unconditional) label
    assert sorted(set(calib.t.tolist())) == [0, 250, 500, 750]  # DDIM leading spacing, 4 steps
    assert ctx.calibration.rows(cfg) is calib  # cached: several passes reuse one recording
    again = PassContext.for_model(tiny_native, show_progress=False).calibration.rows(cfg)
    assert torch.equal(again.x, calib.x)  # seeded


def test_keep_steps_middle_weighting(tiny_native):
    import collections

    from compress.calibration import chosen_steps

    ctx = PassContext.for_model(tiny_native, show_progress=False)
    calib = ctx.calibration.rows(CalibrationConfig(samples=2, steps=20, cfg_scale=1.0, timesteps="middle", keep_steps=5))
    steps = sorted(set(calib.step.tolist()))
    assert steps == chosen_steps(20, "middle", 5, ctx.run.seed) and len(calib) == 2 * 5
    assert sorted(set(calib.t.tolist())) == sorted(50 * (19 - i) for i in steps)  # the rows are those steps' inputs
    # the weighting: over many seeds, the middle half of the schedule is picked far more often than the ends
    # (measured 0.69 of all picks over 300 seeds; an unweighted draw gives 0.50)
    picks = collections.Counter(i for seed in range(300) for i in chosen_steps(20, "middle", 5, seed))
    assert sum(picks[i] for i in range(5, 15)) / sum(picks.values()) > 0.62
    assert min(picks[i] for i in (9, 10)) > 3 * max(picks[i] for i in (0, 19))
    uni = ctx.calibration.rows(CalibrationConfig(samples=2, steps=20, cfg_scale=1.0, keep_steps=5))
    assert sorted(set(uni.step.tolist())) == [0, 5, 10, 14, 19]
