"""pipeline.training: sampler, schedule, precision, the plain loop (resume equality) and the
Ray Train stage with 2 CPU workers (slow)."""

import dataclasses
import itertools
import math
import re
from pathlib import Path

import pytest
import torch

from pipeline.config import load_params
from pipeline.data.token_dataset import StepSampler, TokenSplit, eval_frame
from pipeline.data.tokens import load_token_meta
from pipeline.devices import choose_precision
from pipeline.errors import PipelineError
from pipeline.models.transformer import AudioVisualTransformer
from pipeline.training.loop import FolderEnvironment, TrainError, TrainJob, run_training
from pipeline.training.optim import lr_factor, param_groups, peak_lr

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "params.yaml")
TINY_MODEL = dataclasses.replace(
    PARAMS.model,
    embed_dim=32,
    depth=2,
    num_heads=2,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
    dropout=0.1,
    attn_dropout=0.1,
)
TINY_TRAIN = dataclasses.replace(
    PARAMS.train,
    steps=12,
    batch_size=8,
    base_lr=0.05,
    warmup_steps=3,
    log_every=3,
    eval_every=6,
    checkpoint_every=4,
    num_workers=0,
)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, make_token_dir) -> Path:
    return make_token_dir(tmp_path_factory.mktemp("tokens"))


def _job(tokens: Path, **train) -> TrainJob:
    layout, _ = load_token_meta(tokens)
    cfg = dataclasses.replace(TINY_TRAIN, **train)
    return TrainJob(TINY_MODEL, cfg, layout.to_dict(), str(tokens), seed=7, fingerprint="f")


# ----------------------------------------------------------------------------- data, schedule


