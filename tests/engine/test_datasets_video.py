import pytest

from comfyui_dojo.training.datasets import (BucketConfig, ClipConfig, ClipMode, DatasetConfig, DatasetError,
                                            DatasetWarning, FrameRule, clip_starts, probe_video, resample,
                                            scan_folder)
from comfyui_dojo.training.protocol import Family
from datasets_media import grey_level, write_gif, write_image, write_video

SMALL = BucketConfig(resolution=64, step=16, min_side=16, max_side=128)


def clips(**kwargs) -> DatasetConfig:
    return DatasetConfig(buckets=SMALL, clips=ClipConfig(**kwargs))


@pytest.mark.parametrize("name", ["a.mp4", "b.webm", "c.mov", "d.mkv"])
def test_video_containers_decode_to_clips(tmp_path, name):
    write_video(tmp_path / name, frames=8)
    (item,) = scan_folder(tmp_path, clips(frames=5)).items
    frames = item.load()
    h, w, t = item.bucket
    assert frames.shape == (5, 3, h, w) and t == 5
    levels = [grey_level(f) for f in frames]
    assert levels == sorted(levels) and levels[-1] - levels[0] > 60  # frames 0..4 in order


def test_animated_gif_is_a_clip_when_clips_are_wanted(tmp_path):
    write_gif(tmp_path / "a.gif", frames=5)
    (item,) = scan_folder(tmp_path, clips(frames=5)).items
    frames = item.load()
    assert frames.shape[0] == 5
    reds = [float(f[0].mean()) for f in frames]
    assert reds == sorted(reds) and reds[-1] > reds[0]


def test_hunyuan_video_requires_4k_plus_1_frames():
    rule = FrameRule.for_family(Family.HUNYUAN_VIDEO)
    assert rule is FrameRule.FOUR_K_PLUS_1
    with pytest.raises(DatasetError, match=r"4k\+1.*29 or 33"):
        ClipConfig(frames=32, frame_rule=rule)
    assert ClipConfig(frames=33, frame_rule=rule).frames == 33
    assert ClipConfig(frames=32, frame_rule=FrameRule.for_family(Family.FLUX)).frames == 32


def test_clip_start_modes():
    assert clip_starts(20, ClipConfig(frames=5, mode=ClipMode.HEAD)) == [0]
    assert clip_starts(20, ClipConfig(frames=5, mode=ClipMode.UNIFORM, clips_per_video=3)) == [0, 8, 15]
    assert clip_starts(20, ClipConfig(frames=5, mode=ClipMode.SLIDING, stride=4)) == [0, 4, 8, 12]
    assert clip_starts(20, ClipConfig(frames=5, mode=ClipMode.SLIDING)) == [0, 5, 10, 15]  # stride defaults to length
    assert clip_starts(4, ClipConfig(frames=5)) == []


def test_sliding_window_items_take_the_right_frames(tmp_path):
    write_video(tmp_path / "v.mp4", frames=12)
    dataset = scan_folder(tmp_path, clips(frames=5, mode="sliding", stride=3))
    assert [item.frame_indices for item in dataset.items] == [(0, 1, 2, 3, 4), (3, 4, 5, 6, 7), (6, 7, 8, 9, 10)]
    first_of_second = grey_level(dataset.items[1].load()[0])
    assert abs(first_of_second - 60) < 12  # frame 3 is grey level 60


def test_target_fps_resamples_by_timestamps(tmp_path):
    path = write_video(tmp_path / "v.mp4", frames=12, fps=24)
    info = probe_video(path)
    assert info.frame_count == 12 and info.size == (48, 64)
    assert resample(info.timestamps, 12) == [0, 2, 4, 6, 8, 10]
    assert resample(info.timestamps, None) == list(range(12))
    assert resample([0.0, 0.1, 0.2], 30) == [0, 0, 1, 1, 1, 2, 2, 2]  # a higher rate repeats frames
    (item,) = scan_folder(tmp_path, clips(frames=5, fps=12)).items
    assert item.frame_indices == (0, 2, 4, 6, 8)


def test_short_clip_is_skipped_with_reason(tmp_path):
    write_video(tmp_path / "short.mp4", frames=3)
    write_video(tmp_path / "long.mp4", frames=6)
    with pytest.warns(DatasetWarning, match="short.mp4"):
        dataset = scan_folder(tmp_path, clips(frames=5))
    assert [item.path.name for item in dataset.items] == ["long.mp4"]
    ((path, reason),) = dataset.skipped
    assert path.name == "short.mp4" and "3 frames" in reason and "5" in reason


def test_unreadable_video_is_skipped_with_warning(tmp_path):
    write_video(tmp_path / "ok.mp4", frames=6)
    (tmp_path / "broken.mp4").write_bytes(b"\0" * 2000)
    with pytest.warns(DatasetWarning, match="broken.mp4"):
        dataset = scan_folder(tmp_path, clips(frames=5))
    assert [p.name for p, _ in dataset.skipped] == ["broken.mp4"]
    assert "unreadable video" in dataset.skipped[0][1]


def test_images_and_clips_mix_and_batches_never_mix_frame_counts(tmp_path):
    write_video(tmp_path / "v1.mp4", frames=6, size=(64, 64))
    write_video(tmp_path / "v2.mp4", frames=6, size=(64, 64))
    write_image(tmp_path / "still1.png", size=(64, 64))
    write_image(tmp_path / "still2.png", size=(64, 64))
    dataset = scan_folder(tmp_path, clips(frames=5))
    assert sorted(item.bucket[2] for item in dataset.items) == [1, 1, 5, 5]
    assert {item.bucket[:2] for item in dataset.items} == {(64, 64)}
    still = next(item for item in dataset.items if not item.is_clip)
    assert still.load().shape == (1, 3, 64, 64)
    for batch in dataset.batches(batch_size=4):
        assert len({item.bucket for item in batch}) == 1


def test_video_in_a_still_dataset_is_skipped_with_advice(tmp_path):
    write_image(tmp_path / "a.png")
    write_video(tmp_path / "v.mp4", frames=3)
    with pytest.warns(DatasetWarning, match="clip frames"):
        dataset = scan_folder(tmp_path, DatasetConfig(buckets=SMALL))
    assert [p.name for p, _ in dataset.skipped] == ["v.mp4"]
