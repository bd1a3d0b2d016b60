import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import modeling_actprior as ap
from modeling_actprior.action_space import EmbodimentStats


def _normalizer(mode="quantile", d_max=32):
    rng = np.random.default_rng(0)
    norm = ap.ActionNormalizer(d_max, mode=mode)
    norm.add_embodiment(ap.get_embodiment("sawyer"), rng.normal(size=(500, 4)) * [1, 2, 3, 0.1] + [0, 1, -1, 5])
    norm.add_embodiment(ap.get_embodiment("xarm6"), rng.uniform(-3, 3, size=(500, 7)))
    return norm


@pytest.mark.parametrize("mode", ["quantile", "mean_std"])
def test_normalize_then_unnormalize_round_trips(mode):
    norm = _normalizer(mode)
    raw = torch.randn(5, 16, 4, dtype=torch.float64) * 3
    padded, mask = norm.normalize(raw, "sawyer")
    assert padded.shape == (5, 16, 32) and mask.sum() == 4
    torch.testing.assert_close(norm.unnormalize(padded, "sawyer"), raw)


def test_quantile_mode_maps_q01_q99_onto_minus_one_one():
    norm = _normalizer()
    st_ = norm.stats["sawyer"]
    lo, _ = norm.normalize(torch.tensor(st_.q01, dtype=torch.float64), "sawyer")
    hi, _ = norm.normalize(torch.tensor(st_.q99, dtype=torch.float64), "sawyer")
    torch.testing.assert_close(lo[:4], -torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(hi[:4], torch.ones(4, dtype=torch.float64))


def test_padded_dims_are_exactly_zero_and_masked():
    norm = _normalizer()
    padded, mask = norm.normalize(np.ones((3, 7)), "xarm6")
    assert mask.tolist() == [True] * 7 + [False] * 25
    assert torch.all(padded[:, 7:] == 0)


def test_constant_dimension_maps_to_zero_and_back():
    norm = ap.ActionNormalizer(8)
    acts = np.random.default_rng(0).normal(size=(50, 4))
    acts[:, 3] = 0.7  # a gripper that never moved
    norm.add_embodiment(ap.get_embodiment("sawyer"), acts)
    x, _ = norm.normalize(acts, "sawyer")
    assert torch.all(x[:, 3] == 0)
    torch.testing.assert_close(norm.unnormalize(x, "sawyer")[:, 3], torch.full((50,), 0.7))


def test_stats_travel_as_json_and_reload_identically(tmp_path):
    norm = _normalizer()
    norm.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "action_normalizer.json").read_text())
    assert set(data["stats"]) == {"sawyer", "xarm6"}
    loaded = ap.ActionNormalizer.from_pretrained(tmp_path)
    raw = np.random.default_rng(1).normal(size=(4, 7))
    torch.testing.assert_close(loaded.normalize(raw, "xarm6")[0], norm.normalize(raw, "xarm6")[0])


def test_checkpoint_keeps_a_robot_the_global_registry_does_not_know(tmp_path):
    spec = ap.EmbodimentSpec("my_so100_test", 6, [f"m{i}" for i in range(6)], "joint_position", 30)
    norm = ap.ActionNormalizer(16)
    norm.add_embodiment(spec, np.random.default_rng(0).normal(size=(20, 6)))
    norm.save_pretrained(tmp_path)
    assert "my_so100_test" not in ap.EMBODIMENT_REGISTRY
    assert ap.ActionNormalizer.from_pretrained(tmp_path).spec("my_so100_test") == spec


def test_wrong_action_width_names_the_expected_width():
    with pytest.raises(ValueError, match=r"action_dim=4 \(x, y, z, gripper\).*\(2, 5\)"):
        _normalizer().normalize(np.zeros((2, 5)), "sawyer")


def test_unknown_embodiment_lists_the_known_ones():
    with pytest.raises(ap.UnknownEmbodimentError, match="sawyer, xarm6"):
        _normalizer().normalize(np.zeros((2, 5)), "humanoid_x")
    with pytest.raises(ap.UnknownEmbodimentError, match="register_embodiment"):
        ap.get_embodiment("humanoid_x")


def test_known_robot_without_stats_says_the_checkpoint_lacks_its_statistics():
    with pytest.raises(ap.UnknownEmbodimentError, match="no normalization statistics"):
        _normalizer().normalize(np.zeros((2, 7)), "panda")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_actions_are_refused_with_their_position(bad):
    acts = np.zeros((3, 4))
    acts[1, 2] = bad
    with pytest.raises(ValueError, match=r"NaN or inf \(first at index \(1, 2\)"):
        _normalizer().normalize(acts, "sawyer")
    with pytest.raises(ValueError, match="NaN or inf"):
        EmbodimentStats.from_actions(acts)


def test_conflicting_registration_is_refused():
    with pytest.raises(ValueError, match="already registered with action_dim=4"):
        ap.register_embodiment(ap.EmbodimentSpec("sawyer", 3, ["a", "b", "c"]))


def test_embodiment_wider_than_d_max_says_to_raise_it():
    with pytest.raises(ValueError, match="Increase max_action_dim"):
        ap.ActionNormalizer(4).add_embodiment(ap.get_embodiment("kuka_iiwa"), np.zeros((3, 8)))


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 12),
    d_max=st.integers(12, 40),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-1e3, 1e3),
    mode=st.sampled_from(["quantile", "mean_std"]),
)
def test_round_trip_and_padding_hold_for_any_width_and_scale(width, d_max, scale, offset, mode):
    spec = ap.EmbodimentSpec(f"prop_robot_{width}", width, [f"a{i}" for i in range(width)])
    rng = np.random.default_rng(width)
    acts = rng.normal(size=(64, width)) * scale + offset
    norm = ap.ActionNormalizer(d_max, mode=mode, stats={spec.name: EmbodimentStats.from_actions(acts)},
                               embodiments={spec.name: spec})
    x, mask = norm.normalize(torch.as_tensor(acts), spec.name)
    assert x.shape == (64, d_max) and int(mask.sum()) == width and torch.all(x[:, width:] == 0)
    back = norm.unnormalize(x, spec.name)
    np.testing.assert_allclose(back.numpy(), acts, rtol=1e-9, atol=1e-9 * max(1.0, abs(offset) + scale))
