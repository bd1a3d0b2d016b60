"""Training views: action windows, masks, episode splits, mixtures, streaming, VLA samples."""

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_actprior.action_space import ActionNormalizer, EmbodimentStats, get_embodiment
from modeling_actprior.data import (
    ACTION_MASK,
    ACTIONS,
    DATASET_INDEX,
    DIM_MASK,
    EMBODIMENT,
    EPISODE_INDEX,
    FRAME_INDEX,
    HISTORY,
    HISTORY_MASK,
    IMAGE,
    INSTRUCTION,
    STATE,
    ActionWindowDataset,
    Episode,
    MixtureDataset,
    StreamingActionWindows,
    VLAWindowDataset,
    collate_windows,
    fit_normalizer,
    load_lerobot_dataset,
    split_episodes,
    write_lerobot_dataset,
)

D_MAX = 6


def tagged_episodes(lengths, cameras=()):
    """Sawyer episodes whose action rows say where they come from: (episode, frame, 0.5, -1)."""
    eps = []
    for e, t in enumerate(lengths):
        a = np.stack([np.full(t, e), np.arange(t), np.full(t, 0.5), np.full(t, -1.0)], 1).astype(np.float32)
        s = np.stack([np.arange(t) * 2.0, np.full(t, e)], 1).astype(np.float32)
        images = {c: np.full((t, 4, 4, 3), (e * 10 + np.arange(t))[:, None, None, None] % 256, np.uint8)
                  for c in cameras} or None
        eps.append(Episode(a, s, f"do task {e % 2}", images))
    return eps


def identity_normalizer():
    """Mean/std normalization with mean 0 and std 1: normalized actions equal raw ones."""
    norm = ActionNormalizer(max_action_dim=D_MAX, mode="mean_std")
    norm.add_embodiment(get_embodiment("sawyer"), EmbodimentStats(mean=[0.0] * 4, std=[1.0] * 4,
                                                                  q01=[-1.0] * 4, q99=[1.0] * 4))
    return norm


def build(path, lengths, cameras=(), cache=None):
    root = write_lerobot_dataset(path, tagged_episodes(lengths, cameras), get_embodiment("sawyer"), fps=10,
                                 camera_names=list(cameras), overwrite=True)
    return load_lerobot_dataset(root, cache_dir=str(cache or path.parent / "hf_cache"))


def key(sample):
    return (sample[EPISODE_INDEX], sample[FRAME_INDEX])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5), history=st.integers(0, 5),
       chunk=st.integers(1, 6))
def test_windows_never_cross_episode_boundaries(tmp_path, lengths, history, chunk):
    ds = build(tmp_path / "ds", lengths)
    w = ActionWindowDataset(ds, identity_normalizer(), history=history, chunk=chunk)
    assert len(w) == sum(lengths)
    seen = set()
    for i in range(len(w)):
        s = w[i]
        e, t = key(s)
        seen.add((e, t))
        n = lengths[e]
        assert s[HISTORY].shape == (history, D_MAX) and s[ACTIONS].shape == (chunk, D_MAX)
        for k in range(history):  # history slot k holds a_{t-history+k}
            src = t - history + k
            assert bool(s[HISTORY_MASK][k]) == (src >= 0)
            expected = [e, src, 0.5, -1.0, 0, 0] if src >= 0 else [0.0] * D_MAX
            assert s[HISTORY][k].tolist() == expected
        for k in range(chunk):  # chunk slot k holds a_{t+k}
            src = t + k
            assert bool(s[ACTION_MASK][k]) == (src < n)
            expected = [e, src, 0.5, -1.0, 0, 0] if src < n else [0.0] * D_MAX
            assert s[ACTIONS][k].tolist() == expected
    assert seen == {(e, t) for e, n in enumerate(lengths) for t in range(n)}