def test_sampler_depends_only_on_the_step_and_covers_each_epoch(tokens):
    split = TokenSplit.load(tokens, "train")
    n = len(split)
    one, two = StepSampler(n, 8, 1, 0, seed=3), StepSampler(n, 8, 1, 0, seed=3)
    assert torch.equal(one.indices(5), two.indices(5))
    assert torch.equal(
        one.batch(split, 7)["image"], StepSampler(n, 8, 1, 0, 3).batch(split, 7)["image"]
    )
    epoch = torch.cat([one.indices(s) for s in range(n // 8)])
    assert sorted(epoch.tolist()) == list(range(n))
    assert not torch.equal(epoch, torch.cat([one.indices(s) for s in range(n // 8, 2 * n // 8)]))


def test_workers_split_the_global_batch(tokens):
    n = len(TokenSplit.load(tokens, "train"))
    single = StepSampler(n, 8, 1, 0, seed=1).indices(2)
    ranks = [StepSampler(n, 8, 2, r, seed=1).indices(2) for r in (0, 1)]
    assert torch.equal(torch.cat(ranks), single)


def test_frames_are_drawn_per_step_and_eval_uses_the_middle_frame(tokens):
    split = TokenSplit.load(tokens, "train")
    sampler = StepSampler(len(split), 8, 1, 0, seed=0)
    index = sampler.indices(0)
    batch = sampler.batch(split, 0)
    matches = [
        [f for f in range(split.num_frames) if torch.equal(split.image[i, f].long(), row)]
        for i, row in zip(index.tolist(), batch["image"], strict=True)
    ]
    assert all(matches)
    assert len({m[0] for m in matches}) > 1  # not always the same frame
    assert eval_frame(10) == 5
    ev = split.eval_batch(0, 2)
    assert torch.equal(ev["image"], split.image[:2, eval_frame(split.num_frames)].long())


def test_lr_warms_up_linearly_then_follows_a_cosine():
    cfg = dataclasses.replace(TINY_TRAIN, steps=100, warmup_steps=10, base_lr=1e-3, min_lr=1e-4)
    assert peak_lr(cfg) == pytest.approx(1e-3 * 8 / 256)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    factors = [lr_factor(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(factors))


def test_no_weight_decay_on_norms_and_biases(tokens):
    layout, _ = load_token_meta(tokens)
    model = AudioVisualTransformer(TINY_MODEL, layout)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "encoder.blocks.0.norm1.weight" in nd and "head_bias.audio" in nd
    assert "encoder.blocks.0.attn.qkv.bias" in nd
    assert "token_embed.audio.weight" in {names[id(p)] for p in decay["params"]}


@pytest.mark.parametrize(
    ("requested", "capability", "expected"),
    [
        ("auto", (7, 0), "fp16"),
        ("auto", (8, 0), "bf16"),
        ("auto", (9, 0), "bf16"),
        ("fp32", (8, 0), "fp32"),
        ("fp16", (8, 0), "fp16"),
    ],
)
def test_precision_follows_the_compute_capability(requested, capability, expected):
    assert choose_precision(requested, torch.device("cuda"), capability) == expected


def test_precision_on_cpu_and_impossible_choices():
    assert choose_precision("auto", torch.device("cpu")) == "fp32"
    assert choose_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(PipelineError, match="compute capability 8.0"):
        choose_precision("bf16", torch.device("cuda"), (7, 0))
    with pytest.raises(PipelineError, match="CUDA"):
        choose_precision("fp16", torch.device("cpu"))


# ------------------------------------------------------------------------------ the plain loop


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tokens, tmp_path):
    job = _job(tokens)
    straight = run_training(job, FolderEnvironment(tmp_path / "a"))
    env = FolderEnvironment(tmp_path / "b")
    half = run_training(job, env, stop_after=6)
    assert half["step"] == 6 and sorted(p.name for p in (tmp_path / "b").iterdir())[-1].endswith(
        "6"
    )
    resumed = run_training(job, env)
    assert resumed["step"] == straight["step"] == 12
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert straight["optimizer"]["state"][0]["exp_avg"].equal(
        resumed["optimizer"]["state"][0]["exp_avg"]
    )
    assert [r["step"] for r in resumed["history"]["train"]] == [3, 6, 9, 12]
    assert resumed["history"]["resumed"] == [{"step": 6}]
    # ... and a different seed really gives different weights (the check above can fail).
    other = run_training(dataclasses.replace(job, seed=8), FolderEnvironment(tmp_path / "c"))
    assert not torch.equal(other["model"]["pos_embed"], straight["model"]["pos_embed"])


def test_a_checkpoint_from_other_params_is_refused(tokens, tmp_path):
    env = FolderEnvironment(tmp_path)
    run_training(_job(tokens), env, stop_after=4)
    with pytest.raises(TrainError, match="other params"):
        run_training(dataclasses.replace(_job(tokens), fingerprint="g"), env)


def test_loss_falls_on_structured_tokens(tokens, tmp_path):
    job = _job(tokens, steps=160, base_lr=0.2, log_every=20, eval_every=160, checkpoint_every=160)
    job = dataclasses.replace(
        job, model=dataclasses.replace(TINY_MODEL, dropout=0.0, attn_dropout=0.0)
    )
    state = run_training(job, FolderEnvironment(tmp_path))
    rows = state["history"]["train"]
    # Uniform guessing over 16 codes: ln 16 = 2.77 per modality.
    assert rows[0]["loss_audio"] > 2.6
    assert rows[-1]["loss_audio"] < rows[0]["loss_audio"] - 0.2
    assert rows[-1]["loss_image"] < rows[0]["loss_image"] - 0.2
    val = state["history"]["val"][-1]
    assert val["val/loss_audio_r50"] < 0.9 * math.log(16)


class _Terminal:
    """A stderr that says it is a terminal, keeping what is written (tqdm draws on it)."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_is_a_bar_on_a_terminal_and_log_lines_elsewhere(tokens, tmp_path, monkeypatch,
                                                                   caplog):  # fmt: skip
    job = _job(tokens, steps=20, batch_size=2, log_every=1, eval_every=0, checkpoint_every=20)
    with caplog.at_level("INFO", logger="pipeline.training.loop"):
        run_training(job, FolderEnvironment(tmp_path / "log"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: step")]
    # the first logged window, every 10th, and the last: not one line per step
    assert [line.split(",")[0] for line in lines] == [
        "train: step 1/20", "train: step 10/20", "train: step 20/20"
    ]  # fmt: skip
    assert all("loss audio" in line and "samples/s" in line and "left" in line for line in lines)

    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline.training.loop"):
        run_training(job, FolderEnvironment(tmp_path / "tty"))
    assert not [r for r in caplog.records if r.getMessage().startswith("train: step")]
    last = terminal.text.split("\r")[-1]
    # tqdm's own fields (count, elapsed<remaining, rate) and ours (loss per modality, samples/s)
    assert re.match(r"train: 100%\|.*\| 20/20 \[\d\d:\d\d<00:00, +[\d.]+(s/step|step/s), ", last)
    assert "audio " in last and "image " in last and "samples/s" in last
