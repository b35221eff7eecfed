"""pipeline.models.transformer and pipeline.training.objective on tiny configs (CPU)."""

import dataclasses
import math

import pytest
import torch

from pipeline.config import MaskingConfig, ModelConfig
from pipeline.masking import mask_for_training
from pipeline.models import AudioVisualTransformer, count_parameters
from pipeline.profiles import paper_params
from pipeline.tokenizers.layout import ModalityLayout, TokenLayout
from pipeline.training.objective import compute_loss

TINY = ModelConfig(
    embed_dim=32,
    depth=2,
    num_heads=4,
    decoder_embed_dim=24,
    decoder_depth=1,
    decoder_num_heads=2,
    mlp_ratio=2.0,
    dropout=0.0,
    attn_dropout=0.0,
    detach_head_embedding=True,
    activation_checkpointing=False,
)
LAYOUT = TokenLayout(ModalityLayout("audio", 16, (2, 6)), ModalityLayout("image", 12, (3, 3)))
MASKING = MaskingConfig(mean=0.7, std=0.25, low=0.2, high=1.0, drop_ratio=0.5)


def _model(cfg: ModelConfig = TINY, seed: int = 0) -> AudioVisualTransformer:
    torch.manual_seed(seed)
    return AudioVisualTransformer(cfg, LAYOUT)


def _ids(batch: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "audio": torch.randint(0, 16, (batch, 12), generator=g),
        "image": torch.randint(0, 12, (batch, 9), generator=g),
    }


def _batch(seed: int = 0, batch: int = 4):
    return mask_for_training(
        LAYOUT, _ids(batch, seed), MASKING, torch.Generator().manual_seed(seed)
    )


def test_paper_config_is_407m_parameters_within_one_percent():
    paper = TokenLayout(
        ModalityLayout("audio", 1024, (5, 53)), ModalityLayout("image", 1024, (16, 16))
    )
    with torch.device("meta"):
        model = AudioVisualTransformer(paper_params().model, paper)
    n = count_parameters(model)
    # docs/references.md, "The transformer's size and cost": 407,309,313 with one shared 1025-row vocabulary; separate per-modality
    # tables (the spec) add 1024 x 1025 + 1023 = 1,050,623.
    assert n == 407_309_313 + 1_050_623
    assert abs(n - 407.3e6) / 407.3e6 < 0.01
    block = model.encoder.blocks[0]
    assert count_parameters(block) == 12 * 1024**2 + 13 * 1024


def test_shapes_with_and_without_drop():
    model = _model()
    batch = _batch()
    for keep in (batch.keep, None):
        logits = model(batch.inputs["audio"], batch.inputs["image"], keep)
        assert logits["audio"].shape == (4, 12, 16) and logits["image"].shape == (4, 9, 12)


def test_keep_with_unequal_rows_is_rejected():
    model = _model()
    keep = torch.ones(2, 21, dtype=torch.bool)
    keep[0, :3] = False
    with pytest.raises(RuntimeError):
        model(_ids(2)["audio"], _ids(2)["image"], keep)


def test_logits_are_tied_to_the_embedding_tables():
    model = _model()
    with torch.no_grad():
        model.token_embed["audio"].weight[3].mul_(0.0)
        model.head_bias["audio"].zero_()
    la = model(_ids(2)["audio"], _ids(2)["image"])["audio"]
    assert torch.allclose(la[..., 3], torch.zeros_like(la[..., 3]), atol=1e-6)
    # The [MASK] row (index C) is never a class.
    assert la.shape[-1] == LAYOUT.audio.codebook_size


@pytest.mark.parametrize("detach", [True, False])
def test_head_detach_switch_controls_the_gradient_through_the_output(detach):
    model = _model(dataclasses.replace(TINY, detach_head_embedding=detach))
    # Inputs without code 5 in audio: any gradient on its embedding row comes from the output.
    ids = _ids(2)
    ids["audio"] = torch.where(ids["audio"] == 5, 6, ids["audio"])
    la = model(ids["audio"], ids["image"])["audio"]
    la[..., 5].sum().backward()
    grad = model.token_embed["audio"].weight.grad[5]
    assert (grad.abs().sum() == 0) == detach


def test_every_parameter_gets_a_gradient_in_training():
    model = _model()
    loss, _ = compute_loss(model, _batch(), smoothing=0.1)
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert unused == []


def test_loss_counts_masked_positions_only():
    model = _model()
    batch = _batch(seed=3)
    loss, _ = compute_loss(model, batch, smoothing=0.1)
    for m in ("audio", "image"):
        changed = {k: v.clone() for k, v in batch.targets.items()}
        unmasked = (~batch.masked[m]).nonzero()[0]
        changed[m][tuple(unmasked)] = (changed[m][tuple(unmasked)] + 1) % 12
        same = dataclasses.replace(batch, targets=changed)
        assert torch.equal(compute_loss(model, same, 0.1)[0], loss)
        masked = batch.masked[m].nonzero()[0]
        changed[m][tuple(masked)] = (changed[m][tuple(masked)] + 1) % 12
        other = dataclasses.replace(batch, targets=changed)
        assert not torch.equal(compute_loss(model, other, 0.1)[0], loss)


def test_activation_checkpointing_gives_the_same_gradients():
    plain, ckpt = _model(), _model(dataclasses.replace(TINY, activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    batch = _batch(seed=4)
    for model in (plain, ckpt):
        compute_loss(model, batch, 0.1)[0].backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_tiny_model_overfits_one_batch():
    # Without the detach the output side trains the tables too, and memorising is quick.
    model = _model(dataclasses.replace(TINY, detach_head_embedding=False))
    batch = _batch(seed=5, batch=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(100):
        loss, _ = compute_loss(model, batch, smoothing=0.0)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Untrained: about ln 16 + ln 12 = 5.26 (uniform guesses). Memorised: far below.
    assert first > 0.8 * (math.log(16) + math.log(12))
    assert float(loss.detach()) < 0.5


def test_paper_training_flops_match_the_reference_count():
    from pipeline.models.flops import flops_per_sample

    paper = TokenLayout(
        ModalityLayout("audio", 1024, (5, 53)), ModalityLayout("image", 1024, (16, 16))
    )
    model = paper_params().model
    flops = flops_per_sample(model, paper, drop_ratio=0.5)
    # docs/references.md, "The transformer's size and cost": encoder 164.3 GF (at 261 kept tokens; we keep 260), decoder 113.8 GF,
    # head 2.7 GF, training about 843 GF per sample.
    assert flops.decoder / 1e9 == pytest.approx(113.8, rel=1e-3)
    assert flops.encoder / 1e9 == pytest.approx(164.3, rel=0.01)
    assert flops.training / 1e9 == pytest.approx(843, rel=0.01)
    assert flops_per_sample(model, paper, 0.0).forward / 1e9 == pytest.approx(458, rel=0.01)


def test_a_modality_with_nothing_masked_adds_no_loss():
    """A batch whose samples all show the audio (conditional audio->image samples): the audio
    term is 0, not NaN, and the backward pass still runs."""
    model = _model()
    batch = _batch()
    batch.masked["audio"].zero_()
    loss, parts = compute_loss(model, batch, 0.1)
    assert parts["loss_audio"] == 0 and parts["acc_audio"] == 0
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