def test_masks_are_right_at_episode_start_and_end(tmp_path):
    ds = build(tmp_path / "ds", [6, 3])
    w = ActionWindowDataset(ds, identity_normalizer(), history=4, chunk=4)
    first = w[0]  # episode 0, t=0: no history, full chunk
    assert first[HISTORY_MASK].tolist() == [False] * 4 and first[HISTORY].abs().sum() == 0
    assert first[ACTION_MASK].tolist() == [True] * 4
    last = w[5]  # episode 0, t=5: full history a_1..a_4, one future step
    assert last[HISTORY_MASK].tolist() == [True] * 4 and last[HISTORY][:, 1].tolist() == [1, 2, 3, 4]
    assert last[ACTION_MASK].tolist() == [True, False, False, False]
    assert last[ACTIONS][1:].abs().sum() == 0
    second = w[6]  # episode 1, t=0: nothing of episode 0 leaks in
    assert key(second) == (1, 0) and not second[HISTORY_MASK].any()
    assert second[DIM_MASK].tolist() == [True] * 4 + [False] * 2 and second[EMBODIMENT] == "sawyer"


def test_window_values_equal_the_normalizer_on_raw_actions(tmp_path):
    ds = build(tmp_path / "ds", [7, 5])
    norm = fit_normalizer([ds], max_action_dim=8)
    w = ActionWindowDataset(ds, norm, history=2, chunk=3)
    s = w[7 + 2]  # episode 1, t=2
    expected, mask = norm.normalize(ds.actions(1), "sawyer")
    torch.testing.assert_close(s[HISTORY], expected[0:2])
    torch.testing.assert_close(s[ACTIONS], expected[2:5])
    assert torch.equal(s[DIM_MASK], mask)
    raw = norm.unnormalize(s[ACTIONS], "sawyer")
    np.testing.assert_allclose(raw.numpy(), ds.actions(1)[2:5], atol=1e-5)


def test_state_is_standardized_with_dataset_stats_and_padded(tmp_path):
    ds = build(tmp_path / "ds", [4, 4])
    w = ActionWindowDataset(ds, identity_normalizer(), history=1, chunk=1, include_state=True, max_state_dim=5)
    st_ = ds.meta.stats["observation.state"]
    s = w[6]  # episode 1, t=2: raw state (4, 1)
    expected = (np.array([4.0, 1.0]) - st_["mean"]) / st_["std"]
    np.testing.assert_allclose(s[STATE][:2].numpy(), expected, rtol=1e-5)
    assert s[STATE].shape == (5,) and s[STATE][2:].abs().sum() == 0


