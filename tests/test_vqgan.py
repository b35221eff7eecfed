"""The VQGAN and MelGAN architectures against the official checkpoints' layouts (docs/references.md, "Official tokenizer and vocoder configurations")."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from pipeline import checkpoint
from pipeline.tokenizers.vocoder import MelGANConfig, MelGANGenerator
from pipeline.tokenizers.vqgan import IMAGENET_F16_1024, VGGSOUND_CODEBOOK, VQGANConfig, VQModel


def _meta_model(cfg: VQGANConfig) -> VQModel:
    with torch.device("meta"):
        return VQModel(cfg)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("cfg", "total", "encoder", "decoder"),
    [
        (IMAGENET_F16_1024, 72_141_699, 29_298_176, 42_449_795),
        (VGGSOUND_CODEBOOK, 72_137_089, 29_295_872, 42_447_489),
    ],
)
def test_official_parameter_counts(cfg, total, encoder, decoder):
    model = _meta_model(cfg)
    assert _params(model) == total
    assert _params(model.encoder) == encoder
    assert _params(model.decoder) == decoder
    assert _params(model.quantize) == 1024 * 256
    assert _params(model.quant_conv) == _params(model.post_quant_conv) == 65_792


def test_official_image_key_layout():
    sd = _meta_model(IMAGENET_F16_1024).state_dict()
    assert len(sd) == 343
    shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
        "encoder.down.4.block.0.conv1.weight": (512, 256, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.4.block.0.nin_shortcut.weight": (512, 256, 1, 1),
        "encoder.down.2.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.down.4.attn.1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "quant_conv.weight": (256, 256, 1, 1),
        "quantize.embedding.weight": (1024, 256),
        "post_quant_conv.weight": (256, 256, 1, 1),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.4.attn.2.v.weight": (512, 512, 1, 1),
        "decoder.up.4.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "decoder.conv_out.bias": (3,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key

    # Where the structural pieces sit, and nowhere else.
    def levels(pattern: str) -> set[str]:
        return {m[1] for k in sd if (m := re.match(pattern, k))}

    assert levels(r"encoder\.down\.(\d)\.attn\.") == {"4"}
    assert levels(r"encoder\.down\.(\d)\.downsample\.") == {"0", "1", "2", "3"}
    assert levels(r"encoder\.down\.(\d\.block\.\d)\.nin_shortcut") == {"2.block.0", "4.block.0"}
    assert levels(r"decoder\.up\.(\d)\.attn\.") == {"4"}
    assert levels(r"decoder\.up\.(\d)\.upsample\.") == {"1", "2", "3", "4"}
    assert levels(r"decoder\.up\.(\d\.block\.\d)\.nin_shortcut") == {"1.block.0", "3.block.0"}
    assert levels(r"decoder\.up\.4\.attn\.(\d)\.") == {"0", "1", "2"}
    assert levels(r"decoder\.up\.0\.block\.(\d)\.") == {"0", "1", "2"}


def test_audio_codebook_differs_only_in_channels():
    image = _meta_model(IMAGENET_F16_1024).state_dict()
    audio = _meta_model(VGGSOUND_CODEBOOK).state_dict()
    assert image.keys() == audio.keys()
    differ = {k for k in image if image[k].shape != audio[k].shape}
    assert differ == {"encoder.conv_in.weight", "decoder.conv_out.weight", "decoder.conv_out.bias"}
    assert tuple(audio["encoder.conv_in.weight"].shape) == (128, 1, 3, 3)


def test_official_grids():
    assert IMAGENET_F16_1024.grid(256, 256) == (16, 16)
    assert VGGSOUND_CODEBOOK.grid(80, 848) == (5, 53)
    with pytest.raises(ValueError, match="not divisible"):
        IMAGENET_F16_1024.grid(250, 256)


TINY = VQGANConfig(
    ch=8,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    resolution=16,
    z_channels=8,
    embed_dim=4,
    n_embed=16,
    norm_groups=4,
)


def test_round_trip_shapes_range_and_determinism():
    torch.manual_seed(0)
    model = VQModel(TINY).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    ids = model.encode(x)
    assert ids.shape == (3, 8, 8) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 16
    assert torch.equal(ids, model.encode(x))
    assert model.decode(ids).shape == x.shape
    # The ids are the nearest codebook vectors of the latent (argmin of squared distance).
    z = model.encode_latent(x).permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.cdist(z, model.quantize.embedding.weight).argmin(1)
    assert torch.equal(ids.reshape(-1), brute)


def test_temporal_codec_downsamples_time_only_with_the_same_module_names():
    """The demo's rhythm codec: the mel's bands are the input channels, every kernel is 1x3,
    one id per 2^(levels - 1) frames, and its state dict has the 2-D codec's key names."""
    cfg = dataclasses.replace(TINY, in_channels=6, out_channels=6, temporal=True)
    flat = dataclasses.replace(TINY, in_channels=1, out_channels=1)
    assert cfg.grid(6, 16) == (1, 8) and cfg.sample_channels == 1 and flat.sample_channels == 1
    with pytest.raises(ValueError, match="6 bands"):
        cfg.grid(5, 16)
    with pytest.raises(ValueError, match="downsampling 2"):
        cfg.grid(6, 15)
    torch.manual_seed(0)
    model = VQModel(cfg).eval()
    sd = model.state_dict()
    assert sd.keys() == VQModel(flat).state_dict().keys()
    convs = {k: v.shape for k, v in sd.items() if v.ndim == 4 and v.shape[-1] == 3}
    assert convs and all(shape[-2] == 1 for shape in convs.values())
    assert sd["encoder.conv_in.weight"].shape == (8, 6, 1, 3)
    assert sd["decoder.conv_out.weight"].shape == (6, 8, 1, 3)
    mel = torch.rand(2, 1, 6, 16) * 2 - 1
    ids = model.encode(mel)
    assert ids.shape == (2, 1, 8)
    assert model.decode(ids).shape == mel.shape
    # A band's values reach the ids through the channels: swapping two bands changes them.
    assert not torch.equal(
        model.encode_latent(mel), model.encode_latent(mel[:, :, [1, 0, 2, 3, 4, 5]])
    )


