"""Step caching: the policy in the contract, its runtime (PyTorch hooks, ONNX segments), the pass and its search."""

from __future__ import annotations

import pytest
import torch

import compress
from compress import DitCompressError
from compress.cache import CacheEngine
from compress.diffusion.sampling import make_noise, sample
from compress.models.adapters import get_adapter
from compress.models.cache_policy import CachePolicy
from tests.conftest import randomized_dit


def _with(model, **update):
    a = get_adapter(model)
    a.set_contract(a.contract().model_copy(update=update))
    return model


def _inputs(contract, n=3):
    return contract.example_cond(n, torch.Generator().manual_seed(1)), make_noise(n, tuple(contract.latent_shape), 0)


def _recipe(*passes):
    return {"name": "c", "description": "cache test", "passes": list(passes)}


# ---- the policy and its errors -----------------------------------------------------------------
def test_policy_errors_name_the_field(tiny_native):
    c = get_adapter(tiny_native).contract()
    with pytest.raises(ValueError, match=r"cache\.interval: 60 is larger than the 50 sampling steps"):
        type(c).model_validate({**c.model_dump(), "cache": {"method": "fora", "interval": 60}})
    with pytest.raises(ValueError, match="threshold: does not apply to method 'fora'"):
        CachePolicy(method="fora", interval=2, threshold=0.1)
    with pytest.raises(ValueError, match="interval: method 'taylorseer' needs it"):
        CachePolicy(method="taylorseer")
    with pytest.raises(DitCompressError, match=r"field 'calibrate.target_speedup': 9x is above the 8x that method "
                                               r"'fora' can reach on 8 sampling steps"):
        compress.apply_recipe(_with(tiny_native, steps=8), _recipe(
            {"pass": "cache", "method": "fora", "calibrate": {"target_speedup": 9}}), show_progress=False)
    with pytest.raises(DitCompressError, match=r"field 'interval'.*add 'calibrate'"):
        compress.apply_recipe(tiny_native, _recipe({"pass": "cache", "method": "fora"}), show_progress=False)


def test_family_without_block_views_is_refused(tiny_native, monkeypatch):
    from compress.models.adapters.native import NativeDiTAdapter

    monkeypatch.setattr(NativeDiTAdapter, "blocks", lambda self: [])
    with pytest.raises(DitCompressError, match="gives no transformer block views"):
        compress.apply_recipe(tiny_native, _recipe({"pass": "cache", "method": "fora", "interval": 2}),
                              show_progress=False)


def test_interval_above_overridden_steps_is_refused_at_sampling(tiny_native):
    c = get_adapter(tiny_native).contract().model_copy(update={"cache": CachePolicy(method="fora", interval=10)})
    cond, noise = _inputs(c)
    with pytest.raises(DitCompressError, match="field 'interval': 10 is larger than the 6 sampling steps"):
        sample(tiny_native, cond, noise, contract=c.with_overrides(steps=6))


# ---- decisions -------------------------------------------------------------------------------------
def test_fora_skips_its_schedule_and_the_sampler_reports_it(tiny_native):
    c = get_adapter(tiny_native).contract().model_copy(update={"steps": 12, "guidance_scale": 1.5})
    cond, noise = _inputs(c)
    plain = sample(tiny_native, cond, noise, contract=c)
    r = sample(tiny_native, cond, noise, contract=c.model_copy(update={"cache": CachePolicy(method="fora",
                                                                                          interval=3)}))
    assert r.cache["decisions"] == [1, 0, 0] * 4 and r.cache["skipped_block_fraction"] == pytest.approx(8 / 12)
    assert plain.cache is None and 0 < (r.samples - plain.samples).abs().max() < plain.samples.abs().max()


def test_warmup_cooldown_and_cap_force_full_steps():
    p = CachePolicy(method="first_block", threshold=50.0, warmup=3, cooldown=1, max_cached=2)
    eng = CacheEngine(p, steps=10, depth=4, branches=1)
    probe = torch.ones(2, 3)
    for _ in range(10):
        eng.begin()
        if eng.decide(probe):
            eng.store((torch.zeros(2), None), (torch.ones(2), None))
    assert eng.stats()["decisions"] == [1, 1, 1, 0, 0, 1, 0, 0, 1, 1]


def test_each_guidance_branch_keeps_its_own_state():
    p = CachePolicy(method="first_block", threshold=0.1)
    eng = CacheEngine(p, steps=3, depth=4, branches=2)
    same = torch.ones(4, 3)
    moved = torch.cat([torch.ones(2, 3), 3 * torch.ones(2, 3)])  # only the unconditional half changed
    out = []
    for probe in (same, moved, moved):
        eng.begin()
        out.append(eng.decide(probe))
        if out[-1]:
            eng.store((torch.zeros(4), None), (torch.ones(4), None))
    assert out == [True, True, False]  # the uncond branch alone forces step 1; its reference then follows it
    assert torch.equal(eng.branch[1].ref, 3 * torch.ones(2, 3)) and torch.equal(eng.branch[0].ref, torch.ones(2, 3))