def test_split_is_by_episode_and_subsets_only_yield_their_episodes(tmp_path):
    train, val = split_episodes(10, 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == list(range(10)) and not set(train) & set(val)
    assert split_episodes(10, 0.2, seed=3) == (train, val)
    assert split_episodes(3, 0.01, seed=0)[1] and split_episodes(1, 0.5, seed=0) == ([0], [])
    ds = build(tmp_path / "ds", [3, 2, 4, 1])
    w = ActionWindowDataset(ds, identity_normalizer(), history=2, chunk=2, episodes=[2, 0])
    assert len(w) == 7
    assert {key(w[i])[0] for i in range(len(w))} == {0, 2}


def test_mixture_draws_datasets_by_weight_deterministically_and_resumes(tmp_path):
    norm = identity_normalizer()
    a = ActionWindowDataset(build(tmp_path / "a", [5, 5]), norm, history=2, chunk=2)
    b = ActionWindowDataset(build(tmp_path / "b", [3]), norm, history=2, chunk=2)
    mix = MixtureDataset([a, b], weights=[0.8, 0.2], num_samples=5000, seed=7)
    which, sample = mix.plan()
    assert abs((which == 0).mean() - 0.8) < 0.03
    # The first draws of a dataset cover it before repeating.
    assert sorted(sample[which == 1][:3].tolist()) == [0, 1, 2]
    again = MixtureDataset([a, b], weights=[0.8, 0.2], num_samples=5000, seed=7)
    assert np.array_equal(again.plan()[0], which) and np.array_equal(again.plan()[1], sample)
    draws = [(mix[i][DATASET_INDEX], key(mix[i])) for i in range(20)]
    assert draws == [(again[i][DATASET_INDEX], key(again[i])) for i in range(20)]
    mix.set_epoch(1)
    assert not np.array_equal(mix.plan()[0], which)
    # Resume at draw 12 of epoch 0.
    again.set_start(12)
    assert len(again) == 5000 - 12
    assert [(again[i][DATASET_INDEX], key(again[i])) for i in range(8)] == draws[12:]
    state = again.state_dict()
    fresh = MixtureDataset([a, b], weights=[0.8, 0.2], num_samples=5000, seed=0)
    fresh.load_state_dict(state)
    assert key(fresh[0]) == key(again[0])
    batch = next(iter(torch.utils.data.DataLoader(mix, batch_size=8, collate_fn=collate_windows)))
    assert batch[HISTORY].shape == (8, 2, D_MAX) and batch[DATASET_INDEX].shape == (8,)


def test_streaming_yields_the_same_windows_as_the_map_style_view(tmp_path):
    ds = build(tmp_path / "ds", [5, 1, 7, 3, 4])
    norm = fit_normalizer([ds], max_action_dim=D_MAX)
    mapped = ActionWindowDataset(ds, norm, history=3, chunk=4, include_state=True)
    by_key = {key(mapped[i]): mapped[i] for i in range(len(mapped))}
    stream = StreamingActionWindows(ds.root, norm, history=3, chunk=4, include_state=True, shuffle=True,
                                    shuffle_buffer=5, seed=1)
    got = list(stream)
    assert Counter(key(s) for s in got) == Counter(by_key.keys())
    for s in got:
        ref = by_key[key(s)]
        for k in (HISTORY, HISTORY_MASK, ACTIONS, ACTION_MASK, DIM_MASK, STATE):
            assert torch.equal(s[k], ref[k]), k
    # Distributed ranks partition the windows.
    shards = [list(StreamingActionWindows(ds, norm, 3, 4, rank=r, world_size=3)) for r in range(3)]
    assert sum(len(x) for x in shards) == len(mapped)
    assert Counter(key(s) for x in shards for s in x) == Counter(by_key.keys())


def test_streaming_shards_across_dataloader_workers(tmp_path):
    ds = build(tmp_path / "ds", [4, 2, 3])
    norm = identity_normalizer()
    stream = StreamingActionWindows(ds, norm, history=2, chunk=2, episodes=[0, 2])
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2, collate_fn=collate_windows)
    keys = Counter(k for b in loader for k in zip(b[EPISODE_INDEX].tolist(), b[FRAME_INDEX].tolist()))
    assert keys == Counter([(0, t) for t in range(4)] + [(2, t) for t in range(3)])


def test_vla_windows_add_frame_image_and_instruction(tmp_path):
    ds = build(tmp_path / "ds", [3, 4], cameras=("front",))
    vla = VLAWindowDataset(ds, identity_normalizer(), history=2, chunk=2)
    s = vla[3 + 2]  # episode 1, t=2
    assert key(s) == (1, 2) and s[INSTRUCTION] == "do task 1"
    img = s[IMAGE]["front"]
    assert img.dtype == np.uint8 and img.shape == (4, 4, 3) and (img == 12).all()
    batch = collate_windows([vla[i] for i in range(4)])
    assert batch[IMAGE]["front"].shape == (4, 4, 4, 3) and batch[IMAGE]["front"].dtype == torch.uint8
    assert batch[INSTRUCTION] == ["do task 0"] * 3 + ["do task 1"]
    with pytest.raises(KeyError, match="no camera"):
        VLAWindowDataset(ds, identity_normalizer(), cameras=["wrist"])


def test_collate_stacks_tensors_and_keeps_strings_as_lists(tmp_path):
    ds = build(tmp_path / "ds", [5])
    w = ActionWindowDataset(ds, identity_normalizer(), history=3, chunk=2)
    batch = collate_windows([w[i] for i in range(5)])
    assert batch[HISTORY].shape == (5, 3, D_MAX) and batch[HISTORY].dtype == torch.float32
    assert batch[HISTORY_MASK].dtype == torch.bool and batch[ACTION_MASK].shape == (5, 2)
    assert batch[FRAME_INDEX].tolist() == [0, 1, 2, 3, 4] and batch[EMBODIMENT] == ["sawyer"] * 5


def test_normalizer_without_the_embodiment_is_a_clear_error(tmp_path):
    ds = build(tmp_path / "ds", [3])
    with pytest.raises(KeyError, match="sawyer"):
        ActionWindowDataset(ds, ActionNormalizer(max_action_dim=D_MAX))
