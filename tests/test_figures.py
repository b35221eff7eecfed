"""pipeline.training.figures: one-step masked prediction, Fig. 5 reconstructions, loss curves.

Everything is real and tiny: random-init VQGAN tokenizers (image 3x12x12 -> 3x3 ids, mel 8x24 ->
2x6 ids, C 16), a one-block transformer on that layout, and a 4-clip TokenSplit of random ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from pipeline.config import ModelConfig, VQGANArch
from pipeline.data.token_dataset import TokenSplit
from pipeline.masking import MaskedBatch, apply_mask, mask_fixed_ratio
from pipeline.models.transformer import AudioVisualTransformer
from pipeline.tokenizers.layout import MODALITIES, ModalityLayout, TokenLayout
from pipeline.tokenizers.tokenizer import InputSpec, Tokenizer, vqgan_config
from pipeline.tokenizers.vqgan import VQModel
from pipeline.training.figures import (
    MASK_FACE,
    loss_figure,
    make_reconstruction,
    predict_masked,
    reconstruction_figure,
)

C = 16
LAYOUT = TokenLayout(ModalityLayout("audio", C, (2, 6)), ModalityLayout("image", C, (3, 3)))
ARCH = VQGANArch(
    ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8, embed_dim=8,
    n_embed=C, dropout=0.0, norm_groups=8,
)  # fmt: skip
SPECS = {"image": InputSpec("image", (3, 12, 12)), "audio": InputSpec("mel", (1, 8, 24))}
MODEL = ModelConfig(
    embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
    decoder_num_heads=2, mlp_ratio=2, dropout=0.0, attn_dropout=0.0,
    detach_head_embedding=True, activation_checkpointing=False,
)  # fmt: skip
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast and does not spin while other processes hold
    the cores (as in test_tokenizer_train)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    torch.manual_seed(0)
    return {
        m: Tokenizer(m, VQModel(vqgan_config(ARCH, spec)), spec, {"source": "random-init"})
        for m, spec in SPECS.items()
    }


@pytest.fixture(scope="module")
def model() -> AudioVisualTransformer:
    torch.manual_seed(1)
    return AudioVisualTransformer(MODEL, LAYOUT)


@pytest.fixture(scope="module")
def split() -> TokenSplit:
    g = torch.Generator().manual_seed(2)
    n, frames = 4, 3
    return TokenSplit(
        [f"clip{i}" for i in range(n)],
        ["dog barking", "playing acoustic guitar", "rain on a tin roof", "engine"],
        torch.randint(C, (n, frames, LAYOUT.image.length), generator=g, dtype=torch.int32),
        torch.randint(C, (n, LAYOUT.audio.length), generator=g, dtype=torch.int32),
    )


def _batch(split: TokenSplit, n: int, seed: int = 0, ratio: float = 0.5) -> MaskedBatch:
    return mask_fixed_ratio(
        LAYOUT, split.eval_batch(0, n), ratio, torch.Generator().manual_seed(seed)
    )


def test_tokenizer_grids_match_layout(tokenizers):
    for m in MODALITIES:
        assert tokenizers[m].grid == LAYOUT.modality(m).grid


@pytest.mark.parametrize("training", [True, False])
def test_predict_masked_keeps_targets_and_restores_mode(model, split, training):
    batch = _batch(split, 4)
    model.train(training)
    predicted = predict_masked(model, batch, "cpu")
    assert model.training is training

    model.eval()
    with torch.no_grad():
        logits = model(batch.inputs["audio"], batch.inputs["image"])
    for m in MODALITIES:
        ids, masked, targets = predicted[m], batch.masked[m], batch.targets[m]
        assert ids.dtype == torch.int64 and ids.device.type == "cpu"
        assert ids.shape == targets.shape
        assert masked.any() and (~masked).any()
        assert torch.equal(ids[~masked], targets[~masked])
        assert torch.equal(ids[masked], logits[m].argmax(-1)[masked])
        assert int(ids.min()) >= 0 and int(ids.max()) < LAYOUT.modality(m).codebook_size


def test_reconstruction_figure_grows_with_examples(tokenizers, model, split, tmp_path):
    shapes = {}
    for n in (1, 3):
        batch = _batch(split, n)
        path = tmp_path / f"rec{n}.png"
        out = reconstruction_figure(
            tokenizers, LAYOUT, batch, predict_masked(model, batch, "cpu"), path,
            labels=split.labels[:n], title=f"{n} examples",
        )  # fmt: skip
        assert out == path
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        pixels = imread(path)
        assert pixels.std() > 0  # something was drawn
        shapes[n] = pixels.shape
    assert shapes[3][0] > shapes[1][0]  # one row per example
    assert shapes[3][1] == shapes[1][1]  # the six columns do not depend on the count
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic write left no temporary behind


def test_masked_cells_are_greyed(tokenizers, split, tmp_path):
    """All cells masked vs none, same ids: the covered picture is mostly the mask grey."""
    ids = split.eval_batch(0, 2)
    ratios = {m: torch.zeros(2, dtype=torch.float64) for m in MODALITIES}
    grey = {}
    for name, value in (("none", False), ("all", True)):
        masked = {m: torch.full_like(ids[m], value, dtype=torch.bool) for m in MODALITIES}
        batch = apply_mask(LAYOUT, ids, masked, ratios, None)
        path = reconstruction_figure(tokenizers, LAYOUT, batch, ids, tmp_path / f"{name}.png")
        rgb = imread(path)[..., :3]
        grey[name] = int((np.abs(rgb - float(MASK_FACE)) < 1.5 / 255).all(-1).sum())
    # Two rows of one image panel and one mel panel, each roughly 130 px high.
    assert grey["all"] > 20_000 > 10 * grey["none"]


def test_reconstruction_figure_rejects_mismatches(tokenizers, model, split, tmp_path):
    batch = _batch(split, 2)
    predicted = predict_masked(model, batch, "cpu")
    swapped = {"audio": tokenizers["image"], "image": tokenizers["audio"]}
    with pytest.raises(ValueError, match="grid"):
        reconstruction_figure(swapped, LAYOUT, batch, predicted, tmp_path / "a.png")
    with pytest.raises(ValueError, match="labels"):
        reconstruction_figure(tokenizers, LAYOUT, batch, predicted, tmp_path / "b.png", ["x"])
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()


def test_make_reconstruction_is_deterministic(tokenizers, model, split, tmp_path):
    def draw(name: str, seed: int) -> bytes:
        path = make_reconstruction(
            model, split, LAYOUT, tokenizers, tmp_path / name, examples=2, ratio=0.5,
            seed=seed, device="cpu", title="step 0",
        )  # fmt: skip
        return Path(path).read_bytes()

    first = draw("a.png", seed=0)
    assert draw("b.png", seed=0) == first
    # Another seed masks other cells: the masked column (and the prediction) must change.
    assert draw("c.png", seed=1) != first
    # More clips than the split has: all of them, one row each.
    many = make_reconstruction(
        model, split, LAYOUT, tokenizers, tmp_path / "all.png", examples=10, ratio=0.5,
        seed=0, device="cpu",
    )  # fmt: skip
    assert imread(many).shape[0] > imread(tmp_path / "a.png").shape[0]


def test_loss_figure_tolerates_missing_keys(tmp_path):
    rows = [{"step": s, "loss": 5.0 - 0.1 * s} for s in range(10)]
    for row in rows[::3]:
        row["val/loss"] = 4.0 - 0.05 * row["step"]
    rows.append({"step": 10})  # a row with neither key

    both = loss_figure(rows, tmp_path / "both.png", ["loss", "val/loss", "absent"], title="t")
    only = loss_figure(rows, tmp_path / "only.png", ["loss"], title="t")
    for path in (both, only):
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        assert imread(path).ndim == 3
    # The sparse key is drawn (the pictures differ), and the same input gives the same bytes.
    assert both.read_bytes() != only.read_bytes()
    again = loss_figure(rows, tmp_path / "again.png", ["loss"], title="t")
    assert again.read_bytes() == only.read_bytes()
    empty = imread(loss_figure([], tmp_path / "empty.png", ["loss"]))
    assert empty.shape == imread(only).shape
    assert not np.array_equal(empty, imread(only))
