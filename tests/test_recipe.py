"""Recipe presets and their per-role QuantSpecs (the paper's recipe and its baselines)."""

import json

import pytest

from hf_nvfp4.recipe import PRESETS, QuantSpec, Recipe, RoleSpecs, get_recipe

TE_SIGN = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def test_nvfp4_preset_is_the_papers_recipe():
    specs = PRESETS["nvfp4"].role_specs()
    assert specs.x == QuantSpec("nvfp4", (1, 16), "nearest", rht=False)
    assert specs.w == QuantSpec("nvfp4", (16, 16), "nearest", rht=False)
    assert specs.w_dgrad == specs.w  # W^T comes from the same 16x16 tiles
    assert specs.dy == QuantSpec("nvfp4", (1, 16), "stochastic", rht=False)
    assert specs.dy_t == QuantSpec("nvfp4", (1, 16), "stochastic", rht=True)
    assert specs.x_t == QuantSpec("nvfp4", (1, 16), "nearest", rht=True)
    assert all(s.rht_sign == TE_SIGN for s in (specs.x, specs.w, specs.dy, specs.dy_t, specs.x_t))


def test_fp8_block_preset():
    specs = PRESETS["fp8_block"].role_specs()
    for role in (specs.x, specs.dy, specs.dy_t, specs.x_t):
        assert (role.fmt, role.tile, role.rounding, role.rht) == ("fp8_block", (1, 128),
                                                                  "nearest", False)
    assert specs.w == specs.w_dgrad == QuantSpec("fp8_block", (128, 128), "nearest", rht=False)


def test_mxfp4_preset_uses_32_blocks():
    specs = PRESETS["mxfp4"].role_specs()
    assert specs.x.tile == specs.dy.tile == specs.dy_t.tile == specs.x_t.tile == (1, 32)
    assert specs.w.tile == (32, 32)
    assert specs.dy.rounding == "stochastic" and specs.dy_t.rht and specs.x_t.rht
    assert {s.fmt for s in (specs.x, specs.w, specs.dy, specs.dy_t, specs.x_t)} == {"mxfp4"}


def test_bf16_preset_quantizes_nothing():
    assert PRESETS["bf16"].role_specs() == RoleSpecs(None, None, None, None, None, None)
    assert PRESETS["bf16"].is_high_precision
    assert not any(PRESETS[p].is_high_precision for p in ("nvfp4", "mxfp4", "fp8_block"))


def test_knobs_change_only_their_roles():
    specs = Recipe(weight_2d=False, stochastic_rounding=False, rht=False).role_specs()
    assert specs.w.tile == (1, 16)
    assert specs.dy.rounding == specs.dy_t.rounding == "nearest"
    assert not specs.dy_t.rht and not specs.x_t.rht
    # Forward in BF16, gradients still NVFP4 (the late switch's "forward" mode).
    fwd = Recipe(fprop_format="bf16").role_specs()
    assert fwd.x is None and fwd.w is None
    assert fwd.w_dgrad.tile == (16, 16) and fwd.dy.fmt == "nvfp4"


def test_get_recipe():
    assert get_recipe(None) is PRESETS["nvfp4"]
    assert get_recipe("fp8_block") is PRESETS["fp8_block"]
    r = Recipe(rht=False)
    assert get_recipe(r) is r
    # A dict overrides fields of its preset (nvfp4 when none is named).
    assert get_recipe({"preset": "mxfp4", "stochastic_rounding": False}) == Recipe(
        "mxfp4", "mxfp4", "mxfp4", stochastic_rounding=False
    )
    assert get_recipe({"rht": False}) == Recipe(rht=False)
    assert get_recipe({"preset": "bf16"}) == PRESETS["bf16"]


def test_to_dict_round_trips_through_json():
    recipe = Recipe(dgrad_format="fp8_block", rht_sign=[-1] * 16)
    d = json.loads(json.dumps(recipe.to_dict()))
    assert d["rht_sign"] == [-1] * 16
    assert Recipe.from_dict(d) == recipe
    assert get_recipe(d) == recipe


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: get_recipe("fp4"), ValueError, "unknown recipe preset 'fp4'"),
        (lambda: get_recipe(4), TypeError, "got int"),
        (lambda: get_recipe({"preset": "nvfp4", "sr": True}), ValueError,
         "unknown recipe fields \\['sr'\\]"),
        (lambda: Recipe(wgrad_format="fp16"), ValueError, "wgrad_format must be one of"),
        (lambda: Recipe(rht_sign=(1,) * 15), ValueError, "rht_sign must be 16 entries"),
        (lambda: Recipe(rht_sign=(2,) * 16), ValueError, "rht_sign must be 16 entries"),
        (lambda: Recipe(wgrad_format="bf16"), ValueError,
         "rht=True needs a quantized wgrad GEMM; got wgrad_format='bf16'"),
        (lambda: Recipe("nvfp4", "bf16", "bf16", rht=False), ValueError,
         "stochastic_rounding=True needs a quantized dgrad or wgrad GEMM"),
    ],
)
def test_invalid_recipes_name_the_field(make, error, match):
    with pytest.raises(error, match=match):
        make()