# ---- equivalence with diffusers' hooks on a tiny Flux -------------------------------------------------
def _diffusers_run(model, contract, config):
    """Sample with diffusers' cache hooks; decisions read off whether the last block's attention ran."""
    adapter, calls, decisions = get_adapter(model), [], []

    class Hooked:
        def __init__(self):
            self.contract = contract

        def __call__(self, x, t, cond):
            n = len(calls)
            with model.cache_context("cond"):
                out = adapter.forward(x, t, cond)
            decisions.append(int(len(calls) > n))
            return out

    h = model.single_transformer_blocks[-1].attn.register_forward_hook(lambda *_: calls.append(1))
    model.enable_cache(config)
    try:
        cond, noise = _inputs(contract, 2)
        return sample(Hooked(), cond, noise, contract=contract).samples, decisions
    finally:
        model.disable_cache()
        h.remove()


@pytest.fixture(scope="module")
def tiny_flux():
    from tests.tiny_models import tiny_diffusers_model

    return tiny_diffusers_model("flux")


def test_first_block_cache_matches_diffusers_on_tiny_flux(tiny_flux):
    from diffusers.hooks import FirstBlockCacheConfig

    c = get_adapter(tiny_flux).contract().model_copy(update={"steps": 12})
    ref, ref_dec = _diffusers_run(tiny_flux, c, FirstBlockCacheConfig(threshold=0.3))
    cond, noise = _inputs(c, 2)
    ours = sample(tiny_flux, cond, noise, contract=c.model_copy(update={"cache": CachePolicy(method="first_block",
                                                                                            threshold=0.3)}))
    assert 0 in ref_dec and ours.cache["decisions"] == ref_dec
    torch.testing.assert_close(ours.samples, ref, rtol=1e-5, atol=1e-5)


def test_taylorseer_matches_diffusers_on_tiny_flux(tiny_flux):
    from diffusers.hooks import TaylorSeerCacheConfig

    c = get_adapter(tiny_flux).contract().model_copy(update={"steps": 12})
    cfg = TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2, max_order=2,
                                taylor_factors_dtype=torch.float32,
                                cache_identifiers=[r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"])
    ref, ref_dec = _diffusers_run(tiny_flux, c, cfg)
    cond, noise = _inputs(c, 2)
    policy = CachePolicy(method="taylorseer", interval=3, warmup=2, phase=1, order=2)  # diffusers' first refresh: +1
    ours = sample(tiny_flux, cond, noise, contract=c.model_copy(update={"cache": policy}))
    assert ours.cache["decisions"] == ref_dec == [1, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0]
    torch.testing.assert_close(ours.samples, ref, rtol=1e-5, atol=1e-5)


# ---- the pass: artifacts, calibration, composition ------------------------------------------------
def test_policy_reloads_from_the_artifact_and_samples_the_same(tmp_path, tiny_native):
    out = compress.apply_recipe(_with(tiny_native, steps=10), _recipe(
        {"pass": "cache", "method": "taylorseer", "interval": 3, "warmup": 2, "order": 2, "forecast": "residual"}),
        show_progress=False)
    compress.save(out, tmp_path / "a")
    back = compress.load(tmp_path / "a")
    c = get_adapter(back).contract()
    assert c.cache == get_adapter(out).contract().cache and c.cache.order == 2
    cond, noise = _inputs(c)
    a, b = sample(out, cond, noise), sample(back, cond, noise)
    assert a.cache["decisions"] == [1, 1, 1, 0, 0, 1, 0, 0, 1, 0] and torch.equal(a.samples, b.samples)


def test_calibration_runs_on_the_quantized_model_itself(tiny_native):
    from compress.passes.cache_search import Recording

    src = _with(tiny_native, steps=12, guidance_scale=1.5)
    out = compress.apply_recipe(src, _recipe(
        {"pass": "quantize", "weights": {"dtype": "int4", "group_size": 16}},
        {"pass": "cache", "method": "fora", "warmup": 2, "calibrate": {"target_speedup": 2.0, "samples": 4}}),
        show_progress=False)
    policy = get_adapter(out).contract().cache
    assert policy.calibration["speedup"] >= 2.0 and policy.interval >= 2
    contract = get_adapter(out).contract()
    on_quantized = Recording(out, contract, 4, 64, 0).score(policy)
    on_source = Recording(src, contract, 4, 64, 0).score(policy)
    assert on_quantized.psnr_db == pytest.approx(policy.calibration["psnr_db"], abs=1e-3)
    assert abs(on_source.psnr_db - policy.calibration["psnr_db"]) > 0.01


def test_cache_composes_with_a_few_step_student_schedule(tiny_native):
    student = _with(tiny_native, steps=4, timesteps=[999.0, 749.0, 499.0, 249.0], sampler="tcd",
                    guidance_scale=1.5)
    out = compress.apply_recipe(student, _recipe(
        {"pass": "cache", "method": "taylorseer", "calibrate": {"target_speedup": 1.3, "samples": 4}}),
        show_progress=False)
    c = get_adapter(out).contract()
    seen = []
    cond, noise = _inputs(c)
    r = sample(out, cond, noise, on_step=lambda i, x, t, cd: seen.append(float(t[0])))
    assert seen == [999.0, 749.0, 499.0, 249.0] and c.timesteps == seen
    assert r.cache["steps"] == 4 and r.cache["cached_steps"] >= 1
    with pytest.raises(DitCompressError, match="above the 4x that method 'taylorseer' can reach on 4 sampling steps"):
        compress.apply_recipe(student, _recipe({"pass": "cache", "method": "taylorseer",
                                                "calibrate": {"target_speedup": 5}}), show_progress=False)
    with pytest.raises(DitCompressError, match="caching does not pay on this model's 4-step schedule"):
        compress.apply_recipe(student, _recipe({"pass": "cache", "method": "fora",
                                                "calibrate": {"min_psnr": 99, "samples": 4}}), show_progress=False)
    kept = compress.apply_recipe(student, _recipe({"pass": "cache", "method": "fora", "allow_empty": True,
                                                   "calibrate": {"min_psnr": 99, "samples": 4}}), show_progress=False)
    assert get_adapter(kept).contract().cache is None


# ---- runtimes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [CachePolicy(method="delta_dit", interval=2, delta_blocks=2, delta_boundary=5),
                                    CachePolicy(method="first_block", threshold=1.0, warmup=1)],
                         ids=["delta_dit", "first_block"])
