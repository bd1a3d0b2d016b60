"""LeRobot v3.0 storage: layout, round trip, foreign datasets, validation, atomic writes."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modeling_actprior.action_space import (
    EMBODIMENT_REGISTRY,
    EmbodimentSpec,
    EmbodimentStats,
    UnknownEmbodimentError,
    get_embodiment,
)
from modeling_actprior.data import (
    DatasetFormatError,
    Episode,
    LeRobotDatasetMeta,
    LeRobotDatasetWriter,
    load_lerobot_dataset,
    write_lerobot_dataset,
)

STAT_KEYS = {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}


@pytest.fixture(autouse=True)
def _restore_registry():
    saved = dict(EMBODIMENT_REGISTRY)
    yield
    EMBODIMENT_REGISTRY.clear()
    EMBODIMENT_REGISTRY.update(saved)


def make_episodes(seed=0, lengths=(5, 8, 3), action_dim=4, state_dim=3, cameras=(), size=8):
    rng = np.random.default_rng(seed)
    eps = []
    for i, t in enumerate(lengths):
        images = {c: rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8) for c in cameras} or None
        eps.append(Episode(actions=rng.normal(size=(t, action_dim)).astype(np.float32),
                           states=rng.normal(size=(t, state_dim)).astype(np.float32),
                           task=f"task {i % 2}", images=images, success=bool(i % 2 == 0)))
    return eps


def load(root, tmp_path, **kw):
    return load_lerobot_dataset(root, cache_dir=str(tmp_path / "hf_cache"), **kw)


def write_default(tmp_path, name="ds", **kw):
    eps = make_episodes(**{k: kw.pop(k) for k in ("seed", "lengths", "cameras") if k in kw})
    root = write_lerobot_dataset(tmp_path / name, eps, get_embodiment("sawyer"), fps=10,
                                 camera_names=[c for c in (eps[0].images or {})], **kw)
    return root, eps


def rewrite_data(root, fn):
    """Apply ``fn`` to the pandas frame of data/chunk-000/file-000.parquet and write it back."""
    path = os.path.join(root, "data/chunk-000/file-000.parquet")
    table = pq.read_table(path)
    df = table.to_pandas()
    fn(df)
    pq.write_table(pa.Table.from_pandas(df, schema=table.schema, preserve_index=False), path)
    return path


# ------------------------------------------------------------------------------------------- layout
def test_layout_info_stats_tasks_and_episodes_follow_lerobot_v3(tmp_path):
    import datasets

    root, _eps = write_default(tmp_path, cameras=("front",), provenance={"sim": "unit-test"})
    with open(os.path.join(root, "meta/info.json")) as f:
        info = json.load(f)
    for key in ("codebase_version", "robot_type", "fps", "total_episodes", "total_frames", "total_tasks",
                "chunks_size", "data_files_size_in_mb", "video_files_size_in_mb", "splits", "data_path",
                "video_path", "features"):
        assert key in info, key
    assert info["codebase_version"] == "v3.0"
    assert info["robot_type"] == "sawyer"
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] is None
    assert info["total_episodes"] == 3 and info["total_frames"] == 16 and info["total_tasks"] == 2
    assert info["splits"] == {"train": "0:3"}
    feats = info["features"]
    assert feats["action"] == {"dtype": "float32", "shape": [4], "names": ["x", "y", "z", "gripper"]}
    assert feats["observation.state"]["shape"] == [3]
    assert feats["observation.images.front"]["dtype"] == "image"
    assert feats["observation.images.front"]["shape"] == [8, 8, 3]
    for key in ("episode_index", "frame_index", "index", "timestamp", "task_index"):
        assert feats[key]["shape"] == [1]
    assert info["actprior"]["embodiment"] == get_embodiment("sawyer").to_dict()
    assert info["actprior"]["success"] == [True, False, True]
    assert info["actprior"]["generator"] == {"sim": "unit-test"}

    with open(os.path.join(root, "meta/stats.json")) as f:
        stats = json.load(f)
    for key in feats:
        assert set(stats[key]) == STAT_KEYS, key
    assert len(stats["action"]["q01"]) == 4 and stats["action"]["count"] == [16]
    img = np.asarray(stats["observation.images.front"]["mean"])
    assert img.shape == (3, 1, 1) and ((img >= 0) & (img <= 1)).all()

    cache = str(tmp_path / "hf_cache")
    tasks = datasets.load_dataset("parquet", data_files=os.path.join(root, "meta/tasks.parquet"),
                                  split="train", cache_dir=cache)
    assert dict(zip(tasks["task"], tasks["task_index"])) == {"task 0": 0, "task 1": 1}
    episodes = datasets.load_dataset("parquet", data_files=os.path.join(root, "meta/episodes/chunk-000/file-000.parquet"),
                                     split="train", cache_dir=cache)
    for col in ("episode_index", "tasks", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
                "dataset_to_index", "meta/episodes/chunk_index", "meta/episodes/file_index",
                "stats/action/mean", "stats/action/q99"):
        assert col in episodes.column_names, col
    assert episodes["length"] == [5, 8, 3]
    assert episodes["dataset_from_index"] == [0, 5, 13] and episodes["dataset_to_index"] == [5, 13, 16]
    assert episodes["tasks"] == [["task 0"], ["task 1"], ["task 0"]]
    data = datasets.load_dataset("parquet", data_files=os.path.join(root, "data/chunk-000/file-000.parquet"),
                                 split="train", cache_dir=cache)
    assert isinstance(data.features["observation.images.front"], datasets.Image)
    assert data["index"] == list(range(16))
    assert data["frame_index"][:6] == [0, 1, 2, 3, 4, 0]
    np.testing.assert_allclose(data["timestamp"][:3], [0.0, 0.1, 0.2], rtol=1e-6)
    # One parquet row group per episode, like LeRobot.
    assert pq.ParquetFile(os.path.join(root, "data/chunk-000/file-000.parquet")).metadata.num_row_groups == 3


def test_round_trip_gives_identical_actions_states_tasks_images(tmp_path):
    root, eps = write_default(tmp_path, cameras=("front", "wrist"))
    ds = load(root, tmp_path)
    assert ds.num_episodes == 3 and ds.num_frames == 16
    assert ds.embodiment == get_embodiment("sawyer")
    assert ds.meta.camera_keys == ["observation.images.front", "observation.images.wrist"]
    for i, ep in enumerate(eps):
        back = ds.episode(i, images=True)
        np.testing.assert_array_equal(back.actions, ep.actions)
        np.testing.assert_array_equal(back.states, ep.states)
        assert back.task == ep.task and back.success == ep.success
        for cam in ("front", "wrist"):
            np.testing.assert_array_equal(back.images[cam], ep.images[cam])


def test_action_stats_are_measured_on_all_frames(tmp_path):
    root, eps = write_default(tmp_path)
    meta = LeRobotDatasetMeta(root)
    expected = EmbodimentStats.from_actions(np.concatenate([e.actions for e in eps]))
    got = meta.action_stats()
    for key in ("mean", "std", "q01", "q99", "min", "max"):
        np.testing.assert_allclose(getattr(got, key), getattr(expected, key), rtol=1e-6, atol=1e-7)
    assert got.count == 16


def test_data_files_roll_over_into_new_files_and_chunks(tmp_path):
    lengths = (4, 6, 5, 3, 7)
    root, eps = write_default(tmp_path, lengths=lengths, data_files_size_in_mb=1e-6, chunks_size=2)
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(os.path.join(root, "data"))
                   for f in fs)
    assert files == ["data/chunk-000/file-000.parquet", "data/chunk-000/file-001.parquet",
                     "data/chunk-001/file-000.parquet", "data/chunk-001/file-001.parquet",
                     "data/chunk-002/file-000.parquet"]
    ds = load(root, tmp_path)
    assert ds.meta.episodes["data/chunk_index"] == [0, 0, 1, 1, 2]
    for i, ep in enumerate(eps):
        np.testing.assert_array_equal(ds.actions(i), ep.actions)


def test_writer_rejects_invalid_episodes_naming_the_episode(tmp_path):
    spec = get_embodiment("sawyer")
    good = make_episodes(lengths=(3,))[0]
    w = LeRobotDatasetWriter(tmp_path / "ds", spec, fps=10, camera_names=["front"], image_size=8)
    bad_actions = good.actions.copy()
    bad_actions[1, 2] = np.nan
    img = np.zeros((3, 8, 8, 3), np.uint8)
    cases = [
        (Episode(bad_actions, good.states, "t", {"front": img}), "frame 1, dimension 2"),
        (Episode(good.actions[:, :3], good.states, "t", {"front": img}), "(T, 4)"),
        (Episode(good.actions[:0], good.states[:0], "t", {"front": img[:0]}), "T=0"),
        (Episode(good.actions, good.states, "t", {"front": img.astype(np.float32)}), "uint8"),
        (Episode(good.actions, good.states, "t", {"front": np.zeros((3, 6, 6, 3), np.uint8)}), "image_size"),
        (Episode(good.actions, good.states, "t", None), "camera_names"),
        (Episode(good.actions, good.states, "", {"front": img}), "instruction"),
    ]
    for ep, msg in cases:
        with pytest.raises(ValueError, match="Episode 0") as err:
            w.add_episode(ep)
        assert msg in str(err.value)
    assert w.add_episode(Episode(good.actions, good.states, "t", {"front": img})) == 0
    with pytest.raises(ValueError, match="width 5"):
        w.add_episode(Episode(good.actions, np.zeros((3, 5), np.float32), "t", {"front": img}))
    w.finalize()
    assert load(tmp_path / "ds", tmp_path).num_episodes == 1


def test_existing_dataset_is_replaced_only_with_overwrite(tmp_path):
    root, _ = write_default(tmp_path, lengths=(3, 3))
    with pytest.raises(FileExistsError):
        write_default(tmp_path, lengths=(4,))
    write_default(tmp_path, lengths=(4,), overwrite=True)
    assert LeRobotDatasetMeta(root).num_frames == 4
    assert sorted(os.listdir(tmp_path)) == ["ds"]


def test_interrupted_writer_leaves_no_dataset_folder(tmp_path):
    spec = get_embodiment("sawyer")
    with pytest.raises(RuntimeError, match="simulator crashed"), \
            LeRobotDatasetWriter(tmp_path / "ds", spec, fps=10) as w:
        for ep in make_episodes(lengths=(3, 4)):
            w.add_episode(ep)
        raise RuntimeError("simulator crashed")
    assert os.listdir(tmp_path) == []
    # An interrupted overwrite keeps the old dataset untouched.
    root, _ = write_default(tmp_path, lengths=(2, 2))
    with pytest.raises(RuntimeError), LeRobotDatasetWriter(root, spec, fps=10, overwrite=True) as w:
        w.add_episode(make_episodes(lengths=(7,))[0])
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == ["ds"]
    assert LeRobotDatasetMeta(root).num_frames == 4


# ---------------------------------------------------------------------------------- foreign datasets
def write_lerobot_style_folder(root, robot_type="so100", names=None, lengths=(4, 6), with_stats=True):
    """A dataset laid out the way LeRobot writes it: no actprior block, names as dicts, list columns."""
    rng = np.random.default_rng(1)
    names = {"motors": ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]} \
        if names is None else names
    n = sum(lengths)
    actions = rng.normal(size=(n, 6)).astype(np.float32)
    states = rng.normal(size=(n, 6)).astype(np.float32)
    os.makedirs(os.path.join(root, "meta/episodes/chunk-000"))
    os.makedirs(os.path.join(root, "data/chunk-000"))
    info = {
        "codebase_version": "v3.0", "robot_type": robot_type, "total_episodes": len(lengths), "total_frames": n,
        "total_tasks": 1, "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 500,
        "fps": 30, "splits": {"train": f"0:{len(lengths)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": {
            "action": {"dtype": "float32", "shape": [6], "names": names},
            "observation.state": {"dtype": "float32", "shape": [6], "names": names},
            "observation.images.laptop": {"dtype": "video", "shape": [480, 640, 3],
                                          "names": ["height", "width", "channels"]},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        },
    }
    with open(os.path.join(root, "meta/info.json"), "w") as f:
        json.dump(info, f)
    if with_stats:
        def st(x):
            return {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(),
                    "std": x.std(0).tolist(), "count": [len(x)],
                    **{f"q{int(q * 100):02d}": np.quantile(x, q, axis=0).tolist() for q in (.01, .1, .5, .9, .99)}}
        with open(os.path.join(root, "meta/stats.json"), "w") as f:
            json.dump({"action": st(actions), "observation.state": st(states)}, f)
    import pandas as pd

    pd.DataFrame({"task_index": [0]}, index=pd.Index(["Grab the cube"], name="task")).to_parquet(
        os.path.join(root, "meta/tasks.parquet"))
    starts = np.concatenate([[0], np.cumsum(lengths)])
    pq.write_table(pa.table({
        "episode_index": list(range(len(lengths))), "tasks": [["Grab the cube"]] * len(lengths),
        "length": list(lengths), "data/chunk_index": [0] * len(lengths), "data/file_index": [0] * len(lengths),
        "dataset_from_index": starts[:-1].tolist(), "dataset_to_index": starts[1:].tolist(),
        "videos/observation.images.laptop/chunk_index": [0] * len(lengths),
        "meta/episodes/chunk_index": [0] * len(lengths), "meta/episodes/file_index": [0] * len(lengths),
    }), os.path.join(root, "meta/episodes/chunk-000/file-000.parquet"))
    frame = np.concatenate([np.arange(t) for t in lengths])
    pq.write_table(pa.table({
        "action": pa.array(actions.tolist(), pa.list_(pa.float32())),
        "observation.state": pa.array(states.tolist(), pa.list_(pa.float32())),
        "timestamp": pa.array((frame / 30).astype(np.float32)),
        "frame_index": pa.array(frame),
        "episode_index": pa.array(np.repeat(np.arange(len(lengths)), lengths)),
        "index": pa.array(np.arange(n)),
        "task_index": pa.array(np.zeros(n, np.int64)),
    }), os.path.join(root, "data/chunk-000/file-000.parquet"))
    return str(root), actions


def test_lerobot_folder_of_unknown_robot_loads_and_registers_its_embodiment(tmp_path):
    assert "so100" not in EMBODIMENT_REGISTRY
    root, actions = write_lerobot_style_folder(tmp_path / "so100_pick")
    ds = load(root, tmp_path)
    spec = get_embodiment("so100")
    assert ds.embodiment is spec
    assert spec.action_dim == 6 and spec.action_names[0] == "shoulder_pan" and spec.fps == 30
    np.testing.assert_allclose(ds.actions(1), actions[4:10])
    assert ds.task(0) == "Grab the cube"
    assert ds.meta.video_keys == ["observation.images.laptop"] and ds.meta.success is None
    # Loading it again is harmless: the same spec is already registered.
    assert load(root, tmp_path).embodiment is spec


def test_unknown_robot_without_description_raises_naming_info_json(tmp_path):
    root, _ = write_lerobot_style_folder(tmp_path / "mystery", robot_type="mystery_arm", names=None)
    info_path = os.path.join(root, "meta/info.json")
    with open(info_path) as f:
        info = json.load(f)
    info["features"]["action"]["names"] = None
    with open(info_path, "w") as f:
        json.dump(info, f)
    with pytest.raises(UnknownEmbodimentError, match="mystery_arm") as err:
        load(root, tmp_path)
    assert info_path in str(err.value) and "names" in str(err.value)
    assert "mystery_arm" not in EMBODIMENT_REGISTRY


def test_known_robot_name_with_other_action_width_is_refused(tmp_path):
    root, _ = write_lerobot_style_folder(tmp_path / "x", robot_type="panda")  # panda is 7-D, data is 6-D
    with pytest.raises(DatasetFormatError, match="action_dim=7"):
        load(root, tmp_path)


def test_actprior_block_registers_embodiment_with_its_metadata(tmp_path):
    spec = EmbodimentSpec("toy_humanoid", 3, ("hip", "knee", "ankle"), "joint_position", 50.0, "test robot")
    eps = [Episode(np.zeros((4, 3), np.float32) + i, np.zeros((4, 1), np.float32), "walk") for i in range(2)]
    root = write_lerobot_dataset(tmp_path / "h", eps, spec, fps=50)
    EMBODIMENT_REGISTRY.pop("toy_humanoid", None)
    assert load(root, tmp_path).embodiment == spec and get_embodiment("toy_humanoid") == spec


# -------------------------------------------------------------------------------------- validation
def test_missing_stats_raise_naming_the_file(tmp_path):
    root, _ = write_default(tmp_path)
    stats_path = os.path.join(root, "meta/stats.json")
    with open(stats_path) as f:
        stats = json.load(f)
    del stats["action"]
    with open(stats_path, "w") as f:
        json.dump(stats, f)
    with pytest.raises(DatasetFormatError, match="'action'") as err:
        load(root, tmp_path)
    assert stats_path in str(err.value)
    os.remove(stats_path)
    with pytest.raises(DatasetFormatError, match="missing") as err:
        load(root, tmp_path)
    assert stats_path in str(err.value)


def test_nan_action_in_data_raises_naming_file_episode_and_frame(tmp_path):
    root, _ = write_default(tmp_path)

    def poison(df):
        a = np.stack(df["action"].to_numpy())
        a[5 + 2, 1] = np.nan  # episode 1, frame 2
        df["action"] = list(a)

    path = rewrite_data(root, poison)
    with pytest.raises(DatasetFormatError, match="episode 1, frame 2: action contains NaN") as err:
        load(root, tmp_path)
    assert path in str(err.value)


def test_frame_index_gap_raises_naming_file_and_episode(tmp_path):
    root, _ = write_default(tmp_path)

    def gap(df):
        df.loc[13 + 1:, "frame_index"] += 1  # episode 2: 0, 2, 3

    path = rewrite_data(root, gap)
    with pytest.raises(DatasetFormatError, match="episode 2: frame_index jumps to 2 where 1 was expected") as err:
        load(root, tmp_path)
    assert path in str(err.value)


def test_episode_metadata_disagreeing_with_data_raises(tmp_path):
    root, _ = write_default(tmp_path)

    def relabel(df):
        df.loc[4, "episode_index"] = 1  # last frame of episode 0 claims to be episode 1

    path = rewrite_data(root, relabel)
    with pytest.raises(DatasetFormatError, match="episode 0: row 4") as err:
        load(root, tmp_path)
    assert path in str(err.value)
    # Metadata listing more episodes than info.json announces.
    root2, _ = write_default(tmp_path, name="ds2")
    info_path = os.path.join(root2, "meta/info.json")
    with open(info_path) as f:
        info = json.load(f)
    info["total_episodes"] = 2
    with open(info_path, "w") as f:
        json.dump(info, f)
    with pytest.raises(DatasetFormatError, match="total_episodes=2"):
        load(root2, tmp_path)


@pytest.mark.parametrize("template", ["../outside/file-{file_index:03d}.parquet",
                                      "data/../../x-{chunk_index}.parquet", "/etc/passwd"])
def test_path_templates_escaping_the_dataset_root_are_refused(tmp_path, template):
    root, _ = write_default(tmp_path)
    info_path = os.path.join(root, "meta/info.json")
    with open(info_path) as f:
        info = json.load(f)
    info["data_path"] = template
    with open(info_path, "w") as f:
        json.dump(info, f)
    with pytest.raises(DatasetFormatError, match="outside the dataset folder") as err:
        load(root, tmp_path)
    assert info_path in str(err.value)
