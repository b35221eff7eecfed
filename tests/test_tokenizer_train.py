"""pipeline.tokenizers.train (+ lpips, discriminator): training that learns, codebook care,
the adversarial schedule, LPIPS key layout, determinism, importing official checkpoints, reports.

The data is a real extracted set: 4 synthetic classes x (2 train + 1 test) clips rendered by
pipeline.data.synthetic and run through pipeline.data.extract (32x32 frames, 80x128 mels), made
once per module in a few seconds. Models are tiny; the whole file runs in about a minute on 2 cores.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoint import CheckpointError
from pipeline.config import (
    ExtractConfig,
    ModalityTokenizerConfig,
    SyntheticConfig,
    VQGANArch,
    VQGANTrain,
)
from pipeline.data.extract import run_extract
from pipeline.data.manifest import write_manifest
from pipeline.data.synthetic import generate_dataset
from pipeline.errors import PipelineError
from pipeline.tokenizers import lpips as lpips_mod
from pipeline.tokenizers import train as train_mod
from pipeline.tokenizers.discriminator import NLayerDiscriminator
from pipeline.tokenizers.tokenizer import InputSpec, Tokenizer
from pipeline.tokenizers.train import (
    VQGANTrainer,
    build_model,
    check_crop,
    evaluate_tokenizer,
    import_pretrained,
    kmeans,
    load_split,
    random_crops,
    train_tokenizer,
)

CPU = torch.device("cpu")
IMAGE = InputSpec("image", (3, 32, 32))
MEL = InputSpec("mel", (1, 80, 128))
IMAGE_ARCH = VQGANArch(
    ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(), z_channels=32,
    embed_dim=32, n_embed=64, dropout=0.0, norm_groups=8,
)  # fmt: skip
MEL_ARCH = dataclasses.replace(IMAGE_ARCH, ch=8, ch_mult=(1, 1, 2, 4, 8))
TRAIN = VQGANTrain(
    steps=40, batch_size=8, lr=1e-3, beta=0.25, codebook_weight=1.0, disc_start=40,
    disc_weight=0.1, lpips_vgg16="", perceptual_weight=1.0, dead_code_every=10,
    kmeans_init=True, eval_examples=0, crop=(),
)  # fmt: skip


def config(arch: VQGANArch = IMAGE_ARCH, **train) -> ModalityTokenizerConfig:
    return ModalityTokenizerConfig("", arch, dataclasses.replace(TRAIN, **train))


def untrained(modality: str, cfg: ModalityTokenizerConfig, spec: InputSpec, seed: int) -> Tokenizer:
    """The model train_tokenizer starts from (seeded the same way), without a step."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Tokenizer(modality, build_model(cfg, spec), spec, {})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and does not stall when other
    processes hold the cores (two spinning OpenMP threads made a 7-s test take 100 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An extracted set: 8 train and 4 test clips, 10 frames of 32x32, mels of 80x128."""
    root = tmp_path_factory.mktemp("tokdata")
    synth = SyntheticConfig(
        num_classes=4, train_per_class=2, test_per_class=1, width=96, height=72, fps=10,
        sample_rate=22050, duration_s=10.0,
    )  # fmt: skip
    records = generate_dataset(
        synth, root / "clips", seed=0, splits=("train", "test"), classes=(), limit=0,
        previous=[], workers=2,
    )  # fmt: skip
    write_manifest(root / "clips", records)
    extract = ExtractConfig(
        num_frames=10, image_size=32, jpeg_quality=90, sample_rate=22050, clip_seconds=10.0,
        n_fft=1024, hop_length=256, n_mels=80, fmin=125.0, fmax=7600.0, mel_frames=128,
        rows_per_shard=256, workers=2,
    )  # fmt: skip
    summary = run_extract(extract, root / "clips", root / "extract", root / "cache")
    assert summary.counts == {"train": 8, "test": 4}
    return root / "extract"


@pytest.fixture(scope="module")
def trained_image(data: Path, tmp_path_factory: pytest.TempPathFactory):
    report = tmp_path_factory.mktemp("report-image")
    logged: list[tuple[dict, int]] = []
    result = train_tokenizer(
        "image", config(), IMAGE, data, device=CPU, seed=0, report_dir=report,
        log_metrics=lambda m, s: logged.append((m, s)),
    )  # fmt: skip
    return result, report, logged


# ------------------------------------------------------------------------- (a) it learns


def test_trained_image_tokenizer_beats_its_initialisation(data, trained_image, tmp_path):
    result, _, _ = trained_image
    before = evaluate_tokenizer(
        untrained("image", config(), IMAGE, seed=0), data, report_dir=tmp_path
    )
    after = evaluate_tokenizer(result.tokenizer, data, report_dir=tmp_path)
    assert before["psnr"] < 15.5 < after["psnr"], (before, after)
    assert after["examples"] == 4 * 10  # every frame of every test clip


def test_trained_mel_tokenizer_beats_its_initialisation(data, tmp_path):
    cfg = config(MEL_ARCH)
    before = evaluate_tokenizer(untrained("audio", cfg, MEL, seed=0), data, report_dir=tmp_path)
    result = train_tokenizer("audio", cfg, MEL, data, device=CPU, seed=0, report_dir=tmp_path)
    after = evaluate_tokenizer(result.tokenizer, data, report_dir=tmp_path)
    assert after["mel_l1"] < 0.16 < before["mel_l1"], (before, after)
    assert after["mel_l2"] < before["mel_l2"]
    assert result.tokenizer.meta["source"] == "trained" and result.tokenizer.meta["steps"] == 40


def test_the_mel_report_scores_the_rhythm_of_real_mels_and_of_reconstructions(data, tmp_path):
    from pipeline.data.extracted import iter_examples, load_meta
    from pipeline.metrics.rhythm import RhythmScorer

    scores = evaluate_tokenizer(
        untrained("audio", config(MEL_ARCH), MEL, seed=0), data, report_dir=tmp_path
    )
    # The real mels' figures are those of a scorer fit here on every train mel (2 per label).
    mel = load_meta(data)["mel"]
    train = list(iter_examples(data, "train"))
    scorer = RhythmScorer.fit([e.mel for e in train], [e.label for e in train],
                              mel["sample_rate"] / mel["hop_length"])  # fmt: skip
    test = list(iter_examples(data, "test"))
    real = scorer.scores([e.mel for e in test], [e.label for e in test])
    assert scores["acc_rhythm"] == pytest.approx(real["acc_rhythm"])
    assert scores["period_err"] == pytest.approx(real["period_err"])
    # An untrained codec gives back a near-constant mel: no time structure left. (These 1.5-s
    # mels are too short for a period: period_err is 0 for both.)
    assert scores["acc_rhythm_codec"] < scores["acc_rhythm"], scores
    assert "period_err_codec" in scores


def test_a_mel_tokenizer_trained_on_windows_encodes_whole_mels(data, tmp_path, monkeypatch):
    seen = []
    step = VQGANTrainer.step
    monkeypatch.setattr(
        VQGANTrainer, "step", lambda self, x, i: seen.append(x.shape) or step(self, x, i)
    )
    cfg = config(MEL_ARCH, crop=(80, 32))
    before = evaluate_tokenizer(untrained("audio", cfg, MEL, seed=0), data, report_dir=tmp_path)
    result = train_tokenizer("audio", cfg, MEL, data, device=CPU, seed=0, report_dir=tmp_path)
    after = evaluate_tokenizer(result.tokenizer, data, report_dir=tmp_path)
    assert set(seen) == {torch.Size([8, 1, 80, 32])}  # every step on windows ...
    assert after["mel_l1"] < 0.16 < before["mel_l1"], (before, after)  # ... whole mels at test
    assert result.tokenizer.grid == (5, 8)


def test_a_temporal_mel_tokenizer_trains_on_windows_saves_and_loads_with_a_time_only_grid(
    data, tmp_path
):
    arch = dataclasses.replace(MEL_ARCH, ch=16, ch_mult=(1, 1, 1), temporal=True)
    cfg = config(arch, disc_start=30, crop=(80, 64))  # the discriminator's last 10 steps too
    before = evaluate_tokenizer(untrained("audio", cfg, MEL, seed=0), data, report_dir=tmp_path)
    result = train_tokenizer("audio", cfg, MEL, data, device=CPU, seed=0, report_dir=tmp_path)
    tok = result.tokenizer
    after = evaluate_tokenizer(tok, data, report_dir=tmp_path)
    assert after["mel_l1"] < 0.16 < before["mel_l1"], (before, after)
    assert tok.grid == (1, 32) and tok.layout().length == 32  # 128 frames / 4
    assert "g_loss" in result.history[-1], result.history[-1]
    tok.save(tmp_path / "audio")
    again = Tokenizer.load(tmp_path / "audio")
    assert again.model.config.temporal and again.grid == (1, 32)
    mels = load_split(data, "test", MEL)
    assert np.array_equal(again.encode(mels), tok.encode(mels))
    with pytest.raises(PipelineError, match="all 80 mel bands"):
        check_crop((40, 64), MEL, 4, temporal=True)
    with pytest.raises(ValueError, match="for mels"):
        build_model(config(dataclasses.replace(IMAGE_ARCH, temporal=True)), IMAGE)


def test_random_crops_are_windows_of_each_example():
    x = torch.arange(4 * 2 * 6 * 10, dtype=torch.float32).reshape(4, 2, 6, 10)
    out = random_crops(x, (2, 4), torch.Generator().manual_seed(0))
    assert out.shape == (4, 2, 2, 4)
    offsets = set()
    for i in range(4):  # the window's first value gives its offset; the rest must follow it
        top, left = divmod(int(out[i, 0, 0, 0] - x[i, 0, 0, 0]), 10)
        offsets.add((top, left))
        assert torch.equal(out[i], x[i, :, top : top + 2, left : left + 4])
    assert len(offsets) > 1  # each example gets its own offset
    again = random_crops(x, (2, 4), torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert random_crops(x, None, torch.Generator()) is x


def test_crop_must_fit_the_input_and_the_downsampling():
    assert check_crop((), MEL, 16) is None
    assert check_crop((80, 128), MEL, 16) is None  # the whole input
    assert check_crop((80, 32), MEL, 16) == (80, 32)
    with pytest.raises(PipelineError, match="divide by the downsampling factor 16"):
        check_crop((80, 40), MEL, 16)
    with pytest.raises(PipelineError, match="no larger"):
        check_crop((96, 32), MEL, 16)
    with pytest.raises(ValueError, match="crop"):
        dataclasses.replace(TRAIN, crop=(32,))


def test_training_reports_history_and_metrics(trained_image):
    result, report, logged = trained_image
    assert [h["step"] for h in result.history] == [10.0, 20.0, 30.0, 40.0]
    assert [s for _, s in logged] == [10, 20, 30, 40]
    first, last = result.history[0], result.history[-1]
    assert last["rec_loss"] < first["rec_loss"]
    for key in ("loss", "q_loss", "codebook_usage", "perplexity"):
        assert math.isfinite(last[key]) and key in logged[-1][0]
    assert (report / "loss.png").stat().st_size > 1000
    assert not result.tokenizer.model.training
    assert result.tokenizer.meta["final"]["loss"] == pytest.approx(last["loss"])


# --------------------------------------------------------------------- (b) dead codes


@pytest.mark.parametrize("seed", [1, 2])
def test_dead_code_restarts_keep_more_codes_in_use(data, tmp_path, seed):
    # The median over the training windows of the fraction of codes used: one end-of-training
    # evaluation was too noisy (it flipped with a numerically different but equal swish).
    usage = {}
    for every in (0, 5):
        cfg = config(kmeans_init=False, dead_code_every=every, steps=30)
        history = train_tokenizer(
            "image", cfg, IMAGE, data, device=CPU, seed=seed, report_dir=tmp_path
        ).history
        usage[every] = statistics.median(h["codebook_usage"] for h in history)
    assert usage[5] > usage[0] + 0.2, usage


def test_restart_moves_exactly_the_unused_codes_onto_recent_latents():
    torch.manual_seed(0)
    model = build_model(config(), IMAGE)
    trainer = VQGANTrainer(
        model, config().train, total_steps=10, generator=torch.Generator().manual_seed(0)
    )
    trainer.step(torch.rand(4, *IMAGE.shape) * 2 - 1, 0)  # fills `recent` and Adam's moments
    weight = model.quantize.embedding.weight
    before = weight.detach().clone()
    trainer.usage.fill_(1)
    dead = torch.tensor([3, 17, 40])
    trainer.usage[dead] = 0
    assert trainer.restart_dead_codes() == 3
    moved = (weight.detach() != before).any(dim=1)
    assert moved.nonzero().squeeze(1).tolist() == dead.tolist()
    # each restarted code sits next to one of the recent latents (noise is 1% of their spread)
    gap = torch.cdist(weight.detach()[dead], trainer.recent).min(dim=1).values
    assert (gap < 0.1 * trainer.recent.std(0).norm()).all()
    state = trainer.opt.state[weight]
    assert (state["exp_avg"][dead] == 0).all() and (state["exp_avg_sq"][dead] == 0).all()
    assert (trainer.usage == 0).all()  # the window starts again


# --------------------------------------------------------------------------- (c) k-means


def test_kmeans_finds_cluster_centres():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 4, generator=g) * 10
    points = centres.repeat_interleave(200, 0) + 0.1 * torch.randn(1600, 4, generator=g)
    found = kmeans(points, 8, iters=10, generator=torch.Generator().manual_seed(1))
    match = torch.cdist(centres, found).min(dim=1).values
    assert (match < 0.1).all(), match


def test_kmeans_init_puts_the_codebook_on_the_latents(data):
    cfg = config()
    torch.manual_seed(0)
    model = build_model(cfg, IMAGE)
    trainer = VQGANTrainer(
        model, cfg.train, total_steps=1, generator=torch.Generator().manual_seed(0)
    )
    frames = load_split(data, "train", IMAGE)[:, 0]  # (8, 32, 32, 3)
    batch = Tokenizer("image", model, IMAGE, {}).preprocess(frames)
    before, after = trainer.init_codebook([batch])
    assert after < 0.5 * before, (before, after)  # uniform init is far from the latents
    ids = model.encode(batch)
    assert len(ids.unique()) > 16  # codes spread over the latents, not one cluster


# ----------------------------------------------------------------------- (d) discriminator


def test_discriminator_joins_at_disc_start_with_a_finite_adaptive_weight():
    cfg = config(disc_start=3, dead_code_every=0)
    torch.manual_seed(0)
    trainer = VQGANTrainer(
        build_model(cfg, IMAGE), cfg.train, total_steps=6,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert isinstance(trainer.disc, NLayerDiscriminator)
    initial = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    x = torch.rand(4, *IMAGE.shape) * 2 - 1
    for step in range(6):
        out = trainer.step(x, step)
        same = all(torch.equal(v, initial[k]) for k, v in trainer.disc.state_dict().items())
        assert same == (step < 3), step
        assert ("d_loss" in out) == (step >= 3) and ("g_loss" in out) == (step >= 3)
        if step >= 3:
            assert torch.isfinite(out["d_weight"]) and out["d_weight"] > 0
            assert torch.isfinite(out["d_loss"])


def test_no_discriminator_is_built_when_it_would_never_start():
    cfg = config(disc_start=5)
    trainer = VQGANTrainer(
        build_model(cfg, IMAGE), cfg.train, total_steps=5, generator=torch.Generator()
    )
    assert trainer.disc is None and trainer.opt_d is None


def test_discriminator_keys_follow_taming():
    keys = NLayerDiscriminator(3).state_dict()
    assert keys["main.0.weight"].shape == (64, 3, 4, 4) and "main.0.bias" in keys
    assert keys["main.2.weight"].shape == (128, 64, 4, 4) and "main.2.bias" not in keys
    assert keys["main.3.running_mean"].shape == (128,)
    assert keys["main.8.weight"].shape == (512, 256, 4, 4)
    assert keys["main.11.weight"].shape == (1, 512, 4, 4)


# -------------------------------------------------------------------------------- (e) LPIPS

VGG_CONVS = {  # net.sliceK.N (torchvision vgg16.features index N) -> (out, in)
    "slice1.0": (64, 3), "slice1.2": (64, 64), "slice2.5": (128, 64), "slice2.7": (128, 128),
    "slice3.10": (256, 128), "slice3.12": (256, 256), "slice3.14": (256, 256),
    "slice4.17": (512, 256), "slice4.19": (512, 512), "slice4.21": (512, 512),
    "slice5.24": (512, 512), "slice5.26": (512, 512), "slice5.28": (512, 512),
}  # fmt: skip


def test_lpips_key_layout_matches_taming():
    state = lpips_mod.LPIPS().state_dict()
    expected = {"scaling_layer.shift": (1, 3, 1, 1), "scaling_layer.scale": (1, 3, 1, 1)}
    for name, (out, cin) in VGG_CONVS.items():
        expected[f"net.{name}.weight"] = (out, cin, 3, 3)
        expected[f"net.{name}.bias"] = (out,)
    for k, c in enumerate((64, 128, 256, 512, 512)):
        expected[f"lin{k}.model.1.weight"] = (1, c, 1, 1)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_load_lpips_reads_a_taming_style_file_strictly(tmp_path):
    torch.manual_seed(0)
    source = lpips_mod.LPIPS()
    for k in range(5):  # real LPIPS lin weights are non-negative
        getattr(source, f"lin{k}").model[1].weight.data.abs_()
    state = {f"loss.perceptual_loss.{k}": v for k, v in source.state_dict().items()}
    state["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    path = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": state}, path)

    model = lpips_mod.load_lpips(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model(x, x).abs().max() == 0
    assert (model(x, y) > 0).all() and model(x, y).shape == (2, 1, 1, 1)

    del state["loss.perceptual_loss.lin3.model.1.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="missing"):
        lpips_mod.load_lpips(path)


# ---------------------------------------------------------------------- (f) determinism


def test_same_seed_gives_the_same_weights(data, tmp_path):
    cfg = config(steps=4, disc_start=2, dead_code_every=2)  # every code path once

    def weights(seed: int, global_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)  # the run must not depend on the global RNG
        result = train_tokenizer(
            "image", cfg, IMAGE, data, device=CPU, seed=seed, report_dir=tmp_path
        )
        return result.tokenizer.model.state_dict()

    a, b, c = weights(3, global_seed=1), weights(3, global_seed=2), weights(4, global_seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------------------- (g) import


def test_import_pretrained_loads_an_official_nesting(tmp_path):
    cfg = config()
    torch.manual_seed(5)
    source = build_model(cfg, IMAGE).eval()
    state = dict(source.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "global_step": 7}, path)

    tok = import_pretrained("image", dataclasses.replace(cfg, pretrained=str(path)), IMAGE)
    assert tok.meta["source"] == "pretrained" and tok.meta["pretrained_path"] == str(path)
    assert len(tok.meta["pretrained_sha256"]) == 64
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    reference = Tokenizer("image", source, IMAGE, {})
    np.testing.assert_array_equal(tok.encode(frames), reference.encode(frames))

    broken = dict(state)
    del broken["quantize.embedding.weight"]
    torch.save({"state_dict": broken}, path)
    with pytest.raises(CheckpointError, match="missing"):
        import_pretrained("image", dataclasses.replace(cfg, pretrained=str(path)), IMAGE)
    reshaped = dict(state)
    reshaped["quantize.embedding.weight"] = torch.zeros(32, 32)
    torch.save({"state_dict": reshaped}, path)
    with pytest.raises(CheckpointError, match="shape"):
        import_pretrained("image", dataclasses.replace(cfg, pretrained=str(path)), IMAGE)
    with pytest.raises(CheckpointError, match="empty"):
        import_pretrained("image", cfg, IMAGE)


# -------------------------------------------------------------------------- (h) evaluation


def test_evaluate_writes_pictures_and_returns_metrics_in_range(data, trained_image, tmp_path):
    result, _, _ = trained_image
    metrics = evaluate_tokenizer(result.tokenizer, data, max_examples=2, report_dir=tmp_path)
    assert (tmp_path / "reconstructions.png").stat().st_size > 1000
    assert metrics["examples"] == 2 * 10
    assert 0 < metrics["codebook_usage"] <= 1
    assert 1 <= metrics["perplexity"] <= IMAGE_ARCH.n_embed
    assert 0 < metrics["psnr"] < 100
    assert set(metrics) == {"psnr", "codebook_usage", "perplexity", "examples"}


def test_evaluate_mels_and_shape_mismatch(data, tmp_path):
    tok = untrained("audio", config(MEL_ARCH), MEL, seed=0)
    metrics = evaluate_tokenizer(tok, data, report_dir=tmp_path)
    assert set(metrics) == {"mel_l1", "mel_l2", "codebook_usage", "perplexity", "examples",
                            "acc_rhythm", "period_err", "acc_rhythm_codec", "period_err_codec"}  # fmt: skip
    assert 0 < metrics["mel_l2"] <= metrics["mel_l1"] <= 1
    assert (tmp_path / "reconstructions.png").stat().st_size > 1000
    with pytest.raises(PipelineError, match="80x128"):
        load_split(data, "train", InputSpec("mel", (1, 80, 848)))


def test_a_split_too_large_for_memory_is_refused_before_loading(data, monkeypatch):
    assert load_split(data, "train", IMAGE).shape == (8, 10, 32, 32, 3)
    monkeypatch.setattr(train_mod, "MAX_IN_MEMORY_BYTES", 8 * 10 * 32 * 32 * 3 - 1)
    with pytest.raises(PipelineError, match="pretrained"):
        load_split(data, "train", IMAGE)
