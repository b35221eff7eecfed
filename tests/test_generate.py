"""The `visual-echoes` generation commands end to end on the checkpoint of the tiny pipeline
(dvc repro of profiles/tiny.yaml), every task, and every bad-input case. Slow: needs the DAG."""

from __future__ import annotations

import functools
import wave
from pathlib import Path

import numpy as np
import pytest
from conftest import run_in
from PIL import Image

from pipeline.cli import main

pytestmark = pytest.mark.slow
FAST = ["--steps", "3", "--params", "params.yaml"]


@pytest.fixture(scope="module")
def repo(tiny_project) -> Path:
    run_in(tiny_project, "dvc", "repro")  # a no-op when test_dvc already ran it
    return tiny_project


@pytest.fixture
def cli(repo, monkeypatch, capsys):
    """main([...]) inside the tiny project; returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(repo)

    def call(*args: str) -> tuple[int, str, str]:
        code = main([*args, *FAST])
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def _video(repo: Path) -> Path:
    return sorted((repo / "data/clips/videos").rglob("*.mp4"))[0]


def _png(path: Path, size=(50, 40)) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
    return path


def _wav(path: Path, seconds=10.0, rate=22050, silent=False) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    y = np.zeros_like(t) if silent else 0.3 * np.sin(2 * np.pi * 440 * t)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((y * 32767).astype("<i2").tobytes())
    return path


def _wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def test_image2audio_from_a_picture_and_from_a_video(cli, repo, tmp_path):
    code, out, err = cli("image2audio", "--image", str(_png(tmp_path / "cat.png")),
                         "--out", str(tmp_path / "cat.wav"))  # fmt: skip
    assert code == 0, err
    assert "image2audio: 1 file(s)" in out
    # 848 mel frames at hop 256: the 9.84 s SpecVQGAN keeps of each 10-s clip.
    assert _wav_seconds(tmp_path / "cat.wav") == pytest.approx(848 * 256 / 22050, abs=0.02)
    assert (tmp_path / "cat.mel.png").stat().st_size > 1000
    code, _, err = cli("image2audio", "--image", str(_video(repo)), "--out", str(tmp_path / "v"),
                       "--samples", "2")  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "v").glob("*.wav")) == [
        f"{_video(repo).stem}-0.wav",
        f"{_video(repo).stem}-1.wav",
    ]


def test_same_seed_same_sound_other_seed_other_sound(cli, tmp_path):
    image = str(_png(tmp_path / "x.png"))
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert cli("image2audio", "--image", image, "--out", str(tmp_path / f"{name}.wav"),
                   "--seed", seed)[0] == 0  # fmt: skip
    read = lambda n: (tmp_path / f"{n}.wav").read_bytes()  # noqa: E731
    assert read("a") == read("b") and read("a") != read("c")


def test_audio2image_cogenerate_and_inpainting(cli, repo, tmp_path):
    sound = str(_wav(tmp_path / "tone.wav"))
    code, _, err = cli("audio2image", "--audio", sound, "--out", str(tmp_path / "tone.png"))
    assert code == 0, err
    assert Image.open(tmp_path / "tone.png").size == (32, 32)
    code, _, err = cli(
        "audio2image", "--audio", str(_video(repo)), "--out", str(tmp_path / "v.png")
    )
    assert code == 0, err
    code, _, err = cli("cogenerate", "--samples", "2", "--out", str(tmp_path / "co"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "co").iterdir()) == [
        "sample-0.mel.png", "sample-0.png", "sample-0.wav",
        "sample-1.mel.png", "sample-1.png", "sample-1.wav",
    ]  # fmt: skip
    code, _, err = cli("inpaint-audio", "--image", str(_png(tmp_path / "i.png")), "--audio", sound,
                       "--start", "2", "--end", "4", "--out", str(tmp_path / "fixed.wav"))  # fmt: skip
    assert code == 0, err
    code, _, err = cli("inpaint-image", "--image", str(tmp_path / "i.png"), "--audio", sound,
                       "--box", "0", "4", "0", "4", "--out", str(tmp_path / "fixed.png"))  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "fixed.png").exists()


def test_a_folder_of_inputs_in_one_call(cli, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        _png(folder / name)
    (folder / "notes.txt").write_text("not an image")
    code, out, err = cli("image2audio", "--image", str(folder), "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o").glob("*.wav")) == ["a.wav", "b.wav"]


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("missing", "missing.png"),
        ("text_as_png", "fake.png"),
        ("silent", "silent.wav"),
        ("empty_wav", "empty.wav"),
        ("not_checkpoint", "not a transformer checkpoint"),
        ("bad_span", "--start"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_1(cli, tmp_path, case, pattern):
    image = str(_png(tmp_path / "ok.png"))
    args = {
        "missing": ["image2audio", "--image", str(tmp_path / "missing.png")],
        "text_as_png": ["image2audio", "--image", str(tmp_path / "fake.png")],
        "silent": ["audio2image", "--audio", str(_wav(tmp_path / "silent.wav", silent=True))],
        "empty_wav": ["audio2image", "--audio", str(_wav(tmp_path / "empty.wav", seconds=0))],
        "not_checkpoint": ["image2audio", "--image", image, "--checkpoint", str(tmp_path)],
        "bad_span": ["inpaint-audio", "--image", image, "--audio",
                     str(_wav(tmp_path / "t.wav")), "--start", "5", "--end", "3"],
    }[case]  # fmt: skip
    (tmp_path / "fake.png").write_text("hello")
    out_file = tmp_path / ("out.png" if args[0] == "audio2image" else "out.wav")
    code, out, err = cli(*args, "--out", str(out_file))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("visual-echoes: error:"), err
    assert pattern in lines[0]
    assert "Traceback" not in err
    assert not out_file.exists()


def test_mismatched_tokenizers_are_refused(cli, repo, tmp_path):
    import json
    import shutil

    other = tmp_path / "toks"
    shutil.copytree(repo / "models/tokenizers", other)
    # The same (fully convolutional) image VQGAN declared for 64x64 frames: an 16x16 id grid
    # instead of the 8x8 the transformer was trained on.
    meta = json.loads((other / "image/config.json").read_text())
    meta["input"]["shape"] = [3, 64, 64]
    (other / "image/config.json").write_text(json.dumps(meta))
    code, _, err = cli("image2audio", "--image", str(_png(tmp_path / "p.png")), "--tokenizers",
                       str(other), "--out", str(tmp_path / "o.wav"))  # fmt: skip
    assert code == 1 and "do not match" in err, err


def test_console_script_runs(repo, tmp_path):
    out = run_in(repo, "visual-echoes", "image2audio", "--image", str(_png(tmp_path / "p.png")),
                 "--out", str(tmp_path / "p.wav"), *FAST)  # fmt: skip
    assert "image2audio: 1 file(s)" in out and (tmp_path / "p.wav").exists()


def test_ray_data_generation_matches_the_generator(repo):
    import ray

    from pipeline.config import load_params
    from pipeline.data.extracted import iter_examples
    from pipeline.inference.generate import GenerateBatch, Generator
    from pipeline.ray_runtime import ray_session

    cfg = load_params(repo / "params.yaml").generate
    cfg_dict = {**cfg.__dict__, "steps": 3, "device": "cpu"}
    examples = list(iter_examples(repo / "data/extract", "test"))[:2]
    frames = np.stack([e.frames[len(e.frames) // 2] for e in examples])
    args = (str(repo / "models/transformer"), str(repo / "models/tokenizers"), cfg_dict,
            [("image2audio", 3.0), ("image2audio", 1.0)])  # fmt: skip
    with ray_session():
        ds = ray.data.from_items([{"image": f} for f in frames])
        rows = ds.map_batches(
            GenerateBatch, fn_constructor_args=args, batch_size=2,
            compute=ray.data.ActorPoolStrategy(size=1),
        ).take_all()  # fmt: skip
    from pipeline.config import GenerateConfig

    generator = Generator(args[0], args[1], GenerateConfig(**cfg_dict), "cpu")
    for s in (3.0, 1.0):
        direct = generator.run("image2audio", frames, guidance=s)
        col = functools.partial(GenerateBatch.column, "image2audio", s)
        # Same ids; the decoded mels agree to float rounding (the actor runs other thread counts).
        assert np.array_equal(
            np.stack([r[col("gen_audio_ids")] for r in rows]), direct.ids["audio"]
        )
        assert np.allclose(np.stack([r[col("gen_mel")] for r in rows]), direct.mels, atol=1e-5)
        assert all(r[col("seconds")] > 0 for r in rows)
    # The two scales are two different runs, not one copied (CFG changes the samples).
    ids = {s: np.stack([r[GenerateBatch.column("image2audio", s, "gen_audio_ids")] for r in rows])
           for s in (3.0, 1.0)}  # fmt: skip
    assert not np.array_equal(ids[3.0], ids[1.0])


def test_evaluate_actors_send_back_scores_and_only_the_examples_samples(repo, tmp_path):
    """evaluate's `EmbedGenerated`: the evaluator's outputs on what `GenerateBatch` made replace
    the generated mels and frames; only the example rows' samples come back."""
    import torch

    from pipeline.config import load_params
    from pipeline.data.extracted import iter_examples
    from pipeline.evaluation.evaluate import EmbedGenerated
    from pipeline.evaluation.local import LocalEvaluator
    from pipeline.inference.generate import GenerateBatch

    labels = sorted({e.label for e in iter_examples(repo / "data/extract", "train")})
    torch.manual_seed(0)
    LocalEvaluator(labels, 16, 8).save(tmp_path / "evaluator", {})
    evaluator = LocalEvaluator.load(tmp_path / "evaluator")
    cfg = {**load_params(repo / "params.yaml").generate.__dict__, "steps": 2, "device": "cpu"}
    kwargs = {"transformer_dir": str(repo / "models/transformer"),
              "tokenizers_dir": str(repo / "models/tokenizers"), "cfg": cfg,
              "runs": [("image2audio", 3.0), ("audio2image", 1.0)], "vocode": False}  # fmt: skip
    examples = list(iter_examples(repo / "data/extract", "test"))[:3]
    batch = {"row": np.array([4, 5, 6]),
             "image": np.stack([e.frames[len(e.frames) // 2] for e in examples]),
             "mel": np.stack([e.mel for e in examples])}  # fmt: skip
    plain = GenerateBatch(**kwargs)(dict(batch))
    out = EmbedGenerated(str(tmp_path / "evaluator"), [5], **kwargs)(dict(batch))
    assert not [k for k in out if k.rsplit("/", 1)[-1].startswith("gen_")]
    for task_name, s, modality, name in (("image2audio", 3.0, "audio", "gen_mel"),
                                         ("audio2image", 1.0, "image", "gen_image")):  # fmt: skip
        samples = plain[GenerateBatch.column(task_name, s, name)]
        want = (evaluator.audio_outputs if modality == "audio" else evaluator.image_outputs)(
            samples
        )
        got = EmbedGenerated.outputs(out, task_name, s, modality)
        for field in ("embedding", "logits", "joint"):
            np.testing.assert_allclose(getattr(got, field), getattr(want, field), atol=1e-5)
        assert (got.rhythm is None) == (want.rhythm is None)
        kept = EmbedGenerated.examples(out, task_name, s)
        assert list(kept) == [5]  # row 5, the second of the batch
        np.testing.assert_array_equal(kept[5][name[4:]], samples[1])


# ------------------------------------------------------------ a model taken elsewhere


def test_an_exported_model_runs_after_being_moved_away_from_its_checkout(repo, tmp_path):
    import json
    import shutil

    out = run_in(repo, "visual-echoes", "export", str(tmp_path / "export"))
    assert f"-> {tmp_path / 'export'}" in out and "settings: " in out
    moved = tmp_path / "elsewhere" / "my-model"
    moved.parent.mkdir()
    shutil.move(tmp_path / "export", moved)  # as a copy to another machine would
    names = sorted(str(p.relative_to(moved)) for p in moved.rglob("*") if p.is_file())
    assert names == [
        "README.md",
        *(f"tokenizers/{m}/{f}" for m in ("audio", "image")
          for f in ("README.md", "config.json", "model.safetensors")),
        "tokenizers/vocoder/config.json",  # Griffin-Lim in the tiny profile: no weights
        "transformer/README.md", "transformer/config.json", "transformer/generation.json",
        "transformer/model.safetensors",
    ]  # fmt: skip
    # the generation settings travel with it: those of the checkout's params.yaml
    from pipeline.config import load_params

    generate = load_params(repo / "params.yaml").generate
    carried = json.loads((moved / "transformer/generation.json").read_text())["generate"]
    assert carried == {k: getattr(generate, k) for k in carried} and carried["steps"] == 12
    card = (moved / "README.md").read_text()
    assert "## Metrics of the evaluate stage" in card and "`image2audio/s3/acc_local`" in card
    assert "`synthetic` source" in card and "no third-party content" in card
    # run where there is no checkout, no params.yaml and no models/ to fall back on
    picture = _png(moved.parent / "cat.png")
    out = run_in(moved.parent, "visual-echoes", "image2audio", "--checkpoint", "my-model",
                 "--image", "cat.png", "--out", "cat.wav", "--steps", "3")  # fmt: skip
    assert "image2audio: 1 file(s)" in out
    assert "settings: my-model/transformer/generation.json" in out
    assert "note:" not in out and (picture.parent / "cat.wav").stat().st_size > 1000
    code = run_in(moved.parent, "visual-echoes", "export", "my-model", check=False)
    assert "my-model exists; choose another folder, or add --overwrite" in code


def _train_run(repo: Path) -> str:
    import json

    return json.loads((repo / "reports/train/mlflow_run.json").read_text())["run_id"]


def test_the_model_logged_by_train_generates_by_its_runs_and_models_uri(cli, repo, tmp_path):
    from mlflow.tracking import MlflowClient

    run_id = _train_run(repo)
    image = str(_png(tmp_path / "p.png"))
    code, out, err = cli("image2audio", "--checkpoint", f"runs:/{run_id}/model", "--image", image,
                         "--out", str(tmp_path / "a.wav"))  # fmt: skip
    assert code == 0, err
    assert "image2audio: 1 file(s)" in out and (tmp_path / "a.wav").stat().st_size > 1000
    # the same model from the registry, once registered (as a user would in the UI)
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_run(run_id).info.experiment_id
    (model,) = [m for m in client.search_logged_models([experiment]) if m.source_run_id == run_id]
    if not client.search_registered_models("name = 'tiny-echoes'"):
        client.create_registered_model("tiny-echoes")
    version = client.create_model_version(
        "tiny-echoes", f"models:/{model.model_id}", run_id=run_id, model_id=model.model_id
    ).version
    code, out, err = cli("image2audio", "--checkpoint", f"models:/tiny-echoes/{version}",
                         "--image", image, "--out", str(tmp_path / "b.wav"))  # fmt: skip
    assert code == 0, err
    # same model, seed and settings: the same sound, whichever way it was found
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    code, out, err = cli("image2audio", "--checkpoint", "runs:/0123456789abcdef/model",
                         "--image", image, "--out", str(tmp_path / "c.wav"))  # fmt: skip
    assert code == 1 and err.count("\n") == 1 and "cannot give runs:/0123456789abcdef/model" in err


def test_mlflow_loads_the_logged_model_as_a_python_function(repo, tmp_path, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.chdir(repo)
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"runs:/{_train_run(repo)}/model")
    waves = model.predict([str(_png(tmp_path / "p.png")), str(_video(repo))])
    assert waves.shape[0] == 2 and waves.shape[1] == pytest.approx(848 * 256, abs=512)
    assert waves.dtype == np.float32
    assert np.abs(waves).max() > 0
