"""Recipe validation: every malformed recipe gives one clear DitCompressError naming file, pass and field."""

import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compress
from compress import DitCompressError
from compress.recipe import RECIPES_DIR, bundled_recipes, load_recipe, parse_recipe, recipe_schema

GOOD = {"name": "ok", "description": "fine", "passes": [{"pass": "quantize", "weights": {"dtype": "int8"}}]}


def with_(path, value):
    """GOOD with one nested value replaced (path: tuple of keys/indices); value DELETE removes it."""
    import copy

    d = copy.deepcopy(GOOD)
    cur = d
    for k in path[:-1]:
        cur = cur.setdefault(k, {}) if isinstance(cur, dict) else cur[k]
    if value is DELETE:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return d


DELETE = object()
Q = ("passes", 0)

# (recipe data, text the error must contain)
BROKEN = [
    ([1, 2], "must be a YAML mapping"),
    ("just a string", "must be a YAML mapping"),
    (None, "must be a YAML mapping"),
    (with_(("name",), DELETE), "field 'name': required field is missing"),
    (with_(("description",), DELETE), "field 'description': required field is missing"),
    (with_(("passes",), DELETE), "field 'passes': required field is missing"),
    (with_(("passes",), []), "field 'passes': List should have at least 1 item"),
    (with_(("passes",), {"pass": "quantize"}), "field 'passes': Input should be a valid array"),
    (with_(("passes",), ["quantize"]), "pass #1"),
    (with_(("passes",), [{"weights": {"dtype": "int8"}}]), "pass #1: missing 'pass:' key"),
    (with_(("passes",), [{"pass": "quantise"}]), "pass #1 ('quantise'): unknown pass 'quantise'; known passes: cache, distill, linear_attention, moe, prune_depth, prune_width, quantize"),
    (with_((*Q, "bitz"), 8), "pass #1 ('quantize'), field 'bitz': unknown field"),
    (with_(("author",), "me"), "field 'author': unknown field"),
    (with_((*Q, "weights", "dtype"), 16), "pass #1 ('quantize'), field 'weights.dtype'"),
    (with_((*Q, "weights", "dtype"), "int3"), "field 'weights.dtype': Input should be 'int8', 'int4' or 'fp8'"),
    (with_((*Q, "weights", "group_size"), 4), "field 'weights.group_size': Input should be greater than or equal to 8"),
    (with_((*Q, "weights", "group_size"), "abc"), "field 'weights.group_size'"),
    (with_((*Q, "weights", "group_size"), 100000), "less than or equal to 4096"),
    (with_((*Q, "weights", "symmetric"), "maybe"), "field 'weights.symmetric': Input should be a valid boolean"),
    (with_((*Q, "weights", "group_scales"), "int"), "field 'weights.group_scales': Input should be 'float' or 'integer'"),
    (with_((*Q, "weights", "bits"), 8), "field 'weights.bits': unknown field"),
    (with_((*Q, "weights"), "int8"), "field 'weights'"),
    (with_((*Q, "layers", "include"), "blocks.*"), "field 'layers.include': Input should be a valid array"),
    (with_((*Q, "layers", "only"), ["x"]), "field 'layers.only': unknown field"),
    (with_((*Q, "layers", "modulation"), "yes please"), "field 'layers.modulation'"),
    (with_(("defaults", "colour"), "red"), "field 'defaults.colour': unknown field"),
    (with_(("defaults", "seed"), -1), "field 'defaults.seed': Input should be greater than or equal to 0"),
    (with_(("defaults", "device"), "tpu"), "field 'defaults.device': String should match pattern"),
    (with_(("defaults", "calibration", "samples"), 0), "field 'defaults.calibration.samples'"),
    (with_(("defaults", "calibration", "steps"), 5000), "field 'defaults.calibration.steps'"),
    (with_(("defaults", "calibration", "timesteps"), "random"), "field 'defaults.calibration.timesteps'"),
    (with_(("defaults", "calibration", "cfg_scale"), 0.5), "field 'defaults.calibration.cfg_scale'"),
    (with_(("defaults", "calibration", "nsamples"), 3), "field 'defaults.calibration.nsamples': unknown field"),
    (with_(("name",), "has spaces"), "field 'name': String should match pattern"),
    (with_(("description",), ""), "field 'description': String should have at least 1 character"),
    (with_(("passes",), [{"pass": None}]), "pass #1"),
    (with_(("defaults",), "fast"), "field 'defaults': Input should be an object"),
    (with_(("defaults", "calibration"), [1]), "field 'defaults.calibration': Input should be an object"),
    (with_(("defaults", "calibration", "keep_steps"), 0), "field 'defaults.calibration.keep_steps': Input should be "
                                                          "greater than or equal to 1"),
    (with_(("defaults", "calibration", "batch_size"), 0), "field 'defaults.calibration.batch_size'"),
    (with_((*Q, "weights", "per_channel"), "sometimes"), "field 'weights.per_channel': Input should be a valid boolean"),
    (with_((*Q, "weights", "reduce_range"), True), "field 'weights.reduce_range': 7-bit weights are for"),
    (with_((*Q, "layers", "exclude"), "blocks.0.*"), "field 'layers.exclude': Input should be a valid array"),
    (with_(("passes",), [GOOD["passes"][0], {"pass": "quantize", "weights": {"dtype": "fp7"}}]),
     "pass #2 ('quantize'), field 'weights.dtype'"),
]


