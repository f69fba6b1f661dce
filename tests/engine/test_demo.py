"""The README's main job runs end to end: trains on sample_data and writes a LoRA and a loss plot."""
import pytest
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


def test_demo_accepts_any_number_of_steps_from_one(tmp_path, capsys):
    """Short runs too (the warm-up shrinks with the run): `--steps 1` and `--steps 5` train and save."""
    for steps in (1, 5):
        out = tmp_path / str(steps)
        demo.main(["--steps", str(steps), "--output", str(out)])
        lora, = out.glob("dojo_demo_lora_*.safetensors")
        with safetensors.safe_open(str(lora), "pt") as f:
            assert f.metadata()["dojo_steps"] == str(steps)
    assert [demo.warmup_for(s) for s in (1, 9, 10, 50, 150, 1000)] == [0, 0, 1, 5, 10, 10]
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit):
            demo.main(["--steps", bad, "--output", str(tmp_path / "bad")])
        assert "must be 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
