"""HunyuanVideo LoRA on a mix of images and video clips (issue 6), block swap through the trainer, and
the Train LoRA node's auto defaults for HunyuanVideo. ComfyUI's own HunyuanVideo network, tiny and
random (inprocess_models.tiny_hunyuan_video_patcher)."""
import pytest
import torch

import family_checks as checks
from family_checks import outputs
from inprocess_models import tiny_hunyuan_video_patcher
from test_lora_training import cond_for

pytestmark = pytest.mark.integration

# Latents of HunyuanVideo's 4x temporal VAE: 1 frame -> T=1, 5 frames -> T=2, 9 frames -> T=3; plus a
# second image size. (latent shape, how many)
MIX = [((16, 1, 8, 8), 3), ((16, 1, 8, 12), 2), ((16, 2, 8, 8), 3), ((16, 3, 8, 8), 3)]


@pytest.fixture(scope="module")
def dojo(comfy):
    return checks.pack(comfy)


def mixed_dataset(dojo, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples, captions = [], []
    for shape, count in MIX:
        for i in range(count):
            c, t, h, w = shape
            y, x = torch.linspace(-1, 1, h), torch.linspace(-1, 1, w)
            frame = torch.sin(3 * x + i)[None, :] * torch.cos(2 * y - i)[:, None]
            time = torch.cos(torch.arange(t, dtype=torch.float32) + i)[:, None, None]
            latent = (frame[None] * (1 + 0.5 * time))[None] * (1 + torch.arange(c) / c).reshape(c, 1, 1, 1) * 2
            samples.append(dojo.batches.Sample(latent.contiguous(), cond_for(dojo, "hunyuan_video", 1, g)))
            captions.append(f"{'clip' if t > 1 else 'image'} {i}")
    return dojo.encoded.EncodedDataset(samples, captions)


def job(dojo, steps, lr=1e-2, **kw):
    return dojo.lora_training.LoraJob(
        adapter=dojo.adapters.AdapterConfig(rank=4, alpha=4),
        targets=dojo.protocol.TargetPreset.ALL_LINEAR,
        train=dojo.loop.TrainConfig(steps=steps, learning_rate=lr, precision=dojo.loop.Precision.FP32, seed=1),
        batch_size=2, **kw)


def test_lora_on_images_and_clips_learns_in_shape_buckets(comfy, dojo, monkeypatch):
    patcher, data = tiny_hunyuan_video_patcher(), mixed_dataset(dojo)
    batches, predicted = [], []
    schedule_cls = dojo.lora_training.BatchSchedule

    class RecordingSchedule(schedule_cls):
        def batch(self, step):
            batch = super().batch(step)
            batches.append([tuple(self.samples[i].latent.shape) for i in batch.indices])
            return batch

    predict = dojo.comfy_model.ComfyDenoisingModel.predict

    def recording_predict(self, noisy, t, cond):
        if torch.is_grad_enabled():  # training steps (the checks' losses and outputs run in inference mode)
            predicted.append(tuple(noisy.shape))
        return predict(self, noisy, t, cond)

    monkeypatch.setattr(dojo.lora_training, "BatchSchedule", RecordingSchedule)
    monkeypatch.setattr(dojo.comfy_model.ComfyDenoisingModel, "predict", recording_predict)
    # Learns, and the base model's outputs and weights are bit-identical after training.
    result = checks.check_learns(dojo, patcher, data, job(dojo, steps=40, gradient_checkpointing=True))
    monkeypatch.undo()

    # Batches never mix frame counts or sizes; batches of 2 happen; every shape was trained on.
    assert len(batches) == 40 and all(len(set(shapes)) == 1 for shapes in batches)
    assert any(len(shapes) == 2 for shapes in batches)
    assert {shapes[0] for shapes in batches} == {shape for shape, _ in MIX}
    assert [p[0] for p in predicted] == [len(b) for b in batches]
    assert [p[1:] for p in predicted] == [b[0] for b in batches]
    # Strength 0 through ComfyUI's LoRA path is exactly the base model, for images and clips; the saved
    # file loads in ComfyUI's LoraLoaderModelOnly with every key and changes every shape's output.
    checks.check_strength_zero(dojo, patcher, data, result.lora)
    checks.check_loraloader(comfy, dojo, patcher, data, result.lora, "tests/hunyuan_video_checks")


def test_gradients_match_the_float64_reference(comfy, dojo):
    """One step through Dojo's training region (copy-on-write protection; checkpointing on and off) gives
    the gradients of the out-of-place float64 reference, block by block."""
    patcher = tiny_hunyuan_video_patcher()
    data = mixed_dataset(dojo)
    small = dojo.encoded.EncodedDataset([s for s in data.samples if s.latent.shape[1] > 1][:2], ["a", "b"])
    errors = checks.check_gradients(dojo, patcher, small)
    assert {b for b in errors[True]} >= {"double_blocks.0", "single_blocks.0"}


@pytest.mark.parametrize("checkpointing", [True, False])
def test_block_swap_trains_identically_and_restores_the_model(comfy, dojo, checkpointing):
    data, patcher = mixed_dataset(dojo), tiny_hunyuan_video_patcher()
    base = outputs(dojo, patcher, data)
    # (The first run also turns the loader's inference tensors into normal ones, once, as any run does.)
    plain = dojo.lora_training.train_lora(patcher, data, job(dojo, steps=4, gradient_checkpointing=checkpointing))
    net = patcher.model.diffusion_model
    tensors = {n: (t, t.data_ptr(), t.device) for n, t in list(net.named_parameters()) + list(net.named_buffers())}
    swapped = dojo.lora_training.train_lora(
        patcher, data, job(dojo, steps=4, gradient_checkpointing=checkpointing, blocks_to_swap=3))
    assert swapped.losses == plain.losses
    assert swapped.lora.keys() == plain.lora.keys()
    assert all(torch.equal(swapped.lora[k], plain.lora[k]) for k in plain.lora)
    after = dict(list(net.named_parameters()) + list(net.named_buffers()))
    assert after.keys() == tensors.keys()
    assert all(after[n] is t and t.data_ptr() == ptr and t.device == dev for n, (t, ptr, dev) in tensors.items())
    assert all(not b._forward_pre_hooks and not b._forward_hooks and "forward" not in vars(b)
               for b in list(net.double_blocks) + list(net.single_blocks))
    assert all(torch.equal(v, base[k]) for k, v in outputs(dojo, patcher, data).items())


def test_train_node_passes_blocks_to_swap(comfy, dojo, monkeypatch):
    seen = []
    train = dojo.train_lora.train_lora
    monkeypatch.setattr(dojo.train_lora, "train_lora", lambda model, data, job: seen.append(job) or train(model, data, job))
    settings = dict(steps=2, batch_size=2, grad_accumulation=1, learning_rate=1e-3, rank=4, alpha=0.0,
                    adapter="lora", targets="auto", optimizer="adamw", lr_schedule="constant", warmup_steps=0,
                    timestep_sampling="auto", shift=0.0, min_snr_gamma=0.0, noise_offset=0.0,
                    gradient_checkpointing="auto", precision="fp32", seed=3, checkpoint_every=0,
                    run_name="hv_block_swap")
    data = mixed_dataset(dojo)
    off = dojo.train_lora.DojoTrainLoRA.execute(tiny_hunyuan_video_patcher(), data, **settings).result
    on = dojo.train_lora.DojoTrainLoRA.execute(tiny_hunyuan_video_patcher(), data, blocks_to_swap=2,
                                               **settings).result
    assert [j.blocks_to_swap for j in seen] == [0, 2]
    assert off[1]["loss"] == on[1]["loss"] and all(torch.equal(off[0][k], on[0][k]) for k in off[0])


def test_auto_defaults_for_hunyuan_video(comfy, dojo):
    view = dojo.comfy_model.ComfyDenoisingModel(tiny_hunyuan_video_patcher())
    auto = dojo.train_lora.resolve_auto_settings(view)
    assert auto.rank == 32 and auto.learning_rate == 2e-4
    assert auto.targets is dojo.protocol.TargetPreset.ALL_LINEAR
    assert auto.timestep_sampling is dojo.timesteps.TimestepSampling.SHIFT
    assert auto.shift == 7.0 and view.schedule.shift == 7.0  # the model's own flow shift
    assert auto.gradient_checkpointing
    # ALL_LINEAR for HunyuanVideo: every linear of the double- and single-stream blocks, nothing else.
    targets = set(view.adaptable_modules(auto.targets))
    net = view.diffusion_model
    block_linears = {n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)
                     and n.split(".")[0] in ("double_blocks", "single_blocks")}
    assert targets == block_linears
    assert {"double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.2", "double_blocks.0.img_mod.lin",
            "single_blocks.0.linear1", "single_blocks.0.linear2", "single_blocks.0.modulation.lin"} <= targets
    # A value the user sets wins.
    manual = dojo.train_lora.resolve_auto_settings(view, rank=8, learning_rate=1e-4, targets="attention",
                                                   timestep_sampling="uniform", shift=3.0,
                                                   gradient_checkpointing="off")
    assert (manual.rank, manual.learning_rate, manual.shift, manual.gradient_checkpointing) == (8, 1e-4, 3.0, False)
    assert manual.targets is dojo.protocol.TargetPreset.ATTENTION


def test_block_swap_is_refused_for_unets(comfy, dojo):
    from inprocess_models import tiny_sd15_patcher
    from test_lora_training import encoded
    with pytest.raises(ValueError, match="blocks_to_swap"):
        dojo.lora_training.train_lora(tiny_sd15_patcher(), encoded(dojo), job(dojo, steps=1, blocks_to_swap=1))
