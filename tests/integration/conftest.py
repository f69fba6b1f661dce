import os

import pytest

from comfy_harness import ComfyUI, comfyui_available, comfyui_path, make_base_directory

ENABLE_HINT = ("integration tier skipped: no ComfyUI tree at {path}. Set COMFYUI_PATH to a ComfyUI checkout "
               "(./dojo.sh test installs its requirements) to run it.")
CI_HINT = ("CI=true, but there is no ComfyUI tree at {path} to run the integration tests in. Put ComfyUI 0.33 "
           "there (git clone --branch v0.33.0 https://github.com/comfyanonymous/ComfyUI ~/ComfyUI) or set "
           "COMFYUI_PATH, then run ./dojo.sh test (it installs the tree's requirements).")
REQUIREMENTS_HINT = ("ComfyUI at {path} does not boot in this Python: {error}. Its requirements are not installed "
                     "here: run ./dojo.sh setup (it installs {path}/requirements.txt, keeping torch), or "
                     "pip install -r {path}/requirements.txt with this Python.")


def pytest_collection_modifyitems(config, items):
    integration = [item for item in items if "integration" in item.nodeid.split("::")[0]]
    if comfyui_available() or not integration:
        return
    if os.environ.get("CI") == "true":  # CI must not go green on the engine tier alone
        raise pytest.UsageError(CI_HINT.format(path=comfyui_path()))
    skip = pytest.mark.skip(reason=ENABLE_HINT.format(path=comfyui_path()))
    for item in integration:
        item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if not comfyui_available():
        terminalreporter.write_line(ENABLE_HINT.format(path=comfyui_path()))


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> ComfyUI:
    base = make_base_directory(tmp_path_factory.mktemp("comfy_base"))
    try:
        return ComfyUI(comfyui_path(), base)
    except ModuleNotFoundError as error:  # one clear stop instead of the same error for every test
        pytest.exit(REQUIREMENTS_HINT.format(path=comfyui_path(), error=error), returncode=3)


# Tiny random-weight model files that ComfyUI's own loaders detect (tiny_files.py, DESIGN.md section 6).
# Each is written once into ~/.cache/comfyui-dojo-tests/<ComfyUI version>/<builder key>/ and linked
# into the session's base directory; each fixture returns the name the loader node takes.

@pytest.fixture(scope="session")
def tiny_sd_vae(comfy) -> str:
    """models/vae: a TAESD-architecture VAE, 4 latent channels (SD1.5/SDXL), for VAELoader."""
    import tiny_files
    return tiny_files.provide_sd_taesd(comfy.base)


@pytest.fixture(scope="session")
def tiny_flux_vae(comfy) -> str:
    """models/vae: a TAESD-architecture VAE, 16 latent channels (Flux-style images), for VAELoader."""
    import tiny_files
    return tiny_files.provide_flux_taesd(comfy.base)


@pytest.fixture(scope="session")
def tiny_video_vae(comfy) -> str:
    """models/vae: a TAEHV video VAE in fp16 (HunyuanVideo latents, 16 channels), for VAELoader."""
    import tiny_files
    return tiny_files.provide_taehv(comfy.base)


@pytest.fixture(scope="session")
def tiny_clip_l(comfy) -> str:
    """models/text_encoders: a random full-size CLIP-L, for CLIPLoader type stable_diffusion."""
    import tiny_files
    return tiny_files.provide_clip_l(comfy.base)


@pytest.fixture(scope="session")
def tiny_sd15_checkpoint(comfy) -> str:
    """models/checkpoints: an SD1.5 checkpoint (tiny UNet, CLIP-L, TAESD VAE) for CheckpointLoaderSimple."""
    import tiny_files
    return tiny_files.provide_sd15_checkpoint(comfy.base)


@pytest.fixture(scope="session")
def smallest_sdxl_checkpoint(comfy) -> str:
    """models/checkpoints: the smallest SDXL checkpoint ComfyUI detects (UNet with SDXL's pinned depths,
    full-size random CLIP-L + CLIP-G, TAESD VAE): 1.9 GB, ~26 s to write into an empty cache."""
    import tiny_files
    return tiny_files.provide_sdxl_checkpoint(comfy.base)


@pytest.fixture(scope="session")
def tiny_hunyuan_video_unet(comfy) -> str:
    """models/diffusion_models: a ~10 M-parameter HunyuanVideo transformer for UNETLoader."""
    import tiny_files
    return tiny_files.provide_hunyuan_video(comfy.base)


@pytest.fixture(scope="session")
def tiny_flux_unet(comfy) -> str:
    """models/diffusion_models: a Flux transformer UNETLoader detects as Flux. Written by default only
    where this ComfyUI detects a small one (hidden 256, newer versions); where detection needs hidden
    3072 (0.8.0: ~535 M params, ~1.1 GB) it is opt-in with DOJO_BIG_TEST_MODELS=1, else skipped."""
    import os
    import tiny_files
    if tiny_files.smallest_detectable_flux_hidden() > 256 and os.environ.get("DOJO_BIG_TEST_MODELS") != "1":
        pytest.skip(f"ComfyUI {comfy.version} detects Flux files only at hidden 3072 (~1.1 GB); "
                    "set DOJO_BIG_TEST_MODELS=1 to write one")
    return tiny_files.provide_detectable_flux(comfy.base)


@pytest.fixture
def tiny_flux(comfy):
    """A fresh ModelPatcher over ComfyUI's Flux with a small config (family Flux, context/pooled 768),
    built in process: not loader-detectable, for routine tests."""
    import tiny_files
    return tiny_files.build_tiny_flux()


@pytest.fixture
def tiny_sdxl(comfy):
    """A fresh ModelPatcher over ComfyUI's SDXL BaseModel with a tiny UNet (context 2048, adm 2816), built
    in process (~2.6 M params): for tests that need an SDXL model, not the 1.9 GB checkpoint."""
    import tiny_files
    return tiny_files.build_tiny_sdxl()
