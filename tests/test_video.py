"""LeRobot v3 video cameras: written as MP4 (AV1, H.264), located by timestamp, decoded within codec tolerance,
refused clearly when a file or a timestamp does not fit, and fed to Stage 2."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import modeling_actprior as ap
from modeling_actprior.data import load_lerobot_dataset
from modeling_actprior.data.lerobot import DatasetFormatError, Episode, write_lerobot_dataset
from modeling_actprior.data.video import VideoEncoder, VideoError, VideoFrameCache, probe_video
from modeling_actprior.data.windows import IMAGE, VLAWindowDataset

SIZE, FPS = 32, 20.0
EPISODES_META = "meta/episodes/chunk-000/file-000.parquet"


def _frames(length, seed):
    """Smooth moving gradients (what cameras see; noise would measure the codec, not the reader)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    out = [np.stack([(x * 6 + 25 * t + 30 * seed) % 256, (y * 6 + 15 * t) % 256, np.full_like(x, (40 * seed + 9 * t) % 256)],
                    -1) for t in range(length)]
    return np.asarray(out, np.uint8)


def _episodes(n=4):
    rng = np.random.default_rng(0)
    eps = []
    for e in range(n):
        length = 14 + 3 * e
        front = _frames(length, e)
        eps.append(Episode(actions=rng.normal(size=(length, 4)).astype(np.float32), states=None, task="reach the goal",
                           images={"front": front, "wrist": front[:, ::-1, ::-1].copy()}))
    return eps


def _write(root, codec="av1", size_mb=200.0, eps=None):
    return write_lerobot_dataset(str(root), eps or _episodes(), ap.get_embodiment("sawyer"), fps=FPS,
                                 camera_names=("front", "wrist"), image_size=SIZE, video_codec=codec,
                                 video_files_size_in_mb=size_mb)


@pytest.fixture(scope="module")
def av1_dataset(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("v") / "ds")


@pytest.mark.parametrize("codec", ["av1", "h264"])
def test_video_cameras_round_trip_within_codec_tolerance(tmp_path, codec):
    eps = _episodes()
    root = _write(tmp_path / "ds", codec, eps=eps)
    info = json.load(open(os.path.join(root, "meta", "info.json")))
    feature = info["features"]["observation.images.front"]
    assert feature["dtype"] == "video" and feature["info"]["video.codec"] == codec
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert probe_video(os.path.join(root, "videos/observation.images.front/chunk-000/file-000.mp4")).codec in (
        {"av1": ("libdav1d", "av1"), "h264": ("h264",)}[codec])
    meta = pq.read_table(os.path.join(root, EPISODES_META)).to_pylist()
    key = "videos/observation.images.front"
    # One file holds every episode, each located by its from_timestamp (as lerobot-record writes them).
    assert {m[f"{key}/file_index"] for m in meta} == {0}
    assert [m[f"{key}/from_timestamp"] for m in meta] == pytest.approx(
        np.cumsum([0] + [len(ep.actions) for ep in eps[:-1]]) / FPS)
    ds = load_lerobot_dataset(root)
    assert ds.meta.video_keys == ["observation.images.front", "observation.images.wrist"]
    for e, ep in enumerate(eps):
        back = ds.episode(e, images=True)
        for cam in ("front", "wrist"):
            assert back.images[cam].shape == ep.images[cam].shape
            err = np.abs(back.images[cam].astype(int) - ep.images[cam].astype(int))
            assert err.mean() < 8.0, (codec, e, cam, err.mean())  # lossy (yuv420p, sharp edges), but the right frame:
        # a frame off by one would differ by the gradient's motion on every pixel
        wrong = np.abs(back.images["front"][1:].astype(int) - ep.images["front"][:-1].astype(int)).mean()
        assert wrong > 2 * np.abs(back.images["front"].astype(int) - ep.images["front"].astype(int)).mean()


def test_episodes_share_files_and_roll_over_to_new_ones(tmp_path):
    root = _write(tmp_path / "ds", "h264", size_mb=0.001)
    files = sorted(os.listdir(os.path.join(root, "videos", "observation.images.front", "chunk-000")))
    assert len(files) >= 2
    meta = pq.read_table(os.path.join(root, EPISODES_META)).to_pylist()
    assert len({m["videos/observation.images.front/file_index"] for m in meta}) == len(files)
    eps = _episodes()
    ds = load_lerobot_dataset(root)
    for e in range(len(eps)):
        assert np.abs(ds.episode(e, images=True).images["front"].astype(int) - eps[e].images["front"]).mean() < 8.0


def test_an_episode_span_is_decoded_once_per_process(av1_dataset):
    ds = load_lerobot_dataset(av1_dataset)
    cache = VideoFrameCache()
    path, start, end = ds.meta.video_location("observation.images.front", 1)
    times = start + np.arange(ds.meta.episode_lengths[1]) / FPS
    frames = [cache.frame(path, start, end, t) for t in times[::-1]]
    assert cache.decoded_spans == 1 and len(frames) == len(times)


def test_stage2_windows_read_video_frames(av1_dataset):
    ds = load_lerobot_dataset(av1_dataset)
    windows = VLAWindowDataset(ds, _normalizer(ds), history=3, chunk=4)
    sample = windows[5]
    assert set(sample[IMAGE]) == {"front", "wrist"} and sample[IMAGE]["front"].shape == (SIZE, SIZE, 3)


def _normalizer(ds):
    from modeling_actprior.data import fit_normalizer

    return fit_normalizer([ds], 32)