def test_official_nesting_loads_and_bad_files_are_refused(tmp_path):
    torch.manual_seed(1)
    source = VQModel(TINY)
    nested = {
        "state_dict": {
            **source.state_dict(),
            "loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4),
            "loss.perceptual_loss.lin0.model.1.weight": torch.zeros(1, 64, 1, 1),
        },
        "epoch": 39,
        "global_step": 1234,
    }
    path = tmp_path / "last.ckpt"
    torch.save(nested, path)
    state = checkpoint.read_state_dict(path)
    target = VQModel(TINY)
    checkpoint.load_into(target, state, "image VQGAN")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(target.encode(x), source.eval().encode(x))
    assert len(state.sha256) == 64

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint.read_state_dict(truncated)

    missing = dict(nested["state_dict"])
    del missing["quantize.embedding.weight"]
    torch.save({"state_dict": missing}, tmp_path / "missing.ckpt")
    with pytest.raises(
        checkpoint.CheckpointError, match=r"1 missing keys \(e\.g\. quantize\.embedding\.weight\)"
    ):
        checkpoint.load_into(
            VQModel(TINY), checkpoint.read_state_dict(tmp_path / "missing.ckpt"), "image VQGAN"
        )

    other = VQGANConfig(**{**TINY.__dict__, "n_embed": 32})
    with pytest.raises(
        checkpoint.CheckpointError, match="shape mismatches.*quantize.embedding.weight"
    ):
        checkpoint.load_into(VQModel(other), state, "image VQGAN")


def test_unsafe_pickle_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="refused"):
        checkpoint.read_state_dict(path)


def test_melgan_layout_and_count():
    gen = MelGANGenerator()
    sd = gen.state_dict()
    assert _params(gen) == 4_266_050
    convs = sorted({int(m[1]) for k in sd if (m := re.match(r"model\.(\d+)\.weight_v$", k))})
    assert convs == [1, 3, 8, 13, 18, 24]
    blocks = sorted({int(m[1]) for k in sd if (m := re.match(r"model\.(\d+)\.block\.", k))})
    assert blocks == [4, 5, 6, 9, 10, 11, 14, 15, 16, 19, 20, 21]
    assert {k.removeprefix("model.4.") for k in sd if k.startswith("model.4.")} == {
        f"{part}.{leaf}"
        for part in ("block.2", "block.4", "shortcut")
        for leaf in ("weight_g", "weight_v", "bias")
    }
    assert tuple(sd["model.1.weight_v"].shape) == (512, 80, 7)
    assert tuple(sd["model.3.weight_v"].shape) == (512, 256, 16)
    assert tuple(sd["model.24.weight_v"].shape) == (1, 32, 7)
    assert "model.4.shortcut.weight_g" in sd
    assert MelGANConfig().hop_length == 256
    with torch.no_grad():
        wave = gen(torch.rand(1, 80, 20))
    assert wave.shape == (1, 1, 20 * 256) and float(wave.abs().max()) <= 1.0