def test_segments_run_the_policy_like_the_block_hooks(tiny_native, policy):
    from compress.cache import SegmentedStepCache, torch_segments

    c = get_adapter(tiny_native).contract().model_copy(update={"steps": 10, "guidance_scale": 1.5, "cache": policy})

    class Segmented:
        contract = c

        def cached_call(self, contract):
            return SegmentedStepCache(torch_segments(tiny_native, policy, contract.steps), contract, 4)

    cond, noise = _inputs(c)
    hooks, segs = sample(tiny_native, cond, noise, contract=c), sample(Segmented(), cond, noise, contract=c)
    assert hooks.cache["decisions"] == segs.cache["decisions"] and 0 in hooks.cache["decisions"]
    torch.testing.assert_close(segs.samples, hooks.samples, rtol=1e-5, atol=1e-5)


def test_segmented_onnx_export_samples_like_the_pytorch_sampler(tmp_path, tiny_native):
    from exporters.onnx import OnnxRunner, export_onnx

    model = _with(tiny_native, steps=8, guidance_scale=1.5,
                  cache=CachePolicy(method="first_block", threshold=1.0, warmup=1))
    export_onnx(model, tmp_path / "e")
    runner = OnnxRunner(tmp_path / "e")
    assert runner.contract.cache == get_adapter(model).contract().cache
    cond, noise = _inputs(runner.contract)
    a, b = sample(model, cond, noise), sample(runner, cond, noise)
    assert a.cache["decisions"] == b.cache["decisions"] and 0 in a.cache["decisions"]
    assert float((b.samples - a.samples).abs().max()) <= 1e-3 * float(a.samples.abs().max())  # the export's gate
    from exporters.tensorrt import build_engine

    with pytest.raises(DitCompressError, match="'first_block' step-cache policy.*cannot apply it"):
        build_engine(tmp_path / "e", tmp_path / "trt")
    tea = _with(randomized_dit(), cache=CachePolicy(method="first_block", threshold=0.2, metric="modulated_input"))
    with pytest.raises(DitCompressError, match="metric 'modulated_input' \\(TeaCache\\).*metric 'residual'"):
        export_onnx(tea, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_runner_that_cannot_segment_refuses_the_policy(tiny_native):
    class OnePiece:
        description = "one-piece runtime"

        def __init__(self, contract):
            self.contract = contract

        def __call__(self, x, t, cond):
            return x

    c = get_adapter(tiny_native).contract().model_copy(update={"cache": CachePolicy(method="fora", interval=2)})
    cond, noise = _inputs(c)
    with pytest.raises(DitCompressError, match="one-piece runtime cannot apply the contract's 'fora' cache policy"):
        sample(OnePiece(c), cond, noise)


def test_bench_times_whole_runs_and_reports_skipped_work(tmp_path, tiny_native):
    from compress.bench import BenchConfig, Variant, run_bench

    src = _with(tiny_native, steps=6)
    cached = compress.apply_recipe(src, _recipe({"pass": "cache", "method": "fora", "interval": 2}),
                                   show_progress=False)
    report = run_bench(Variant("src", src), [Variant("fora", cached)],
                       BenchConfig(samples=4, speed_batch=2, warmup=0, repeats=1, grid=False), tmp_path)
    assert report["notes"]["timing"] == "sampling"
    v = {x["name"]: x for x in report["variants"]}
    assert v["fora"]["speed"]["skipped_block_fraction"] == pytest.approx(0.5)
    assert v["src"]["speed"]["skipped_block_fraction"] is None and v["fora"]["speed"]["ms_per_image"] > 0
    assert v["fora"]["quality"]["psnr_db"] is not None
