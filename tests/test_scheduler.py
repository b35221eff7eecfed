"""pipeline.inference.scheduler and tasks: iterative unmasking, guidance, the five tasks."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.inference.scheduler import (
    Unmasker,
    UnmaskingScheduler,
    guided,
    lowest,
    remask_count,
)
from pipeline.inference.tasks import TASKS, grid_region, task, time_columns
from pipeline.masking import cosine_schedule
from pipeline.models import AudioVisualTransformer
from pipeline.tokenizers.layout import ModalityLayout, TokenLayout

LAYOUT = TokenLayout(ModalityLayout("audio", 16, (2, 6)), ModalityLayout("image", 12, (3, 3)))
TINY = ModelConfig(
    embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
    decoder_num_heads=2, mlp_ratio=2.0, dropout=0.0, attn_dropout=0.0,
    detach_head_embedding=True, activation_checkpointing=False,
)  # fmt: skip


def _model(seed: int = 0) -> AudioVisualTransformer:
    torch.manual_seed(seed)
    return AudioVisualTransformer(TINY, LAYOUT).eval()


def _ids(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "audio": torch.randint(0, 16, (batch, 12), generator=g),
        "image": torch.randint(0, 12, (batch, 9), generator=g),
    }


def _run(name: str, steps=6, temperature=4.5, guidance=3.0, seed=0, on_step=None, **kw):
    spec = task(name, LAYOUT, **kw)
    unmasker = Unmasker(_model(), LAYOUT, UnmaskingScheduler(steps, temperature, guidance))
    ids = _ids(3)
    out = unmasker.run(
        ids, spec.batch_known(3, torch.device("cpu")), torch.Generator().manual_seed(seed),
        spec.condition, on_step,
    )  # fmt: skip
    return ids, spec, out


@pytest.mark.parametrize("name", ["image2audio", "audio2image", "cogenerate"])
def test_every_target_is_filled_and_known_ids_never_change(name):
    seen = []
    ids, spec, out = _run(
        name, on_step=lambda s, t: seen.append({m: v.clone() for m, v in t.items()})
    )
    assert len(seen) == 6
    for m in ("audio", "image"):
        known = spec.known[m]
        c = LAYOUT.modality(m).codebook_size
        assert torch.all((out[m] >= 0) & (out[m] < c))
        for tokens in seen:
            assert torch.equal(tokens[m][:, known], ids[m][:, known])
        assert torch.equal(out[m][:, known], ids[m][:, known])


def test_masked_count_follows_the_cosine_schedule():
    counts = []
    _run("image2audio", steps=5, on_step=lambda s, t: counts.append(
        int((t["audio"][0] == LAYOUT.audio.mask_id).sum())
    ))  # fmt: skip
    expected = [max(1, math.floor(12 * float(cosine_schedule((s + 1) / 5)))) for s in range(4)]
    assert counts == [*expected, 0]
    assert counts == sorted(counts, reverse=True)


def test_decided_tokens_stay_decided():
    history = []
    _run("cogenerate", steps=6, on_step=lambda s, t: history.append(t["audio"].clone()))
    mask_id = LAYOUT.audio.mask_id
    for before, after in zip(history, history[1:], strict=False):
        fixed = before != mask_id
        assert torch.equal(after[fixed], before[fixed])


def test_same_seed_same_ids_other_seed_other_ids():
    _, _, one = _run("image2audio", seed=1)
    _, _, two = _run("image2audio", seed=1)
    _, _, three = _run("image2audio", seed=2)
    assert torch.equal(one["audio"], two["audio"])
    assert not torch.equal(one["audio"], three["audio"])


class FixedLogits(nn.Module):
    """Logits that do not depend on the input: position i of the audio strongly prefers code 0
    with a strength growing with i, so its confidence grows with i."""

    def forward(self, audio_ids, image_ids):
        b = audio_ids.shape[0]
        la = torch.zeros(b, 12, 16)
        la[..., 0] = torch.arange(12, dtype=torch.float32)
        return {"audio": la, "image": torch.zeros(b, 9, 12)}


def test_temperature_zero_keeps_the_most_confident_tokens():
    unmasker = Unmasker(FixedLogits(), LAYOUT, UnmaskingScheduler(4, 0.0, 1.0))
    spec = task("image2audio", LAYOUT)
    first = []
    unmasker.run(
        _ids(2), spec.batch_known(2, torch.device("cpu")), torch.Generator().manual_seed(0),
        None, lambda s, t: first.append(t["audio"].clone()) if s == 0 else None,
    )  # fmt: skip
    still = first[0] == LAYOUT.audio.mask_id
    n_masked = remask_count(0, 4, torch.tensor([12]), torch.tensor([12])).item()
    # The least confident (lowest positions) are the ones masked again.
    assert still[:, :n_masked].all() and not still[:, n_masked:].any()


def test_lowest_picks_exactly_count_positions():
    conf = torch.tensor([[0.3, -1.0, 2.0, torch.inf], [1.0, 1.0, 1.0, 0.0]])
    picked = lowest(conf, torch.tensor([2, 1]))
    assert picked.tolist() == [[True, True, False, False], [False, False, False, True]]


def test_remask_count_bounds():
    u = torch.tensor([10, 10, 1])
    assert remask_count(0, 10, u, torch.tensor([10, 2, 1])).tolist() == [9, 1, 0]
    assert remask_count(9, 10, u, u).tolist() == [0, 0, 0]


def test_guidance_of_one_equals_the_conditional_logits():
    model = _model()
    spec = task("image2audio", LAYOUT)
    ids = _ids(2)
    tokens = {"audio": torch.full_like(ids["audio"], LAYOUT.audio.mask_id), "image": ids["image"]}
    plain = Unmasker(model, LAYOUT, UnmaskingScheduler(4, 1.0, 1.0)).logits(tokens, spec.condition)
    direct = model(tokens["audio"], tokens["image"])
    assert all(torch.allclose(plain[m], direct[m]) for m in ("audio", "image"))


def test_batched_guidance_equals_two_separate_passes():
    model = _model()
    ids = _ids(2)
    tokens = {"audio": torch.full_like(ids["audio"], LAYOUT.audio.mask_id), "image": ids["image"]}
    out = Unmasker(model, LAYOUT, UnmaskingScheduler(4, 1.0, 3.0)).logits(tokens, "image")
    cond = model(tokens["audio"], tokens["image"])["audio"]
    blank = torch.full_like(ids["image"], LAYOUT.image.mask_id)
    uncond = model(tokens["audio"], blank)["audio"]
    assert torch.allclose(out["audio"], 3 * cond - 2 * uncond, atol=1e-5)
    assert torch.allclose(guided(cond, uncond, 3.0), 3 * cond - 2 * uncond, atol=1e-6)
    assert not torch.allclose(cond, uncond)  # the condition matters, so the check can fail


def test_audio_inpainting_keeps_everything_outside_the_span():
    ids, spec, out = _run("inpaint_audio", audio_span=(0.25, 0.6))
    hole = ~spec.known["audio"]
    cols = time_columns(LAYOUT.audio, 0.25, 0.6)
    assert cols == (1, 4)
    assert hole.view(2, 6)[:, 1:4].all() and hole.sum() == 6
    assert torch.equal(out["audio"][:, ~hole], ids["audio"][:, ~hole])
    assert torch.equal(out["image"], ids["image"])
    assert not torch.equal(out["audio"][:, hole], ids["audio"][:, hole])


def test_image_inpainting_keeps_everything_outside_the_box():
    ids, spec, out = _run("inpaint_image", image_box=((0, 2), (1, 3)))
    hole = ~spec.known["image"]
    assert hole.view(3, 3).tolist() == [[False, True, True], [False, True, True], [False] * 3]
    assert torch.equal(out["image"][:, ~hole], ids["image"][:, ~hole])
    assert torch.equal(out["audio"], ids["audio"])


def test_task_specs():
    assert set(TASKS) == {"image2audio", "audio2image", "cogenerate", "inpaint_audio",
                          "inpaint_image"}  # fmt: skip
    assert task("cogenerate", LAYOUT).condition is None
    assert task("audio2image", LAYOUT).condition == "audio"
    assert grid_region(LAYOUT.image, None, (2, 3)).sum() == 3
    with pytest.raises(ValueError, match="unknown task"):
        task("paint", LAYOUT)
    with pytest.raises(ValueError):
        time_columns(LAYOUT.audio, 0.5, 0.5)
    assert dataclasses.is_dataclass(task("image2audio", LAYOUT))


def test_drop_ratio_hides_half_of_each_modality_from_the_encoder_reproducibly():
    """generate.drop_ratio 0.5: each call of the model gets a `keep` with ceil-half of each
    modality dropped, drawn from the run's generator (same seed, same drops, same output)."""
    seen = []

    class Recorder(nn.Module):
        def forward(self, audio_ids, image_ids, keep=None):
            seen.append(keep)
            b = audio_ids.shape[0]
            return {"audio": torch.randn(b, 12, 16), "image": torch.randn(b, 9, 12)}

    def run(seed):
        torch.manual_seed(0)
        unmasker = Unmasker(Recorder(), LAYOUT, UnmaskingScheduler(3, 1.0, 3.0, drop_ratio=0.5))
        spec = task("image2audio", LAYOUT)
        return unmasker.run(
            _ids(2), spec.batch_known(2, torch.device("cpu")),
            torch.Generator().manual_seed(seed), spec.condition,
        )  # fmt: skip

    first = run(7)
    assert len(seen) == 3
    for keep in seen:
        assert keep.shape == (4, 12 + 9)  # CFG: conditional + unconditional rows
        assert (keep[:, :12].sum(1) == 6).all() and (keep[:, 12:].sum(1) == 4).all()
    assert not torch.equal(seen[0], seen[1])
    again = run(7)
    assert all(torch.equal(a, b) for a, b in zip(seen[:3], seen[3:6], strict=True))
    assert torch.equal(first["audio"], again["audio"])
