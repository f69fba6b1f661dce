"""The README's main job runs end to end: trains on sample_data and writes a LoRA and a loss plot."""
import safetensors

from comfyui_dojo.training import demo


def test_demo_trains_and_writes_its_files(tmp_path, capsys):
    assert demo.main(["--steps", "40", "--output", str(tmp_path)]) is True
    lora, = tmp_path.glob("dojo_demo_lora_*.safetensors")
    plot, = tmp_path.glob("dojo_demo_loss_*.png")
    with safetensors.safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["dojo_steps"] == "40"
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert sum(k.endswith(".lora_down.weight") for k in keys) == sum(k.endswith(".lora_up.weight") for k in keys)
    assert plot.stat().st_size > 1000
    assert "fixed-batch loss" in capsys.readouterr().out