@pytest.mark.parametrize("data,expected", BROKEN, ids=[str(i) for i in range(len(BROKEN))])
def test_broken_recipe_names_the_problem(tmp_path, data, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DitCompressError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg and expected in msg, msg
    assert "\n" not in msg.strip()  # one paragraph


def test_every_field_has_a_broken_case():
    """The table names every field of the recipe, its defaults and calibration, and the quantize pass's weights
    and layers: a field added without a broken case here fails this test."""
    from compress.calibration import CalibrationConfig
    from compress.passes.base import LayerSelection
    from compress.passes.quantize import WeightQuant
    from compress.recipe import RecipeDefaults, recipe_model

    fields = [f"field '{f}'" for f in recipe_model().model_fields]
    fields += [f"field 'defaults.{f}'" for f in RecipeDefaults.model_fields]
    fields += [f"field 'defaults.calibration.{f}'" for f in CalibrationConfig.model_fields]
    fields += [f"field 'weights.{f}'" for f in WeightQuant.model_fields]
    fields += [f"field 'layers.{f}'" for f in LayerSelection.model_fields]
    named = " ".join(expected for _, expected in BROKEN)
    assert [f for f in fields if f not in named] == []


@pytest.mark.parametrize("text,expected", [
    ("name: x\npasses: [\n", "not valid YAML at line 3"),
    ("name: x\n\tdescription: y\n", "not valid YAML at line 2"),
    ("a: b: c\n", "not valid YAML at line 1"),
])
def test_yaml_syntax_errors_give_line(tmp_path, text, expected):
    p = tmp_path / "syntax.yaml"
    p.write_text(text)
    with pytest.raises(DitCompressError, match=expected):
        load_recipe(p)


def test_binary_and_missing_files(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(bytes(range(256)))
    with pytest.raises(DitCompressError, match="bin.yaml"):
        load_recipe(p)
    with pytest.raises(DitCompressError, match="recipe file not found"):
        load_recipe(tmp_path / "none.yaml")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(["name", "description", "passes", "defaults", "extra"]), value=json_values,
       inner=st.sampled_from(["pass", "weights", "layers", "junk"]), inner_value=json_values)
def test_fuzzed_recipes_never_raise_anything_else(key, value, inner, inner_value):
    import copy

    for data in (dict(GOOD, **{key: value}), copy.deepcopy(GOOD)):
        data["passes"] = data["passes"] if key == "passes" else [dict(GOOD["passes"][0], **{inner: inner_value})]
        try:
            parse_recipe(data, "fuzz.yaml")
        except DitCompressError as e:
            assert str(e).startswith("fuzz.yaml: ")


def test_bundled_recipes_validate_and_schema_lists_passes():
    recipes = bundled_recipes()
    assert recipes and not any(d.startswith("(invalid") for d in recipes.values())
    schema = recipe_schema()
    assert "passes" in schema["properties"]
    assert "quantize" in str(schema)


def test_layer_pattern_matching_nothing_is_named(tiny_native):
    with pytest.raises(DitCompressError, match=r"field 'layers.include': pattern 'blocks\.\*\.ffn\.\*' matches no"):
        compress.apply_recipe(tiny_native, {**GOOD, "passes": [
            {"pass": "quantize", "layers": {"include": ["blocks.*.ffn.*"]}}]}, show_progress=False)


def test_group_size_that_does_not_divide_names_the_layer(tiny_native):
    with pytest.raises(DitCompressError, match=r"'weights.group_size': 32 does not divide layer 'blocks.0.attn.qkv'"):
        compress.apply_recipe(tiny_native, {**GOOD, "passes": [
            {"pass": "quantize", "weights": {"dtype": "int4", "group_size": 32}}]}, show_progress=False)


def test_cli_broken_recipe_is_one_paragraph(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(with_((*Q, "weights", "dtype"), "int3")))
    r = subprocess.run([sys.executable, "-m", "compress.cli", "apply", str(p), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert "weights.dtype" in r.stdout and not (tmp_path / "o").exists()


def test_recipes_dir_is_the_repo_folder():
    assert (RECIPES_DIR / "int8-weights.yaml").exists()
