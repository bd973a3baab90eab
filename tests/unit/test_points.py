"""The one table of activation points: names built, parsed and resolved without a model."""

import pytest

from probes.errors import CtdInputError
from probes.points import POINTS, REDUCTIONS, hook_name, point_of_hook, reduction_name, resolve_points


def test_every_point_name_round_trips():
    for key, point in POINTS.items():
        layers = (0, 3, 27) if point.per_layer else (None,)
        for layer in layers:
            assert point_of_hook(hook_name(key, layer)) == (key, layer)


def test_names_are_transformerlens_hook_names():
    assert hook_name("resid_post", 3) == "blocks.3.hook_resid_post"
    assert hook_name("z", 0) == "blocks.0.attn.hook_z"
    assert hook_name("head_out", 2) == "blocks.2.attn.hook_result"
    assert hook_name("embed") == "hook_embed"
    assert reduction_name("region_mass", 5) == "blocks.5.attn.hook_pattern:region_mass"
    assert set(REDUCTIONS) == {"region_mass", "doc_kurtosis", "value_mass"}


def test_resolve_points_expands_keys_layers_and_full_names():
    assert resolve_points(None, 2) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert resolve_points(["head_out@1", "blocks.0.hook_mlp_out"], 4) == ["blocks.1.attn.hook_result", "blocks.0.hook_mlp_out"]
    assert resolve_points(["embed"], 4) == ["hook_embed"]


@pytest.mark.parametrize("spec", [["pattern"], ["resid_post@9"], ["nope@1"], ["blocks.0.hook_nothing"]])
def test_bad_point_specs_are_input_errors(spec):
    with pytest.raises(CtdInputError):
        resolve_points(spec, 4)


def test_layered_points_need_a_layer_and_reductions_must_exist():
    with pytest.raises(CtdInputError, match="needs a layer"):
        hook_name("resid_post")
    with pytest.raises(CtdInputError, match="unknown attention reduction"):
        reduction_name("entropy", 0)
    with pytest.raises(CtdInputError, match="unknown activation point"):
        point_of_hook("blocks.0.hook_nothing")
