"""Whole graphs in real ComfyUI, as a user builds them: folder -> dataset -> encode -> Train LoRA ->
Apply LoRA -> sample -> save. The model files are the tiny loader-detectable ones."""
import pytest
import safetensors

from test_dataset_nodes import fresh_folder, image, video

pytestmark = pytest.mark.integration


def test_sd15_graph_trains_applies_samples_and_saves(comfy, tiny_sd15_checkpoint):
    folder = fresh_folder(comfy, "e2e_sd")
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]):
        image(folder / f"img{i}.png", (64, 64), colour, None if i % 2 else "a plain square, [trigger]")
    n = comfy.node
    prompt = {
        "ckpt": n("CheckpointLoaderSimple", ckpt_name=tiny_sd15_checkpoint),
        "data": n("DojoLoadImageDataset", folder="e2e_sd", trigger_word="DeltamonStamp", resolution=64,
                  min_side=64, max_side=64),
        "enc": n("DojoEncodeDataset", dataset=["data", 0], vae=["ckpt", 2], clip=["ckpt", 1]),
        "train": n("DojoTrainLoRA", model=["ckpt", 0], dataset=["enc", 0], steps=4, batch_size=2, rank=4,
                   precision="fp32", run_name="e2e_sd"),
        "apply": n("DojoApplyLoRA", model=["ckpt", 0], lora=["train", 0], strength_model=0.8),
        "pos": n("CLIPTextEncode", clip=["ckpt", 1], text="DeltamonStamp, a plain square"),
        "neg": n("CLIPTextEncode", clip=["ckpt", 1], text=""),
        "latent": n("EmptyLatentImage", width=64, height=64, batch_size=1),
        "sample": n("KSampler", model=["apply", 0], positive=["pos", 0], negative=["neg", 0],
                    latent_image=["latent", 0], steps=2, cfg=1.0, seed=1),
        "decode": n("VAEDecode", samples=["sample", 0], vae=["ckpt", 2]),
        "save_image": n("SaveImage", images=["decode", 0], filename_prefix="e2e_sd"),
        "save_lora": n("DojoSaveLoRA", lora=["train", 0], filename_prefix="e2e/sd_lora",
                       base_model_name=tiny_sd15_checkpoint),
    }
    result = comfy.run(prompt)
    assert result.success, result.error_message()
    saved = result.ui_outputs["save_lora"]["text"][0]
    assert saved == "e2e/sd_lora_00001.safetensors"
    with safetensors.safe_open(str(comfy.base / "models" / "loras" / saved), "pt") as f:
        meta = f.metadata()
        assert meta["dojo_trigger_word"] == "DeltamonStamp" and meta["dojo_steps"] == "4"
        assert meta["dojo_base_model"] == tiny_sd15_checkpoint and meta["ss_num_train_images"] == "4"
        assert meta["dojo_dataset"] == "e2e_sd"
    assert result.ui_outputs["save_image"]["images"]
    assert result.ui_outputs["train"]["images"]  # the loss graph preview


def test_hunyuan_video_graph_on_images_and_clips_at_strength_1_4(comfy, tiny_hunyuan_video_unet, tiny_clip_l,
                                                                   tiny_video_vae):
    folder = fresh_folder(comfy, "e2e_hv")
    image(folder / "still.png", (64, 64), (120, 30, 30), "[trigger] standing still")
    video(folder / "walk.mp4", 9, (64, 64), "[trigger] walking")
    video(folder / "turn.mp4", 5, (64, 64), "[trigger] turning")
    n = comfy.node
    prompt = {
        "unet": n("UNETLoader", unet_name=tiny_hunyuan_video_unet),
        "clip": n("CLIPLoader", clip_name=tiny_clip_l, type="stable_diffusion"),
        "vae": n("VAELoader", vae_name=tiny_video_vae),
        "data": n("DojoLoadImageDataset", folder="e2e_hv", trigger_word="hvstyle", resolution=64, min_side=64,
                  max_side=64, frames_per_clip=5),
        "enc": n("DojoEncodeDataset", dataset=["data", 0], vae=["vae", 0], clip=["clip", 0]),
        "train": n("DojoTrainLoRA", model=["unet", 0], dataset=["enc", 0], steps=3, rank=4, precision="fp32",
                   run_name="e2e_hv"),
        "apply": n("DojoApplyLoRA", model=["unet", 0], lora=["train", 0], strength_model=1.4),
        "pos": n("CLIPTextEncode", clip=["clip", 0], text="hvstyle walking"),
        "latent": n("EmptyHunyuanLatentVideo", width=64, height=64, length=5, batch_size=1),
        "sample": n("KSampler", model=["apply", 0], positive=["pos", 0], negative=["pos", 0],
                    latent_image=["latent", 0], steps=2, cfg=1.0, seed=1),
        "decode": n("VAEDecode", samples=["sample", 0], vae=["vae", 0]),
        "preview": n("PreviewImage", images=["decode", 0]),
        "save_lora": n("DojoSaveLoRA", lora=["train", 0], filename_prefix="e2e/hv_lora"),
    }
    result = comfy.run(prompt)
    assert result.success, result.error_message()
    assert len(result.ui_outputs["preview"]["images"]) >= 5  # decoded video frames
    saved = comfy.base / "models" / "loras" / result.ui_outputs["save_lora"]["text"][0]
    with safetensors.safe_open(str(saved), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("diffusion_model.") and ".lora_" in k for k in keys)