def _edit_episode_meta(root, column, episode, value):
    path = os.path.join(root, EPISODES_META)
    rows = pq.read_table(path).to_pylist()
    rows[episode][column] = value
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_a_missing_video_file_is_named_before_training(tmp_path):
    root = _write(tmp_path / "ds", "h264")
    os.remove(os.path.join(root, "videos/observation.images.wrist/chunk-000/file-000.mp4"))
    with pytest.raises(VideoError, match=r"file-000\.mp4 \(observation\.images\.wrist, episode 0\) is missing"):
        load_lerobot_dataset(root).validate_videos()


def test_a_truncated_video_file_is_refused(tmp_path):
    root = _write(tmp_path / "ds", "av1")
    path = os.path.join(root, "videos/observation.images.front/chunk-000/file-000.mp4")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    ds = load_lerobot_dataset(root)  # actions-only use needs no video
    with pytest.raises(VideoError, match="cannot be decoded.*truncated or damaged"):
        VLAWindowDataset(ds, _normalizer(ds), history=3, chunk=4)  # Stage 2 checks before training


def test_a_file_that_is_not_a_video_is_refused(tmp_path):
    root = _write(tmp_path / "ds", "h264")
    open(os.path.join(root, "videos/observation.images.front/chunk-000/file-000.mp4"), "wb").write(b"\0" * 4096)
    with pytest.raises(VideoError, match="cannot be decoded"):
        load_lerobot_dataset(root).validate_videos()


def test_timestamps_past_the_end_of_the_video_are_refused(tmp_path):
    root = _write(tmp_path / "ds", "h264")
    _edit_episode_meta(root, "videos/observation.images.front/from_timestamp", 3, 30.0)
    with pytest.raises(DatasetFormatError, match=r"episode 3.*frames run from 30\.0000 s.*truncated or the metadata"):
        load_lerobot_dataset(root).validate_videos()


def test_a_timestamp_between_frames_is_refused_with_the_tolerance(tmp_path):
    root = _write(tmp_path / "ds", "h264")
    meta = pq.read_table(os.path.join(root, EPISODES_META)).to_pylist()
    key = "videos/observation.images.front/from_timestamp"
    _edit_episode_meta(root, key, 1, meta[1][key] + 0.4 / FPS)  # 20 ms off the frame grid
    ds = load_lerobot_dataset(root)
    with pytest.raises(VideoError, match=r"observation\.images\.front, episode 1, frame 0\): no frame within 0\.0001 s"):
        ds.image("observation.images.front", int(ds.meta.episode_from[1]))
    loose = load_lerobot_dataset(root, tolerance_s=0.5 / FPS)  # a looser tolerance accepts it
    assert loose.image("observation.images.front", int(ds.meta.episode_from[1])).shape == (SIZE, SIZE, 3)


def test_generate_writes_mp4_that_reads_back(tmp_path):
    pytest.importorskip("metaworld")
    from modeling_actprior.sim.generate import generate

    root = generate("metaworld", str(tmp_path / "mw"), episodes=1, tasks=["reach-v3"], image_size=32, video="av1",
                    progress=False)[0]
    info = json.load(open(os.path.join(root, "meta", "info.json")))
    assert info["features"]["observation.images.front"]["dtype"] == "video"
    assert info["actprior"]["generator"]["video"] == "av1" and "--video av1" in info["actprior"]["generator"]["command"]
    ds = load_lerobot_dataset(root)
    assert ds.image("observation.images.front", 3).shape == (32, 32, 3)


def test_rollout_videos_are_mp4(tmp_path):
    from modeling_actprior.rollout import write_video

    frames = _frames(12, 0)
    path = write_video(list(frames), str(tmp_path / "ep.mp4"), fps=FPS)
    assert path.endswith(".mp4")
    probe = probe_video(path)
    assert (probe.width, probe.height) == (SIZE, SIZE) and probe.duration_s == pytest.approx(12 / FPS)
    with pytest.raises(ValueError, match="even width and height"):
        VideoEncoder(str(tmp_path / "odd.mp4"), FPS, 5, 5)


def test_stage2_trains_on_a_video_dataset(av1_dataset, tmp_path):

    from modeling_actprior.training import stage2 as train_stage2

    ds = load_lerobot_dataset(av1_dataset)
    prior = ap.ActionPriorModel(ap.ActionPriorConfig.from_preset("tiny", chunk_size=4, history_length=3))
    prior.normalizer = _normalizer(ds)
    prior.save_pretrained(tmp_path / "prior")
    result = train_stage2.main(["--dataset", av1_dataset, "--prior", str(tmp_path / "prior"), "--output_dir",
                                str(tmp_path / "run"), "--max_steps", "2", "--batch_size", "4", "--camera", "wrist",
                                "--no_progress", "--eval_every", "0", "--eval_windows", "4", "--log_every", "1"])
    assert result["step"] == 2 and (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_data_loader_workers_decode_after_the_parent_has(av1_dataset):
    """DataLoader workers are forked: a frame conversion the parent ran on a threaded swscale context once made every
    worker's first decode wait forever. The parent decodes first here, then a forked process must decode too."""
    import faulthandler

    from modeling_actprior.data.video import decode_span

    ds = load_lerobot_dataset(av1_dataset)
    key = ds.meta.camera_keys[0]
    decode_span(*ds.meta.video_location(key, 0))
    pid = os.fork()
    if pid == 0:  # the child decodes, or its watchdog ends it (exit code 1) instead of hanging the suite
        code = 2
        try:
            faulthandler.dump_traceback_later(60, exit=True)
            decode_span(*ds.meta.video_location(key, 1))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked decoder hung (its watchdog stopped it) or failed"
