"""Linear-attention students: the kernels' arithmetic, the pass on every family, hybrid selection, recovery,
replay, ONNX export without an N x N softmax, and the errors."""

import json

import onnx
import pytest
import torch
import torch.nn.functional as F
import yaml

import compress
from compress import DitCompressError
from compress.models.adapters import get_adapter
from compress.nn.attention import LinearAttention, WindowAttention
from compress.nn.timestep import denoiser_call
from compress.passes import CalibrationConfig, PassContext
from compress.passes.scoring import output_errors
from compress.recipe import load_recipe, parse_recipe
from tests.conftest import randomized_dit
from tests.test_hostile import assert_one_line_error, cli
from tests.test_pruning import outputs
from tests.test_quantize import rel_err
from tests.tiny_models import tiny_diffusers_model

CAL = {"samples": 4, "steps": 3, "batch_size": 4}
FAMILIES = ["native", "diffusers-dit", "pixart", "sd3", "flux"]


def model_of(family: str):
    return randomized_dit() if family == "native" else tiny_diffusers_model(family)


def linearise(model, **fields):
    fields.setdefault("layer_kd", None)
    return compress.apply_recipe(model, {"name": "t", "description": "t", "defaults": {"calibration": CAL},
                                         "passes": [{"pass": "linear_attention", **fields}]}, show_progress=False)


def kernels(model) -> list:
    return [m for m in model.modules() if isinstance(m, (LinearAttention, WindowAttention))]


