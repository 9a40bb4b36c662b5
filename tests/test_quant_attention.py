"""INT8 attention matmuls (the quantize pass's ``attention``): the kernel, its calibration, replay and QDQ export."""

import onnx
import pytest
import torch

from compress import apply_recipe, load, save
from compress.errors import DitCompressError
from compress.models.adapters import get_adapter
from compress.nn.attention import QuantAttention
from compress.recipe import parse_recipe
from tests.test_quantize import FAST_CALIB, outputs, rel_err
from tests.tiny_models import tiny_diffusers_model

W8A8_ATTN = {"pass": "quantize", "weights": {"dtype": "int8"}, "activations": {"dtype": "int8", "mode": "static"},
             "attention": {"dtype": "int8"}}


def recipe(**quantize):
    return parse_recipe({"name": "t", "description": "t", "defaults": {"calibration": FAST_CALIB},
                         "passes": [{**W8A8_ATTN, **quantize}]})


def kernels(model) -> dict[str, QuantAttention]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantAttention)}


def test_quant_attention_rounds_every_matmul_input_to_its_8bit_grid():
    torch.manual_seed(0)
    k = QuantAttention(2, 8, (2, 2))
    q, kk, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    k.set_scales({"q": 2.0, "k": 2.0, "v": 2.0, "p": 1.0})  # q/k/v clipped at 2, probabilities on 1/255 steps
    g = lambda x, s, lo, hi: torch.clamp(torch.round(x / s), lo, hi) * s  # noqa: E731  (by hand)
    p = (g(q, 2 / 127, -127, 127) @ g(kk, 2 / 127, -127, 127).transpose(-2, -1) / 8 ** 0.5).softmax(-1)
    assert torch.allclose(k(q, kk, v), g(p, 1 / 255, 0, 255) @ g(v, 2 / 127, -127, 127), atol=1e-6)
    k.set_scales({"q": q.abs().max(), "k": kk.abs().max(), "v": v.abs().max(), "p": 1.0})  # calibrated: no clipping
    out = k(q, kk, v)
    exact = torch.nn.functional.scaled_dot_product_attention(q, kk, v)
    assert 0 < rel_err(out, exact) < 1e-3


def test_int8_attention_reloads_bit_identically_and_exports_quantized_matmuls(tiny_native, tmp_path):
    from exporters.onnx import export_onnx

    q = apply_recipe(tiny_native, recipe(), show_progress=False)
    views = [a for b in get_adapter(q).blocks() for a in b.attentions]
    assert len(kernels(q)) == len(views) > 0
    err = rel_err(outputs(q), outputs(tiny_native))
    assert 0 < err < 1e-3, err
    save(q, tmp_path / "a")
    assert torch.equal(outputs(load(tmp_path / "a")), outputs(q))
    d = export_onnx(q, tmp_path / "onnx")  # validated against the PyTorch fake-quant model
    graph = onnx.load(str(d / "model.onnx"), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}

    def quantized_activation(name: str) -> bool:  # through Transpose / Reshape to DequantizeLinear(QuantizeLinear(.))
        n = producers.get(name)
        while n is not None and n.op_type in ("Transpose", "Reshape", "Mul"):
            n = producers.get(n.input[0])
        return n is not None and n.op_type == "DequantizeLinear" and producers.get(n.input[0]) is not None \
            and producers[n.input[0]].op_type == "QuantizeLinear"  # not a weight (an initializer)

    matmuls = [n for n in graph.node if n.op_type == "MatMul" and all(quantized_activation(i) for i in n.input)]
    assert len(matmuls) == 2 * len(views), len(matmuls)  # q k^T and p v of every attention, both operands 8-bit


@pytest.mark.parametrize("family", ["diffusers-dit", "pixart", "sd3", "flux"])
def test_int8_attention_quantizes_self_and_joint_attention_of_diffusers_families(family, tmp_path):
    model = tiny_diffusers_model(family)
    q = apply_recipe(model, recipe(), show_progress=False)
    views = [a for b in get_adapter(q).blocks() for a in b.attentions]
    wanted = [a.path for a in views if a.kind != "cross"]
    assert sorted(kernels(q)) and len(kernels(q)) == len(wanted)
    assert all(get_adapter(q).attention_kernel(a) is None for a in views if a.kind == "cross")
    err = rel_err(outputs(q), outputs(model))
    assert 0 < err < 1e-2, err
    save(q, tmp_path / "a")
    assert torch.equal(outputs(load(tmp_path / "a")), outputs(q))
    if family == "pixart":  # the routed kernel traces into the export, which validates
        from exporters.onnx import export_onnx

        export_onnx(q, tmp_path / "onnx")


def test_attention_above_max_error_keeps_float_matmuls(tiny_native):
    q = apply_recipe(tiny_native, recipe(attention={"dtype": "int8", "max_error": 1e-12}), show_progress=False)
    assert not kernels(q)
    assert any(isinstance(m, torch.nn.Module) and type(m).__name__ == "QuantLinear" for m in q.modules())


def test_attention_exclude_pattern_matching_nothing_names_the_field(tiny_native):
    with pytest.raises(DitCompressError, match=r"attention\.exclude.*'blocks\.99\.attn'"):
        apply_recipe(tiny_native, recipe(attention={"exclude": ["blocks.99.attn"]}), show_progress=False)


def test_attention_exclude_leaves_that_attention_in_float(tiny_native):
    q = apply_recipe(tiny_native, recipe(attention={"exclude": ["blocks.0.attn"]}), show_progress=False)
    assert "blocks.0.attn.kernel" not in kernels(q) and "blocks.1.attn.kernel" in kernels(q)


def test_second_reference_loads_by_name_with_64_tokens_and_quantizes_its_attention():
    from compress.sources import load_model

    model = load_model("reference-p1")  # digits at patch size 1: attention over 64 tokens
    ad = get_adapter(model)
    assert ad.token_grid(tuple(ad.latent_shape)) == (8, 8) and ad.depth == 8
    q = apply_recipe(model, recipe(), show_progress=False)
    assert len(kernels(q)) == 8
    err = rel_err(outputs(q), outputs(model))
    assert 0 < err < 1e-3, err


def test_pruning_after_quantization_is_refused_naming_the_layer(tiny_native):
    prune = parse_recipe({"name": "p", "description": "p", "passes": [{"pass": "prune_width", "heads": 0.25}]})
    q = apply_recipe(tiny_native, recipe(), show_progress=False)
    with pytest.raises(DitCompressError, match=r"blocks\.0\.attn\.qkv is already quantized.*prune width first"):
        apply_recipe(q, prune, show_progress=False)
    ad = get_adapter(tiny_native)  # an attention kernel alone (float Linears) is refused too
    view = ad.blocks()[0].attentions[0]
    ad.set_attention_kernel(view, QuantAttention(view.heads, view.head_dim, (4, 4)))
    with pytest.raises(DitCompressError, match=r"blocks\.0\.attn computes with a replaced attention kernel.*prune "
                                               r"heads first"):
        apply_recipe(tiny_native, prune, show_progress=False)
