"""The README's export compatibility table: every family x fp32 / quantized / pruned exports to ONNX, and the
exported graph, run here on ONNX Runtime on inputs the exporter's own validation never saw, computes what the
PyTorch model computes. The quantized model carries all three formats at once (W8A8 INT8 as QDQ on attention,
INT4 weight-only on adaLN -- on PixArt, whose adaLN lives outside the blocks, on the cross-attention --, FP8 on
the rest), so one export per family covers each of them; each format is shown to be in the graph by the
output moving away from the export's when that format's layers are put back to full precision."""

import copy
import json

import pytest
import torch

pytest.importorskip("onnxruntime", reason="ONNX export is the optional [onnx] extra")

from compress import apply_recipe  # noqa: E402
from compress.models.adapters import get_adapter  # noqa: E402
from compress.nn.quant import QuantLinear, WeightOnlyLinear, fake_quant_arithmetic  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from tests.conftest import randomized_dit  # noqa: E402
from tests.tiny_models import tiny_diffusers_model  # noqa: E402

CAL = {"samples": 2, "steps": 2, "batch_size": 2}
W8A8 = {"pass": "quantize", "weights": {"dtype": "int8", "reduce_range": True},
        "activations": {"dtype": "int8", "mode": "static"}, "smoothing": {"alpha": "search"}}
INT4 = {"pass": "quantize", "weights": {"dtype": "int4", "group_size": 16}}
FP8 = {"pass": "quantize", "weights": {"dtype": "fp8"}, "activations": {"dtype": "fp8", "mode": "static"}}
PRUNED = [{"pass": "prune_depth", "depth": 0.5, "method": "influence"},
          {"pass": "prune_width", "heads": 0.5, "mlp": 0.3, "importance": "magnitude"}]
# the README's tolerances (max abs error relative to the output's max): fp32, and against the fake-quant model
TOLERANCE = {"fp32": 1e-4, "quantized": 2e-2, "pruned": 1e-4}


def quantized_passes(family: str) -> list[dict]:
    if family == "pixart":  # no adaLN Linear inside PixArt blocks: INT4 goes on the cross-attention
        return [{**W8A8, "layers": {"include": ["*attn1*"]}}, {**INT4, "layers": {"include": ["*attn2*"]}}, FP8]
    return [{**W8A8, "layers": {"include": ["*attn*"]}}, {**INT4, "layers": {"modulation": "only"}}, FP8]


def format_of(m) -> str | None:
    if isinstance(m, QuantLinear):
        return {"int8": "int8-qdq", "fp8": "fp8"}[m.weight_format]
    return f"int{m.bits}" if isinstance(m, WeightOnlyLinear) else None


def onnx_and_torch(export_dir, model, seed=7, batch=3):
    """ONNX Runtime's output on fresh inputs (not the validation's), with the inputs for PyTorch."""
    import onnxruntime as ort

    contract = get_adapter(model).contract()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *contract.latent_shape), generator=g)
    cond = contract.example_cond(batch, g)
    t = torch.tensor([120.0, 640.0, 870.0][:batch])
    sess = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    vals = [x, t, *[cond[k] for k in sorted(cond)]]
    out = sess.run(None, {i.name: v.numpy() for i, v in zip(sess.get_inputs(), vals)})[0]
    return torch.from_numpy(out), (x, t, cond)


def forward(model, inputs):
    """PyTorch's output in the fake-quant arithmetic, which the graph's QDQ ops stand for (the CPU FP8 kernel
    rounds its outputs to bf16, and the next FP8 layer's rounding amplifies that)."""
    with torch.no_grad(), fake_quant_arithmetic(model):
        return get_adapter(model).forward(*inputs)


def rel_mse(a, b):
    return float((a - b).pow(2).mean() / b.pow(2).mean())


def with_format_restored(model, source, fmt):
    """``model`` with every layer of format ``fmt`` put back to the source's full-precision Linear."""
    out = copy.deepcopy(model)
    for name, m in model.named_modules():
        if format_of(m) == fmt:
            parent, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent), attr, copy.deepcopy(source.get_submodule(name)))
    return out


@pytest.mark.parametrize("what", ["fp32", "quantized", "pruned"])
@pytest.mark.parametrize("family", ["dit", "diffusers-dit", "pixart", "sd3", "flux"])
def test_export_compatibility(family, what, tmp_path):
    source = randomized_dit() if family == "dit" else tiny_diffusers_model(family)
    model = copy.deepcopy(source)
    if what != "fp32":
        passes = quantized_passes(family) if what == "quantized" else PRUNED
        model = apply_recipe(model, {"name": what, "description": what, "defaults": {"calibration": CAL},
                                     "passes": passes}, show_progress=False)
    d = export_onnx(model, tmp_path / "onnx")
    meta = json.loads((d / "export.json").read_text())
    out, inputs = onnx_and_torch(d, model)
    ref = forward(model, inputs)
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    max_rel = float((out - ref).abs().max() / ref.abs().max())
    assert max_rel < TOLERANCE[what], max_rel
    err = rel_mse(out, ref)
    if what == "quantized":
        layers: dict[str, int] = {}
        for m in model.modules():
            if format_of(m):
                layers[format_of(m)] = layers.get(format_of(m), 0) + 1
        assert set(layers) == {"int8-qdq", "int4", "fp8"}, layers  # all three formats, on every family
        assert meta["qdq_layers"] == layers["int8-qdq"]
        for fmt in layers:  # the graph carries each format: without it PyTorch is >= 10x further from ONNX
            restored = rel_mse(out, forward(with_format_restored(model, source, fmt), inputs))
            assert 10 * err < restored, (fmt, err, restored)
    if what == "pruned":
        before, after = get_adapter(source), get_adapter(model)
        heads, hidden = before.blocks()[0].attentions[0].heads, before.blocks()[0].mlps[0].hidden
        assert after.depth < before.depth
        assert all(a.heads < heads for b in after.blocks() for a in b.attentions)
        assert all(m.hidden < hidden for b in after.blocks() for m in b.mlps)
        assert meta["params"] < sum(p.numel() for p in source.parameters())
        assert 10 * err < rel_mse(out, forward(source, inputs))  # the export is the pruned model, not the source
