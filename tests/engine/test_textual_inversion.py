"""Textual inversion in the engine: captions and templates, vector init, file layouts, and the loop
training only the vectors through a `TextualInversionModel` (a frozen text encoder stand-in here; the
real CLIP path is tested in the integration tier)."""
import pytest
import torch

from comfyui_dojo.training.batches import BatchSchedule
from comfyui_dojo.training.loop import Precision, TrainConfig, diffusion_loss, train
from comfyui_dojo.training.protocol import Conditioning
from comfyui_dojo.training.textual_inversion import (CaptionMode, EmbeddingVectors, TextualInversionModel,
                                                     caption_sample, embedding_file_tensors, initial_vectors,
                                                     token_caption, training_captions, vectors_from_file)

from helpers import tiny_samples, tiny_unet_model

TOKEN = "embedding:my_cat"


def test_captions_put_the_token_where_the_placeholder_or_trigger_word_is():
    assert token_caption("a {token} on a mat", TOKEN) == f"a {TOKEN} on a mat"
    assert token_caption("{token}'s hat", TOKEN) == f"{TOKEN} 's hat"  # spaced: the name ends cleanly
    assert token_caption("zqx sitting, zqx again", TOKEN, trigger="zqx") == f"{TOKEN} sitting, {TOKEN} again"
    assert token_caption("a cat", TOKEN) == f"{TOKEN}, a cat"
    assert token_caption("", TOKEN) == TOKEN
    obj = training_captions(CaptionMode.OBJECT, ["x", "y"], TOKEN)
    assert len(obj) == 2 and obj[0] == obj[1] and f"a photo of a {TOKEN}" in obj[0]
    style = training_captions(CaptionMode.STYLE, ["x"], TOKEN)[0]
    assert all(c.endswith(f"in the style of {TOKEN}") for c in style)
    assert training_captions(CaptionMode.CAPTIONS, ["a {token}"], TOKEN) == [[f"a {TOKEN}"]]


def test_initial_vectors_repeat_or_truncate_the_init_word_rows():
    rows = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(initial_vectors(rows, 2), rows[:2])
    assert torch.equal(initial_vectors(rows, 5), rows[[0, 1, 2, 0, 1]])
    with pytest.raises(ValueError, match="init word"):
        initial_vectors(torch.zeros(0, 2), 1)


def test_file_layouts_are_a1111s():
    l, g = torch.randn(3, 768), torch.randn(3, 1280)
    assert set(embedding_file_tensors({"clip_l": l})) == {"emb_params"}
    assert set(embedding_file_tensors({"clip_l": l, "clip_g": g})) == {"clip_l", "clip_g"}
    assert torch.equal(vectors_from_file({"emb_params": l})["clip_l"], l)
    back = vectors_from_file({"clip_l": l, "clip_g": g})
    assert torch.equal(back["clip_g"], g) and torch.equal(back["clip_l"], l)
    with pytest.raises(ValueError, match="width"):
        vectors_from_file({"clip_g": l})


class FrozenWordEncoder:
    """A frozen stand-in text encoder: fixed random rows per word, the trainable vectors spliced in at
    the placeholder word, then a frozen linear map (so gradients pass through an encoder)."""

    def __init__(self, vectors: EmbeddingVectors, captions, width=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.vectors = vectors
        words = sorted({w for c in captions for w in c.split()})
        self.rows = {w: torch.randn(1, width, generator=g) for w in words}
        self.proj = 3 * torch.randn(width, width, generator=g) / width ** 0.5

    def row(self, word):
        return self.rows[word]

    def __call__(self, captions):
        contexts = []
        for caption in captions:
            parts = [self.vectors.vectors["clip_l"] if w == TOKEN else self.row(w) for w in caption.split()]
            contexts.append(torch.cat(parts)[:5] @ self.proj)
        return Conditioning(torch.stack(contexts))


def setup(seed=0):
    base = tiny_unet_model()
    vectors = EmbeddingVectors({"clip_l": torch.randn(2, 32, generator=torch.Generator().manual_seed(seed))})
    captions = [f"{TOKEN} a photo", f"{TOKEN} on grass"]
    encoder = FrozenWordEncoder(vectors, captions)
    model = TextualInversionModel(base, captions, encoder)
    samples = [caption_sample(s.latent, i % 2) for i, s in enumerate(tiny_samples(4))]
    return base, vectors, model, samples, captions


def fixed_loss(model, samples):
    latents = torch.stack([s.latent for s in samples])
    cond = Conditioning(torch.zeros(len(samples), 1, 0), None,
                        {"caption": torch.cat([s.cond.extra["caption"] for s in samples])})
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return diffusion_loss(model, latents, cond, torch.linspace(0.1, 0.9, len(samples)), noise).item()


def test_the_loop_trains_only_the_vectors_and_lowers_the_loss():
    base, vectors, model, samples, _ = setup()
    frozen = {k: v.clone() for k, v in base.unet.state_dict().items()}
    start = vectors.state_dict()
    before = fixed_loss(model, samples)
    config = TrainConfig(steps=40, learning_rate=1e-1, precision=Precision.FP32, weight_decay=0.0, seed=2)
    state, _, _ = train(model, vectors, BatchSchedule(samples, 2, seed=2), config)
    assert state.step == 40
    after = fixed_loss(model, samples)
    # Deterministic (fixed noise and timesteps): untrained vectors leave it exactly unchanged. Over the
    # tiny UNet's seeds (DOJO_TEST_MODEL_SEED=0..7) 40 steps lowered it by 5.2-12.1%; asked: 2%.
    assert after < 0.98 * before, (before, after)
    assert all(torch.equal(v, frozen[k]) for k, v in base.unet.state_dict().items())
    assert not torch.equal(vectors.state_dict()["clip_l"], start["clip_l"])
    _, again, model2, samples2, _ = setup()
    train(model2, again, BatchSchedule(samples2, 2, seed=2), config)
    assert torch.equal(again.state_dict()["clip_l"], vectors.state_dict()["clip_l"])  # same seed, same bits


def test_caption_samples_of_different_token_lengths_are_never_batched_together():
    lat = torch.zeros(4, 8, 8)
    schedule = BatchSchedule([caption_sample(lat, 0, 1), caption_sample(lat, 1, 2), caption_sample(lat, 2, 1)], 3, 0)
    sizes = sorted(len(schedule.batch(i).indices) for i in range(schedule.batches_per_epoch))
    assert sizes == [1, 2]


def test_embedding_vectors_refuse_foreign_state():
    v = EmbeddingVectors({"clip_l": torch.zeros(2, 4), "clip_g": torch.zeros(2, 6)})
    assert [p.shape[1] for p in v.parameters()] == [6, 4] and v.num_vectors == 2
    with pytest.raises(ValueError, match="keys"):
        v.load_state_dict({"clip_l": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="shape"):
        v.load_state_dict({"clip_l": torch.zeros(3, 4), "clip_g": torch.zeros(2, 6)})
