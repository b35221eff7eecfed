"""pipeline.metrics.extractors: official key layouts and parameter counts, strict loading of
official nestings, the audioldm_eval input path, and the front ends and output shapes.

The networks here are randomly initialised or filled with constants: they check names, shapes and
plumbing, never a metric value. Expected key tables are written out from the official code (docs/references.md, "Paper-protocol metrics")
and the official module definitions, independently of the code under test.
"""

from __future__ import annotations

import math
from fractions import Fraction

import librosa
import numpy as np
import pytest
import soundfile
import torch

from pipeline.checkpoint import CheckpointError
from pipeline.metrics.extractors import audio_io, clip_image, panns, vggish, wav2clip
from pipeline.metrics.extractors.common import Extractor

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{n}": (() if n == "num_batches_tracked" else (channels,)) for n in BN}


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _constant_state(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict:
    """Every tensor of `model`'s state dict as a distinct constant (key index + 1), broadcast to
    its shape so the saved file stays a few kB; floating tensors optionally cast to `dtype`."""
    out = {}
    for i, (key, value) in enumerate(model.state_dict().items()):
        kind = dtype if dtype is not None and value.is_floating_point() else value.dtype
        out[key] = torch.full((), i + 1, dtype=kind).expand(value.shape)
    return out


def _assert_constants(model: torch.nn.Module, state: dict) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key].to(value.dtype), value.expand(loaded[key].shape)), key


def _sine(seconds: float, rate: int, hz: float = 1000.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


# ------------------------------------------------------------------------------------ audio_io


def _direct_resample(x: np.ndarray, orig: int, new: int, j: int) -> float:
    """Output sample j of torchaudio's default resampler as a plain float64 sum over inputs."""
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    cutoff = min(o, n) * 0.99
    i = np.arange(len(x))
    u = np.clip((i / o - j / n) * cutoff, -6, 6)
    window = np.cos(u * np.pi / 12) ** 2
    return float(np.sum(x * np.sinc(u) * window * cutoff / o))


def test_resample_keeps_a_sines_frequency_and_amplitude():
    x = _sine(2.0, 22050)
    y = audio_io.resample(torch.from_numpy(x), 22050, 16000).numpy()
    reference = _sine(len(y) / 16000, 16000)
    inner = slice(200, -200)  # away from the zero-padded ends
    assert np.abs(y - reference)[inner].max() < 1e-3
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert np.fft.rfftfreq(len(y), 1 / 16000)[spectrum.argmax()] == pytest.approx(1000, abs=1)


def test_resample_matches_the_direct_windowed_sinc_sum():
    x = np.random.RandomState(0).randn(3000).astype(np.float32)
    y = audio_io.resample(torch.from_numpy(x), 22050, 16000).numpy()
    for j in (0, 1, 7, 1000, len(y) - 1):
        assert y[j] == pytest.approx(
            _direct_resample(x.astype(np.float64), 22050, 16000, j), abs=2e-5
        )


@pytest.mark.parametrize("n", [1, 441, 22050, 33333, 217088])
def test_resample_length_is_ceil_of_the_rate_ratio(n):
    y = audio_io.resample(torch.zeros(2, n), 22050, 16000)
    assert y.shape == (2, math.ceil(Fraction(n * 16000, 22050)))


def test_resample_at_equal_rates_is_the_identity():
    x = torch.randn(1, 1234)
    assert audio_io.resample(x, 16000, 16000) is x


def test_prepare_wave_keeps_channel_0_removes_dc_and_pads():
    left = _sine(0.5, 16000) + 0.25
    right = np.ones_like(left)
    out = audio_io.prepare_wave(np.stack([left, right]), 16000)
    assert out.shape == (1, audio_io.MIN_SAMPLES) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0, : len(left)].numpy(), left - left.mean(), atol=1e-6)
    assert torch.all(out[0, len(left) :] == 0)


