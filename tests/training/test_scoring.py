import numpy as np
import pytest
import torch

from kd_tune.audio.features import N_SAMPLES, NORMALIZATIONS, SAMPLE_RATE, LogMel
from kd_tune.config import load_config
from kd_tune.datasets.data import Split
from kd_tune.metrics import sliding_windows
from kd_tune.training.models import build_student
from kd_tune.training.scoring import EVAL_BATCH, StreamInputs, Validation, evaluate, predict, window_inputs


def noise(seconds: float, *, seed: int) -> torch.Tensor:
    return torch.from_numpy((0.1 * np.random.default_rng(seed).standard_normal(round(seconds * SAMPLE_RATE)))
                            .astype(np.float32))


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("hop_samples", [1600, 800, 1000])
def test_window_log_mels_equal_the_log_mels_of_each_window(hop_samples, normalize):
    # Rule: the stream's log-mels from one shared pass equal log_mel applied to each window (the frames at a window's
    # edges included, the normalization per window), at every hop; a hop off the frame grid falls back to per-window
    # log-mels.
    log_mel = LogMel(normalize=normalize)
    stream = noise(7.37, seed=3)
    windows = sliding_windows(stream, window_samples=N_SAMPLES, hop_samples=hop_samples)
    with torch.no_grad():
        shared = torch.cat(list(window_inputs(stream, hop_samples=hop_samples, batch=7, log_mel=log_mel)))
        expected = log_mel(windows)
    assert shared.shape == expected.shape
    assert torch.allclose(shared, expected, atol=1e-4)
    raw = torch.cat(list(window_inputs(stream, hop_samples=hop_samples, batch=5)))
    assert torch.equal(raw, windows)


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("hop_samples", [1600, 1000])
def test_stream_inputs_featurized_once_serve_what_window_inputs_computes_every_pass(hop_samples, normalize):
    # Rule: a run featurizes its validation stream once and each pass gets exactly the inputs that computing them
    # afresh gives (the same batches, bit for bit), pass after pass; off the frame grid, and for a waveform model,
    # it serves window_inputs itself.
    log_mel, stream = LogMel(normalize=normalize), noise(9.37, seed=5)
    with torch.no_grad():
        fresh = list(window_inputs(stream, hop_samples=hop_samples, batch=EVAL_BATCH, log_mel=log_mel))
        inputs = StreamInputs(stream, hop_samples=hop_samples, log_mel=log_mel)
        assert (inputs.parts is not None) == (hop_samples % log_mel.hop_length == 0)
        for _ in range(2):
            served = list(inputs)
            assert len(served) == len(fresh) and all(torch.equal(a, b) for a, b in zip(served, fresh, strict=True))
    raw = StreamInputs(stream, hop_samples=hop_samples, log_mel=None)
    assert raw.parts is None and torch.equal(torch.cat(list(raw)), torch.cat(list(window_inputs(
        stream, hop_samples=hop_samples, batch=EVAL_BATCH))))
    assert inputs.hours == pytest.approx(9.37 / 3600)


def test_validation_holds_the_clips_log_mels_as_predict_makes_them():
    # Rule: Validation's clip and condition inputs are the log-mels predict computes from the audio, so its scores
    # are the scores of the audio; a waveform model gets the audio itself, not a copy.
    torch.manual_seed(0)
    model, log_mel = build_student("tc_resnet").eval(), LogMel(normalize="pcen")
    split = Split(torch.stack([noise(1, seed=i) for i in range(70)]), torch.tensor([1, 0] * 35), ["x"] * 70)
    v = Validation.of(split, None, {"frr_room": split.audio[:3]}, log_mel, hop_samples=1600)
    assert torch.equal(predict(model, v.clips, None), predict(model, split.audio, log_mel))
    assert torch.equal(predict(model, v.conditions["frr_room"], None), predict(model, split.audio[:3], log_mel))
    raw = Validation.of(split, None, {}, None, hop_samples=1600)
    assert raw.clips is split.audio and raw.stream is None


def test_evaluate_scores_the_stream_like_the_per_window_model_and_without_one_the_clips_only():
    # Rule: the FA/h and FRR evaluate reports equal those of the model run on every window of the stream; without a
    # stream only the clip metrics come back.
    from kd_tune.metrics import wakeword_metrics

    torch.manual_seed(0)
    model, log_mel = build_student("tc_resnet").eval(), LogMel()
    config = load_config(None, overrides=["training.target_fa_per_hour=1000"], check_paths=False)
    split = Split(torch.stack([noise(1, seed=i) for i in range(6)]), torch.tensor([1, 0, 1, 0, 1, 0]), ["x"] * 6)
    stream = noise(30, seed=9)
    got = evaluate(model, Validation.of(split, stream, {}, log_mel, hop_samples=1600), config)
    windows = sliding_windows(stream, window_samples=N_SAMPLES, hop_samples=1600)
    expected = wakeword_metrics(predict(model, split.audio, log_mel), split.labels, predict(model, windows, log_mel),
                                hop_seconds=0.1, target_fa_per_hour=1000, hours=30 / 3600)  # of audio
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(expected[k], abs=1e-4) for k in got)
    clips_only = {"accuracy", "auc", "eer"}
    assert set(evaluate(model, Validation.of(split, None, {}, log_mel, hop_samples=1600), config)) == clips_only
    assert set(evaluate(model, Validation.of(split, stream, {}, log_mel, hop_samples=1600), config,
                        with_stream=False)) == clips_only


def test_validation_conditions_are_the_positives_under_a_fixed_mix_and_their_frr_is_reported():
    # Rule: validation scores the positives under a fixed, seeded mix of conditions (noise at 10 and 0-5 dB, a room,
    # a level, a microphone) at the clean stream's threshold; frr_conditions is the mean of clean and all of them.
    from kd_tune.training.scoring import VALIDATION_MIX, validation_conditions

    torch.manual_seed(0)
    labels = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])
    split = Split(torch.stack([noise(1, seed=i) for i in range(8)]), labels, ["positive", "negative"] * 4)
    conditions = validation_conditions(split)
    assert set(conditions) == set(VALIDATION_MIX)
    assert all(audio.shape == (4, N_SAMPLES) and audio.dtype == torch.float32 for audio in conditions.values())
    assert all(torch.equal(conditions[k], validation_conditions(split)[k]) for k in conditions)  # seeded
    assert not torch.equal(conditions["frr_snr10"], split.audio[labels == 1])
    model, log_mel = build_student("tc_resnet").eval(), LogMel()
    config = load_config(None, overrides=["training.target_fa_per_hour=1000"], check_paths=False)
    got = evaluate(model, Validation.of(split, noise(30, seed=9), conditions, log_mel, hop_samples=1600), config)
    for name, audio in conditions.items():
        assert got[name] == pytest.approx(float((predict(model, audio, log_mel) < got["threshold"]).float().mean()))
    parts = [got["frr_at_target_fa"], *(got[name] for name in conditions)]
    assert got["frr_conditions"] == pytest.approx(float(np.mean(parts)))
