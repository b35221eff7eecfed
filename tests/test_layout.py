"""TokenLayout: the one place that knows codebook sizes, grids, mask ids and sequence order."""

import pytest

from pipeline.tokenizers.layout import ModalityLayout, TokenLayout

PAPER = TokenLayout(ModalityLayout("audio", 1024, (5, 53)), ModalityLayout("image", 1024, (16, 16)))


def test_paper_layout():
    assert PAPER.audio.length == 265 and PAPER.image.length == 256
    assert PAPER.seq_len == 521
    assert PAPER.audio.mask_id == 1024 and PAPER.audio.vocab_size == 1025
    assert PAPER.span("audio") == slice(0, 265)
    assert PAPER.span("image") == slice(265, 521)


def test_round_trip_and_checks():
    demo = TokenLayout(
        ModalityLayout("audio", 256, (5, 53)), ModalityLayout("image", 512, (16, 16))
    )
    data = demo.to_dict()
    assert data["image"]["mask_id"] == 512 and data["order"] == ["audio", "image"]
    assert TokenLayout.from_dict(data) == demo
    data["image"]["mask_id"] = 0
    with pytest.raises(ValueError, match="mask id"):
        TokenLayout.from_dict(data)
    with pytest.raises(ValueError, match="unknown modality"):
        ModalityLayout("video", 8, (1, 1))
    with pytest.raises(ValueError, match="audio and an image"):
        TokenLayout(PAPER.image, PAPER.audio)