def test_load_wave_reads_resamples_and_keeps_long_clips(tmp_path):
    path = tmp_path / "clip.wav"
    left = _sine(3.0, 22050)
    soundfile.write(path, np.stack([left, -left], axis=1), 22050, subtype="PCM_16")
    out = audio_io.load_wave(path)
    assert out.shape == (1, math.ceil(len(left) * 16000 / 22050))
    pcm, _ = soundfile.read(path, dtype="int16")  # torchaudio.load gives int16 / 32768
    expected = audio_io.prepare_wave((pcm[:, 0] / 32768).astype(np.float32), 22050)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_load_wave_reports_an_unreadable_file(tmp_path):
    path = tmp_path / "not-audio.wav"
    path.write_bytes(b"this is not audio")
    with pytest.raises(audio_io.AudioInputError, match="cannot read audio file"):
        audio_io.load_wave(path)


# --------------------------------------------------------------------------------------- PANNs

PANNS_CHANNELS = (1, 64, 128, 256, 512, 1024, 2048)


def _panns_expected() -> dict[str, tuple[int, ...]]:
    keys = {
        "spectrogram_extractor.stft.conv_real.weight": (257, 1, 512),
        "spectrogram_extractor.stft.conv_imag.weight": (257, 1, 512),
        "logmel_extractor.melW": (257, 64),
        **_bn("bn0", 64),
        "fc1.weight": (2048, 2048),
        "fc1.bias": (2048,),
        "fc_audioset.weight": (527, 2048),
        "fc_audioset.bias": (527,),
    }
    for k in range(1, 7):
        c_in, c = PANNS_CHANNELS[k - 1], PANNS_CHANNELS[k]
        keys[f"conv_block{k}.conv1.weight"] = (c, c_in, 3, 3)
        keys[f"conv_block{k}.conv2.weight"] = (c, c, 3, 3)
        keys.update(_bn(f"conv_block{k}.bn1", c))
        keys.update(_bn(f"conv_block{k}.bn2", c))
    return keys


@pytest.fixture(scope="module")
def panns_extractor():
    torch.manual_seed(0)
    return panns.PannsExtractor(panns.Cnn14())


@pytest.fixture(scope="module")
def panns_features(panns_extractor):
    wave = np.random.RandomState(1).randn(audio_io.MIN_SAMPLES).astype(np.float32) * 0.1
    return panns_extractor.features(wave)


def test_panns_keys_shapes_and_parameter_counts(panns_extractor):
    model = panns_extractor.model
    assert _shapes(model) == _panns_expected()
    params = list(model.parameters())
    assert sum(p.numel() for p in params if p.requires_grad) == 80_753_615
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    assert frozen == 2 * 257 * 512 + 257 * 64 == panns.FROZEN_PARAMETERS
    assert panns.TRAINABLE_PARAMETERS == 80_753_615


def test_panns_front_end_is_the_16k_torchlibrosa_one(panns_extractor):
    model = panns_extractor.model
    wave = torch.from_numpy(_sine(10.0, 16000))[None]
    assert model.logmel(wave).shape == (1, 1, 1001, 64)
    mel = librosa.filters.mel(sr=16000, n_fft=512, n_mels=64, fmin=50, fmax=8000).T
    np.testing.assert_allclose(model.logmel_extractor.melW.numpy(), mel, rtol=1e-6, atol=1e-9)
    short = wave[:, :4000]
    reference = torch.stft(
        short[0], 512, 160, window=torch.hann_window(512), center=True, return_complex=True
    )
    power = model.spectrogram_extractor(short)[0, 0]  # (frames, 257)
    torch.testing.assert_close(power, reference.abs().pow(2).T, rtol=1e-3, atol=1e-3)


def test_panns_outputs_embedding_and_logits(panns_extractor, panns_features):
    embedding, logits = panns_features
    assert embedding.shape == (1, 2048) and embedding.dtype == np.float32
    assert logits.shape == (527,)
    assert embedding.min() >= 0  # post-ReLU fc1
    head = panns_extractor.model.fc_audioset
    expected = head(torch.from_numpy(embedding)).detach().numpy()[0]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert isinstance(panns_extractor, Extractor) and panns_extractor.sample_rate == 16000


def test_panns_loads_the_official_nesting_strictly(panns_extractor, tmp_path):
    state = _constant_state(panns_extractor.model)
    sampler = {"indexes_per_class": [np.arange(5), np.arange(3)], "queue": [np.int64(4), 1]}
    path = tmp_path / "Cnn14_16k_mAP=0.438.pth"
    torch.save({"model": state, "iteration": 0, "sampler": sampler}, path)
    loaded = panns.PannsExtractor.from_checkpoint(path)
    _assert_constants(loaded.model, state)
    assert loaded.sha256 is not None and len(loaded.sha256) == 64