@pytest.mark.parametrize("feature", ["relu", "elu"])
def test_linear_kernel_equals_the_normalised_feature_map_attention(feature):
    """phi(q) phi(k)^T v / phi(q) sum phi(k), computed by hand through the full L x L matrix."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8) for _ in range(3))
    kern = LinearAttention(3, 8, (4, 5), feature=feature, conv=0)
    phi = (lambda x: F.relu(x)) if feature == "relu" else (lambda x: F.elu(x) + 1)
    a = phi(q) @ phi(k).transpose(-2, -1)  # (B, H, L, L) scores, row-normalised below
    ref = (a / (a.sum(-1, keepdim=True) + 1e-6)) @ v
    torch.testing.assert_close(kern(q, k, v), ref, atol=1e-5, rtol=1e-4)


def test_depthwise_convolution_adds_a_per_channel_filter_over_the_image_grid_only():
    """LiT's DWC: zero-initialised (the kernel starts as plain linear attention); on [text | image] (Flux's
    layout) it filters the image tokens on their 2-D grid and leaves the text tokens' outputs alone."""
    torch.manual_seed(0)
    text, rows, cols = 3, 4, 5
    q, k, v = (torch.randn(1, 2, text + rows * cols, 4) for _ in range(3))
    kern = LinearAttention(2, 4, (rows, cols), image="last", conv=3)
    plain = LinearAttention(2, 4, (rows, cols), image="last", conv=0)
    torch.testing.assert_close(kern(q, k, v), plain(q, k, v))
    with torch.no_grad():
        kern.dwc.weight.normal_()
    delta = kern(q, k, v) - plain(q, k, v)
    assert torch.equal(delta[:, :, :text], torch.zeros_like(delta[:, :, :text]))
    img = v[:, :, text:].permute(0, 1, 3, 2).reshape(1, 8, rows, cols)
    by_hand = F.conv2d(img, kern.dwc.weight, padding=1, groups=8).reshape(1, 2, 4, rows * cols).permute(0, 1, 3, 2)
    torch.testing.assert_close(delta[:, :, text:], by_hand, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("image,grid,length", [("all", (12, 10), 120), ("first", (7, 9), 75), ("last", (9, 7), 70)])
@pytest.mark.parametrize("conv", [0, 3, 5])
def test_chunked_inference_gives_the_whole_sequence_kernel_output(image, grid, length, conv, monkeypatch):
    """Long sequences at inference run chunk by chunk (the DWC on bands of grid rows with their halo): the same
    values as the whole-sequence form autograd uses, with 16-token chunks crossing rows and the image span."""
    import compress.nn.attention as attention

    torch.manual_seed(0)
    kern = LinearAttention(4, 8, grid, image=image, conv=conv)
    if kern.dwc is not None:
        torch.nn.init.normal_(kern.dwc.weight)
    q, k, v = (torch.randn(2, 4, length, 8) for _ in range(3))
    with torch.enable_grad():
        whole = kern(q, k, v).detach()
    monkeypatch.setattr(attention, "INFERENCE_CHUNK", 16)
    calls = []
    real = LinearAttention.attend_in_chunks
    monkeypatch.setattr(LinearAttention, "attend_in_chunks", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        chunked = kern(q, k, v)
    assert calls == [1]
    assert ((chunked - whole).abs().max() / whole.abs().max()) < 1e-6  # measured 3e-8 .. 2.4e-7


def test_chunked_inference_into_a_scratch_query_returns_the_query_buffer_with_the_same_values(monkeypatch):
    """``query_is_scratch`` (how model forwards call kernels): the chunked output is written over q's own buffer
    (here a head view of a (B, L, C) projection, as diffusers processors pass it), values as the allocating form;
    a q that overlaps k or v (slices of one fused qkv) gets a fresh output and is left unchanged."""
    import compress.nn.attention as attention

    monkeypatch.setattr(attention, "INFERENCE_CHUNK", 16)
    torch.manual_seed(0)
    kern = LinearAttention(4, 8, (10, 12), conv=3)
    torch.nn.init.normal_(kern.dwc.weight)
    proj = [torch.randn(2, 120, 32) for _ in range(3)]
    q, k, v = (x.view(2, 120, 4, 8).transpose(1, 2) for x in proj)
    with torch.no_grad():
        expected = kern(q, k, v)
        out = kern(q, k, v, query_is_scratch=True)
    assert out.data_ptr() == proj[0].data_ptr() and torch.equal(out, q)
    assert torch.equal(out, expected)
    assert out.transpose(1, 2).is_contiguous()  # the processor's reshape back to (B, L, C) is a view
    fused = torch.randn(2, 120, 3, 4, 8)
    q, k, v = fused.permute(2, 0, 3, 1, 4)
    before = q.clone()
    with torch.no_grad():
        out = kern(q, k, v, query_is_scratch=True)
    assert torch.equal(q, before) and not torch._C._overlaps(out, fused)


@pytest.mark.parametrize("family", FAMILIES)
def test_models_with_chunked_linear_attention_give_their_unchunked_outputs(family, monkeypatch):
    """Every family's forward with its kernels chunked (4-token chunks, output over the processor's query where it
    may) computes what it computes with one whole-sequence kernel call: no processor reads the query it gave away."""
    import compress.nn.attention as attention

    model = linearise(model_of(family), softmax_blocks=0)
    for kern in kernels(model):
        torch.nn.init.normal_(kern.dwc.weight, std=0.1)
    monkeypatch.setattr(attention, "INFERENCE_CHUNK", 1 << 20)
    whole = outputs(model)
    monkeypatch.setattr(attention, "INFERENCE_CHUNK", 4)
    chunked = outputs(model)
    assert rel_err(chunked, whole) < 1e-5


def test_window_attention_equals_softmax_masked_to_each_tokens_neighbourhood():
    """Tiles + halo on a grid the window does not divide (5 x 7, window 3) give the dense masked softmax."""
    torch.manual_seed(0)
    rows, cols, w = 5, 7, 3
    q, k, v = (torch.randn(2, 2, rows * cols, 8) for _ in range(3))
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    y, x = y.reshape(-1), x.reshape(-1)
    near = ((y[:, None] - y[None]).abs() <= w // 2) & ((x[:, None] - x[None]).abs() <= w // 2)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=near)
    torch.testing.assert_close(WindowAttention(2, 8, (rows, cols), window=w)(q, k, v), ref, atol=1e-5, rtol=1e-4)


def test_grid_follows_the_running_call_so_another_resolution_convolves_its_own_grid():
    kern = LinearAttention(1, 4, (2, 2), conv=3)
    with torch.no_grad():
        kern.dwc.weight.normal_()
    v = torch.randn(1, 1, 12, 4)
    with pytest.raises(ValueError, match="2x2 token grid does not fit a sequence of 12"):
        kern(v, v, v)
    with denoiser_call(None, grid=(3, 4)):
        assert kern(v, v, v).shape == v.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_linearised_close_to_its_source_and_reloads_bit_identically(family, tmp_path):
    """Fresh ReLU kernels on the source's projections (LiT's weight inheritance): the output moves, but
    stays near the source; the artifact replays exactly."""
    model = model_of(family)
    views = [a for b in get_adapter(model).blocks() for a in b.attentions if a.kind != "cross"]
    out = linearise(model)
    assert len(kernels(out)) == len(views) > 0
    err = rel_err(outputs(out), outputs(model))
    assert 0 < err < 0.05, err
    compress.save(out, tmp_path / "a")
    again = compress.load(tmp_path / "a")
    assert len(kernels(again)) == len(views)
    assert torch.equal(outputs(again), outputs(out))


def test_pixart_keeps_cross_attention_softmax():
    out = linearise(tiny_diffusers_model("pixart"))
    adapter = get_adapter(out)
    kinds = {a.kind: adapter.attention_kernel(a) for b in adapter.blocks() for a in b.attentions}
    assert isinstance(kinds["self"], LinearAttention) and kinds["cross"] is None


@pytest.mark.parametrize("family", ["native", "sd3"])
def test_linear_attention_exports_without_a_token_by_token_softmax(family, tmp_path):
    """The exported graph (validated against PyTorch by ``export_onnx``) has no Softmax left: every attention of
    the tiny models is linearised (SD3: joint attention over [image | text])."""
    from exporters.onnx import export_onnx

    out = linearise(model_of(family), conv=3)
    for m in kernels(out):  # a non-zero DWC, so the Conv path is exported and checked too
        with torch.no_grad():
            m.dwc.weight.normal_(std=0.1)
    d = export_onnx(out, tmp_path / "onnx")
    meta = json.loads((d / "export.json").read_text())
    assert meta["validation"]["passed"], meta["validation"]
    ops = {n.op_type for n in onnx.load(str(d / "model.onnx"), load_external_data=False).graph.node}
    assert "Softmax" not in ops and {"MatMul", "Relu", "ReduceSum"} <= ops, ops


def test_sensitivity_keeps_softmax_where_linearising_changes_the_output_most():
    model = randomized_dit()
    with torch.no_grad():  # make block 2's attention dominate the output
        model.blocks[2].attn.proj.weight.mul_(8.0)
    out = linearise(model, softmax_blocks=1)
    adapter = get_adapter(out)
    kept = [b.index for b in adapter.blocks() if adapter.attention_kernel(b.attentions[0]) is None]
    assert kept == [2]
    # and the scores it used are the ones output_errors measures one block at a time
    ctx = PassContext.for_model(model, CalibrationConfig(**CAL), show_progress=False)
    rows = ctx.calibration.rows()
    src = get_adapter(model)

    def one(view):
        return lambda: src.trial_attention_kernel(view, LinearAttention(view.heads, view.head_dim, (4, 4)))

    scores = output_errors(model, rows, {b.index: one(b.attentions[0]) for b in src.blocks()})
    assert max(scores, key=scores.get) == 2


def test_hybrid_student_is_closer_to_its_source_than_the_all_linear_one():
    model = randomized_dit()
    err_all = rel_err(outputs(linearise(model)), outputs(model))
    err_hybrid = rel_err(outputs(linearise(model, softmax_blocks=2)), outputs(model))
    assert err_hybrid < err_all


def test_attention_kd_moves_each_linear_attention_toward_the_softmax_one():
    model = randomized_dit()
    fresh = linearise(model)
    trained = linearise(model, layer_kd={"steps": 30, "batch_size": 8, "lr": 3e-3, "warmup": 0})
    assert rel_err(outputs(trained), outputs(model)) < 0.7 * rel_err(outputs(fresh), outputs(model))
    for b in get_adapter(trained).blocks():  # only attention weights trained: the MLPs are the source's
        assert torch.equal(trained.blocks[b.index].mlp.fc1.weight, model.blocks[b.index].mlp.fc1.weight)


def test_bundled_recipes_parse_and_chain_linear_attention_with_recovery():
    for name in ("linear-attention", "linear-attention-hybrid", "linear-attention-hybrid-w8a8"):
        r = load_recipe(name)
        assert r.passes[0].pass_ == "linear_attention"
        assert [p.pass_ for p in r.passes][1] == "distill"
    assert load_recipe("linear-attention").passes[0].softmax_blocks == 0
    assert load_recipe("linear-attention-hybrid").passes[0].softmax_blocks == 2  # 1/4 of the reference's 8 blocks


@pytest.mark.parametrize("fields, message", [
    ({"kernel": "window", "window": 9}, "field 'window': 9 is larger than the 4x4 token grid"),
    ({"softmax_blocks": 5}, "field 'softmax_blocks': 5 blocks keep softmax attention, but the model has 4"),
    ({"attention": ["cross"]}, "field 'attention': 'cross' attention is kept"),
    ({"selection": "manual", "keep_softmax": {"block": [7]}}, "field 'keep_softmax': block7"),
])
def test_impossible_settings_are_clear_errors(fields, message):
    with pytest.raises(DitCompressError, match=message.replace("(", r"\(")):
        linearise(randomized_dit(), **fields)


def test_window_on_joint_attention_names_the_attention():
    with pytest.raises(DitCompressError, match="'window' needs image-only attention; transformer_blocks.0.attn"):
        linearise(tiny_diffusers_model("sd3"), kernel="window", window=3)


def test_linearising_twice_is_refused():
    once = linearise(randomized_dit())
    with pytest.raises(DitCompressError, match="already computes with a replaced kernel"):
        linearise(once)


def test_an_adapter_that_does_not_expose_attention_is_a_clear_error(monkeypatch):
    from compress.models.adapters.base import ModelAdapter
    from compress.models.adapters.native import NativeDiTAdapter

    monkeypatch.setattr(NativeDiTAdapter, "install_kernel", ModelAdapter.install_kernel)
    with pytest.raises(DitCompressError, match="does not expose its attention computation"):
        linearise(randomized_dit())


@pytest.mark.parametrize("fields, where", [
    ({"kernel": "window"}, "window"), ({"conv": 2}, "conv"), ({"softmax_blocks": -1}, "softmax_blocks"),
    ({"kernel": "softmax"}, "kernel"), ({"selection": "manual"}, "keep_softmax"),
])
def test_bad_fields_are_refused_by_name_when_the_recipe_is_read(fields, where):
    with pytest.raises(DitCompressError, match=where):
        parse_recipe({"name": "t", "description": "t", "passes": [{"pass": "linear_attention", **fields}]})


def test_cli_reports_a_window_larger_than_the_grid_in_one_line(tmp_path):
    from safetensors.torch import save_file

    m = randomized_dit()
    src = tmp_path / "tiny.safetensors"
    save_file(m.state_dict(), src, metadata={"dit_config": json.dumps(m.config.to_dict())})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "description": "d", "defaults": {"calibration": CAL},
                                      "passes": [{"pass": "linear_attention", "kernel": "window", "window": 5}]}))
    code, out = cli("apply", str(recipe), "--model", str(src), "--out", str(tmp_path / "a"))
    assert_one_line_error(code, out, "window", "larger than the 4x4 token grid")
    assert not (tmp_path / "a").exists()


def test_window_student_trains_reloads_and_keeps_its_window(tmp_path):
    model = randomized_dit()
    out = linearise(model, kernel="window", window=3, layer_kd={"steps": 2, "batch_size": 4})
    assert all(isinstance(k, WindowAttention) and k.window == 3 for k in kernels(out))
    compress.save(out, tmp_path / "a")
    assert torch.equal(outputs(compress.load(tmp_path / "a")), outputs(out))


def test_attention_kd_runs_under_torchrun_and_keeps_replicas_equal(tmp_path):
    from tests.test_pruning import torchrun

    out = torchrun("""
student = compress.apply_recipe(teacher, {"name": "d", "description": "d", "passes": [
    {"pass": "linear_attention", "softmax_blocks": 1,
     "layer_kd": {"steps": 4, "batch_size": 4, "checkpoint_every": 2}}]}, ctx=ctx, show_progress=False)
""", tmp_path, 29541)
    assert "pass1-linear_attention-layers: 4 steps" in out
    assert (tmp_path / "w" / "pass1-linear_attention-layers.pt").exists()
