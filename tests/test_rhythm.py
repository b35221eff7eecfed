"""pipeline.metrics.rhythm on rendered synthetic clips: real mels pass, a drone in the right band
does not, and time blur (what a codec that keeps only the band envelope does) costs score."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.metrics.rhythm import RhythmScorer, autocorrelation, periodicity

PERIODIC = {  # the demo's classes whose sound repeats at a steady rate
    "red bouncing ball / low thumps",
    "blue pulsing ring / high chirps",
    "yellow spinning triangle / buzzy drone",
    "orange flashing stripes / rapid clicks",
}


@pytest.fixture(scope="module")
def data(class_mels):
    """conftest's rendered mels (5 train and 5 test clips per demo class) and a scorer fit on
    the train ones."""
    train = (class_mels.mels["train"], class_mels.labels["train"])
    scorer = RhythmScorer.fit(*train, frame_rate=class_mels.frame_rate)
    return {"test": (class_mels.mels["test"], class_mels.labels["test"])}, scorer


def test_periodicity_finds_a_pulse_train_and_not_noise():
    rate = 86.0
    t = np.arange(860)
    pulses = (t % 43 < 4).astype(float)  # every 0.5 s
    peak, period = periodicity(pulses, rate)
    assert peak > 0.9 and period == pytest.approx(0.5, abs=0.02)
    noise_peak, _ = periodicity(np.random.default_rng(0).normal(size=860), rate)
    assert noise_peak < 0.3
    assert not autocorrelation(np.ones(100), 10).any()
    # one short bump over faint noise: every autocorrelation peak in range is below 0 (a generated
    # mel at N = 2 did this, and the first-peak search found nothing to return)
    t = np.arange(860)
    bump = np.exp(-0.5 * ((t - 430) / 4) ** 2) + np.random.default_rng(0).normal(0, 1e-3, 860)
    assert periodicity(bump, rate) == (0.0, pytest.approx(float("nan"), nan_ok=True))


def test_real_mels_pass(data):
    (mels, labels), scorer = data[0]["test"], data[1]
    scores = scorer.scores(mels, labels)
    assert scores["acc_rhythm"] >= 0.8
    assert scores["period_err"] <= 0.15
    assert set(np.asarray(scorer.labels)[scorer.periodic]) == PERIODIC


def test_a_drone_in_the_right_band_scores_at_chance_on_the_periodic_classes(data):
    """Each test clip's own spectrum held steady (what a codec keeping only the band envelope
    gives back), with decode-like noise: right band, no time structure."""
    (mels, labels), scorer = data[0]["test"], data[1]
    rng = np.random.default_rng(0)
    drones = [np.clip(m.mean(1, keepdims=True) + rng.normal(0, 0.01, m.shape), 0, 1) for m in mels]
    periodic = [i for i, y in enumerate(labels) if y in PERIODIC]
    drone = scorer.scores([drones[i] for i in periodic], [labels[i] for i in periodic])
    real = scorer.scores([mels[i] for i in periodic], [labels[i] for i in periodic])
    assert drone["acc_rhythm"] <= 1 / len(scorer.labels) and real["acc_rhythm"] >= 0.8
    assert drone["period_err"] == 1.0 and real["period_err"] <= 0.15


def test_a_scorer_survives_json(data):
    import json

    (mels, labels), scorer = data[0]["test"], data[1]
    again = RhythmScorer.from_dict(json.loads(json.dumps(scorer.to_dict())))
    assert again.predict(mels) == scorer.predict(mels)
    assert again.scores(mels, labels) == scorer.scores(mels, labels)


def test_the_evaluator_keeps_its_scorer_and_scores_time_beside_the_class(data, tmp_path):
    """A saved evaluator loads with its rhythm scorer; its mel outputs carry the rhythm rows, in
    any row order, and `score_audio` reports them as `acc_rhythm_local` / `period_err_local`."""
    from pipeline.evaluation.local import LocalEvaluator, Outputs
    from pipeline.evaluation.scoring import reference_of, score_audio, score_reference

    (mels, labels), scorer = data[0]["test"], data[1]
    evaluator = LocalEvaluator(list(scorer.labels), embed_dim=8, joint_dim=4)
    evaluator.rhythm = scorer
    evaluator.save(tmp_path / "ev", {"metrics": {"test_clips": len(mels)}})
    again = LocalEvaluator.load(tmp_path / "ev")
    assert again.rhythm is not None and again.rhythm.to_dict() == scorer.to_dict()
    stack = np.stack(mels).astype(np.float32)
    audio = again.audio_outputs(stack)
    order = np.arange(len(mels))[::-1]
    assert np.array_equal(Outputs.cat([audio.take(order[:3]), audio.take(order[3:])]).rhythm,
                          audio.rhythm[order])  # fmt: skip
    ref = reference_of(again, labels, audio, again.image_outputs(np.zeros((len(mels), 8, 8, 3),
                                                                          np.uint8)))  # fmt: skip
    expected = scorer.scores(list(stack), labels)
    real = score_reference(ref)
    assert real["audio_acc_rhythm_local"] == pytest.approx(expected["acc_rhythm"])
    assert real["audio_period_err_local"] == pytest.approx(expected["period_err"])
    # a generated mel is judged against the label of the clip that conditioned it: shifting the
    # rows by one class (5 clips) puts every mel against another label's rhythm
    shifted = score_audio(audio, ref, np.roll(np.arange(len(mels)), 5))
    assert shifted["acc_rhythm_local"] < expected["acc_rhythm"] - 0.5
