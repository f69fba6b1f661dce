"""Batch order is a pure function of (seed, step); files are written atomically and never replaced."""
import pytest
import torch

from comfyui_dojo.training.batches import BatchSchedule, Sample
from comfyui_dojo.training.files import next_free_path, save_safetensors_new, write_new_file
from comfyui_dojo.training.protocol import Conditioning
from comfyui_dojo.training.timesteps import TimestepSampling, sample_timesteps


def mixed_samples():
    shapes = [(4, 8, 8)] * 5 + [(4, 8, 12)] * 3
    return [Sample(torch.full(s, float(i)), Conditioning(torch.zeros(1, 5, 32))) for i, s in enumerate(shapes)]


def test_batches_never_mix_buckets_and_cover_each_epoch_once():
    schedule = BatchSchedule(mixed_samples(), batch_size=2, seed=3)
    assert schedule.batches_per_epoch == 3 + 2
    seen = []
    for step in range(schedule.batches_per_epoch):
        batch = schedule.batch(step)
        assert len({tuple(l.shape) for l in batch.latents}) == 1
        seen += batch.indices
    assert sorted(seen) == list(range(8))


def test_batch_order_depends_only_on_seed_and_step():
    a, b = BatchSchedule(mixed_samples(), 2, seed=3), BatchSchedule(mixed_samples(), 2, seed=3)
    assert [a.batch(s).indices for s in range(12)] == [b.batch(s).indices for s in reversed(range(12))][::-1]
    c = BatchSchedule(mixed_samples(), 2, seed=4)
    assert [a.batch(s).indices for s in range(10)] != [c.batch(s).indices for s in range(10)]


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="empty"):
        BatchSchedule([], 2, seed=0)


@pytest.mark.parametrize("kind", list(TimestepSampling))
def test_timestep_samplers_are_seeded_and_in_range(kind):
    a = sample_timesteps(kind, 256, torch.Generator().manual_seed(1), shift=3.0)
    b = sample_timesteps(kind, 256, torch.Generator().manual_seed(1), shift=3.0)
    assert torch.equal(a, b) and a.min() > 0 and a.max() < 1


def test_shift_moves_samples_towards_noise():
    plain = sample_timesteps(TimestepSampling.SIGMOID, 4096, torch.Generator().manual_seed(1))
    shifted = sample_timesteps(TimestepSampling.SHIFT, 4096, torch.Generator().manual_seed(1), shift=3.0)
    assert shifted.mean() > plain.mean() + 0.1


def test_next_free_path_counts_past_existing_files(tmp_path):
    first = next_free_path(tmp_path, "lora", ".safetensors")
    first.write_bytes(b"x")
    second = next_free_path(tmp_path, "lora", ".safetensors")
    assert first.name == "lora_00001.safetensors" and second.name == "lora_00002.safetensors"


def test_write_never_replaces_an_existing_file(tmp_path):
    target = tmp_path / "keep.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        save_safetensors_new(target, {"a": torch.zeros(2)})
    assert target.read_bytes() == b"precious"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


def test_failed_write_leaves_no_file_under_the_final_name(tmp_path):
    target = tmp_path / "out.bin"

    def half_write(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_new_file(target, half_write)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_round_trip_with_metadata(tmp_path):
    import safetensors
    path = save_safetensors_new(tmp_path / "a.safetensors", {"w": torch.arange(4.0)}, {"steps": 10, "name": "x"})
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata() == {"steps": "10", "name": "x"}
        assert torch.equal(f.get_tensor("w"), torch.arange(4.0))