class _NotAllowed:
    pass


def test_official_reading_still_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "extra": _NotAllowed()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        panns.PannsExtractor.from_checkpoint(path)


# -------------------------------------------------------------------------------------- VGGish

VGGISH_EXPECTED = {
    "features.0.weight": (64, 1, 3, 3),
    "features.0.bias": (64,),
    "features.3.weight": (128, 64, 3, 3),
    "features.3.bias": (128,),
    "features.6.weight": (256, 128, 3, 3),
    "features.6.bias": (256,),
    "features.8.weight": (256, 256, 3, 3),
    "features.8.bias": (256,),
    "features.11.weight": (512, 256, 3, 3),
    "features.11.bias": (512,),
    "features.13.weight": (512, 512, 3, 3),
    "features.13.bias": (512,),
    "embeddings.0.weight": (4096, 12288),
    "embeddings.0.bias": (4096,),
    "embeddings.2.weight": (4096, 4096),
    "embeddings.2.bias": (4096,),
    "embeddings.4.weight": (128, 4096),
    "embeddings.4.bias": (128,),
}


@pytest.fixture(scope="module")
def vggish_extractor():
    torch.manual_seed(0)
    return vggish.VggishExtractor(vggish.VGGish())


def test_vggish_keys_shapes_and_parameter_count(vggish_extractor):
    model = vggish_extractor.model
    assert _shapes(model) == VGGISH_EXPECTED
    assert sum(p.numel() for p in model.parameters()) == 72_141_184
    assert not isinstance(model.embeddings[-1], torch.nn.ReLU)  # pre-ReLU output


@pytest.mark.parametrize("seconds", [10.0, 9.85])
def test_vggish_examples_of_a_10_s_and_a_9_85_s_clip(seconds):
    examples = vggish.log_mel_examples(_sine(seconds, 16000))
    assert examples.shape == (10, 96, 64)


def test_vggish_front_end_values():
    silence = vggish.log_mel_examples(np.zeros(16000, np.float32))
    np.testing.assert_allclose(silence, np.log(0.01))
    weights = vggish.mel_matrix()
    assert weights.shape == (257, 64) and np.all(weights[0] == 0)
    assert weights.max() <= 1 and np.all(weights.max(axis=0) > 0.5)  # peak 1, no area norm
    tone = vggish.log_mel_examples(_sine(1.0, 16000, hz=1000.0))[0].mean(axis=0)
    centres = 700 * (np.exp(np.linspace(*vggish.hertz_to_mel([125, 7500]), 66)[1:-1] / 1127) - 1)
    assert abs(centres[tone.argmax()] - 1000) < 60


def test_vggish_embeds_every_example(vggish_extractor):
    rows = vggish_extractor.embed(np.random.RandomState(2).randn(160000).astype(np.float32))
    assert rows.shape == (10, 128) and rows.dtype == np.float32
    assert (rows < 0).any()  # no final ReLU
    assert isinstance(vggish_extractor, Extractor)


def test_vggish_loads_a_bare_state_dict_and_reports_missing_keys(vggish_extractor, tmp_path):
    state = _constant_state(vggish_extractor.model)
    path = tmp_path / "vggish-10086976.pth"
    torch.save(state, path)
    _assert_constants(vggish.VggishExtractor.from_checkpoint(path).model, state)
    del state["embeddings.4.bias"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys \(e\.g\. embeddings\.4\.bias\)"):
        vggish.VggishExtractor.from_checkpoint(path)


# ---------------------------------------------------------------------------------------- CLIP


def _clip_expected() -> dict[str, tuple[int, ...]]:
    keys = {
        "visual.conv1.weight": (768, 3, 32, 32),
        "visual.class_embedding": (768,),
        "visual.positional_embedding": (50, 768),
        "visual.ln_pre.weight": (768,),
        "visual.ln_pre.bias": (768,),
        "visual.ln_post.weight": (768,),
        "visual.ln_post.bias": (768,),
        "visual.proj": (768, 512),
    }
    for i in range(12):
        block = f"visual.transformer.resblocks.{i}"
        keys.update(
            {
                f"{block}.attn.in_proj_weight": (2304, 768),
                f"{block}.attn.in_proj_bias": (2304,),
                f"{block}.attn.out_proj.weight": (768, 768),
                f"{block}.attn.out_proj.bias": (768,),
                f"{block}.ln_1.weight": (768,),
                f"{block}.ln_1.bias": (768,),
                f"{block}.mlp.c_fc.weight": (3072, 768),
                f"{block}.mlp.c_fc.bias": (3072,),
                f"{block}.mlp.c_proj.weight": (768, 3072),
                f"{block}.mlp.c_proj.bias": (768,),
                f"{block}.ln_2.weight": (768,),
                f"{block}.ln_2.bias": (768,),
            }
        )
    return keys


@pytest.fixture(scope="module")
def clip_extractor():
    torch.manual_seed(0)
    return clip_image.ClipImageExtractor(clip_image.ClipImageEncoder())


class _Node(torch.nn.Module):
    pass


class _Archive(torch.nn.Module):
    """Holds tensors under dotted names as parameters; forward is a no-op to trace."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, value in tensors.items():
            *path, leaf = key.split(".")
            node = self
            for part in path:
                if not hasattr(node, part):
                    node.add_module(part, _Node())
                node = getattr(node, part)
            node.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_clip_keys_shapes_and_parameter_count(clip_extractor):
    model = clip_extractor.model
    assert _shapes(model) == _clip_expected()
    # conv1 + class + positional + ln_pre + 12 × block + ln_post + proj
    block = 3 * 768 * 768 + 3 * 768 + 768 * 768 + 768 + 2 * 768 * 3072 + 3072 + 768 + 4 * 768
    expected = 768 * 3 * 32 * 32 + 768 + 50 * 768 + 2 * 768 + 12 * block + 2 * 768 + 768 * 512
    assert sum(p.numel() for p in model.parameters()) == expected == 87_849_216


def test_clip_preprocess_follows_resize_crop_normalise():
    image = np.zeros((240, 320, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 128, 250
    pixels = clip_image.preprocess(image)
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
    expected = (np.array([10, 128, 250]) / 255 - clip_image.MEAN) / clip_image.STD
    np.testing.assert_allclose(pixels.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)
    # a vertical stripe at the centre column stays at the centre after resize + crop
    striped = np.zeros((100, 400, 3), np.uint8)
    striped[:, 198:202] = 255
    profile = clip_image.preprocess(striped)[0].mean(dim=0)
    profile = (profile - profile.min()).numpy()
    centroid = (profile * np.arange(224)).sum() / profile.sum()
    assert centroid == pytest.approx((200 * 896 / 400 - 336) - 0.5, abs=0.25)


def test_clip_embedding_is_unit_norm(clip_extractor):
    image = (np.random.RandomState(3).rand(240, 320, 3) * 255).astype(np.uint8)
    vector = clip_extractor.embed(image)
    assert vector.shape == (512,) and vector.dtype == np.float32
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert isinstance(clip_extractor, Extractor)


def test_clip_loads_the_visual_part_of_a_torchscript_archive(clip_extractor, tmp_path):
    visual = _constant_state(clip_extractor.model, dtype=torch.float16)  # OpenAI ships float16
    text = {
        "token_embedding.weight": torch.ones((), dtype=torch.float16).expand(49408, 512),
        "logit_scale": torch.ones((), dtype=torch.float16),
    }
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.trace(_Archive({**visual, **text}), torch.zeros(1)), path)
    loaded = clip_image.ClipImageExtractor.from_checkpoint(path)
    _assert_constants(loaded.model, visual)
    assert loaded.model.visual.proj.dtype == torch.float32


def test_clip_loads_a_plain_state_dict_and_rejects_a_foreign_file(clip_extractor, tmp_path):
    visual = _constant_state(clip_extractor.model)
    path = tmp_path / "clip-state.pt"
    torch.save({**visual, "ln_final.weight": torch.ones(512)}, path)
    _assert_constants(clip_image.ClipImageExtractor.from_checkpoint(path).model, visual)
    torch.save({"features.0.weight": torch.ones(3)}, path)
    with pytest.raises(CheckpointError, match="no keys under visual"):
        clip_image.ClipImageExtractor.from_checkpoint(path)


# ------------------------------------------------------------------------------------ Wav2CLIP


def _wav2clip_expected() -> dict[str, tuple[int, ...]]:
    enc = "audio_encoder"
    keys = {
        f"{enc}.spectrogram.window": (512,),
        f"{enc}.conv1.weight": (64, 1, 7, 7),
        **_bn(f"{enc}.bn1", 64),
        "audio_transform.sequential.0.weight": (512, 512),
        "audio_transform.sequential.0.bias": (512,),
        "audio_transform.sequential.3.weight": (512, 512),
        "audio_transform.sequential.3.bias": (512,),
    }
    planes_in = 64
    for layer, planes in enumerate((64, 128, 256, 512), start=1):
        for block in (0, 1):
            prefix = f"{enc}.layer{layer}.{block}"
            c_in = planes_in if block == 0 else planes
            keys[f"{prefix}.conv1.weight"] = (planes, c_in, 3, 3)
            keys[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            keys.update(_bn(f"{prefix}.bn1", planes))
            keys.update(_bn(f"{prefix}.bn2", planes))
            if block == 0 and layer > 1:
                keys[f"{prefix}.downsample.0.weight"] = (planes, c_in, 1, 1)
                keys.update(_bn(f"{prefix}.downsample.1", planes))
        planes_in = planes
    return keys


@pytest.fixture(scope="module")
def wav2clip_extractor():
    torch.manual_seed(0)
    return wav2clip.Wav2ClipExtractor(wav2clip.Wav2Clip())


def test_wav2clip_keys_shapes_and_parameter_count(wav2clip_extractor):
    model = wav2clip_extractor.model
    assert _shapes(model) == _wav2clip_expected()
    # torchvision's resnet18: 11,689,512; a 1-channel stem saves 64·2·7·7, no fc saves 513,000
    resnet = 11_689_512 - 64 * 2 * 7 * 7 - (512 * 1000 + 1000)
    assert sum(p.numel() for p in model.parameters()) == resnet + 2 * (512 * 512 + 512)
    assert wav2clip.PARAMETERS == 11_695_552 == resnet + 525_312


def test_wav2clip_spectrogram_grid_and_window(wav2clip_extractor):
    spectrogram = wav2clip_extractor.model.audio_encoder.spectrogram
    assert torch.equal(spectrogram.window, torch.hann_window(512, periodic=True))
    assert spectrogram(torch.zeros(1, 1, 160000)).shape == (1, 1, 257, 1 + 160000 // 353)


def test_wav2clip_embeds_one_clip_per_call_deterministically(wav2clip_extractor):
    rng = np.random.RandomState(4)
    a = rng.randn(8000).astype(np.float32) * 0.1
    b = rng.randn(8000).astype(np.float32) * 2.0
    first, again = wav2clip_extractor.embed(a), wav2clip_extractor.embed(a[None])
    assert first.shape == (512,) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    with torch.inference_mode():  # a batch shares its standardisation: why one clip per call
        batched = wav2clip_extractor.model(torch.from_numpy(np.stack([a, b])))[0].numpy()
    assert np.abs(batched - first).max() > 1e-4
    assert isinstance(wav2clip_extractor, Extractor) and wav2clip_extractor.sample_rate == 16000


def test_wav2clip_loads_the_released_flat_state_dict(wav2clip_extractor, tmp_path):
    model = wav2clip_extractor.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    extra = {
        "image_transform.sequential.0.weight": torch.ones(512, 512),
        "loss_fn_a.logit_scale": torch.ones(()),
    }
    path = tmp_path / "Wav2CLIP.pt"
    torch.save({**state, **extra}, path)
    loaded = wav2clip.Wav2ClipExtractor.from_checkpoint(path).model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_wav2clip_tolerates_only_missing_batchnorm_counters(wav2clip_extractor, tmp_path):
    state = _constant_state(wav2clip_extractor.model)
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    path = tmp_path / "Wav2CLIP.pt"
    torch.save({"state_dict": {k: v for k, v in state.items() if k not in counters}}, path)
    loaded = wav2clip.Wav2ClipExtractor.from_checkpoint(path).model.state_dict()
    assert all(loaded[k] == 0 for k in counters)
    assert torch.all(loaded["audio_encoder.conv1.weight"] == state["audio_encoder.conv1.weight"])
    del state["audio_encoder.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(e\.g\. audio_encoder\.conv1"):
        wav2clip.Wav2ClipExtractor.from_checkpoint(path)
