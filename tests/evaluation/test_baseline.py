"""The PocketSphinx baseline (evaluation.baseline) with the real pocketsphinx and its bundled en-us model, no mocks."""

import sys
from pathlib import Path

import numpy as np
import pytest

from kd_tune.datasets.data import scan
from kd_tune.deploy.windows import frames
from kd_tune.errors import InputError, MissingExtraError
from kd_tune.evaluation.baseline import (DEFAULT_KWS_THRESHOLD, KWS_MAX, PERMISSIVE_KWS_THRESHOLD, BaselineError,
                                         PocketSphinxSpotter, kws_threshold_for, margin_of_kws_threshold,
                                         score_of_margin)
from kd_tune.metrics import count_activations, roc_auc

WAKEWORD = "hey nova"  # the small data set's wake word
STREAM_SECONDS = 40  # of the small set's test stream: ~100 detections, a few seconds to decode


@pytest.fixture(scope="module")
def spotter() -> PocketSphinxSpotter:
    return PocketSphinxSpotter(WAKEWORD)


def noise(n_samples: int, seed: int = 0) -> np.ndarray:
    return (0.05 * np.random.default_rng(seed).standard_normal(n_samples)).astype(np.float32)


@pytest.mark.parametrize("n_samples", [1, 1_599, 16_000, 16_001, 17_600, 17_601, 50_000])
def test_one_score_per_detector_window(spotter, n_samples):
    # Rule: probabilities() has one score per window deploy.windows.frames cuts, for any audio length, in [0, 1].
    scores = spotter.probabilities(noise(n_samples))
    assert scores.dtype == np.float32
    assert scores.shape == (len(frames(noise(n_samples), window_samples=spotter.window_samples,
                                       hop_samples=spotter.hop_samples)),)
    assert np.all((scores >= 0) & (scores < 1))


def test_streaming_settings_match_an_exported_model(spotter):
    # Rule: the spotter carries the attributes evaluation reads from a Detector, at an exported model's settings.
    assert (spotter.name, spotter.sample_rate, spotter.window_samples, spotter.hop_samples) == (
        "pocketsphinx", 16_000, 16_000, 1_600)
    assert spotter.refractory_seconds == 1.0 and 0 < spotter.threshold < 1


def test_out_of_dictionary_words_are_refused_in_one_line():
    # Rule: every keyphrase word must be in the bundled dictionary; the refusal names the missing ones, says what is
    # allowed, and is an InputError (exit code 2) on one line.
    with pytest.raises(BaselineError) as caught:
        PocketSphinxSpotter("hey novaxq zzyzzx")
    message = str(caught.value)
    assert "'novaxq'" in message and "'zzyzzx'" in message and "'hey'" not in message.split(":", 1)[1]
    assert "allowed:" in message and "\n" not in message
    assert isinstance(caught.value, InputError) and caught.value.exit_code == 2


@pytest.mark.parametrize("keyphrase", ["", "   ", "hey\nnova\x00", "one two three four five six seven eight nine", 42])
def test_malformed_keyphrases_are_refused_in_one_line(keyphrase):
    # Rule: a keyphrase is 1 to 8 printable dictionary words; anything else is refused on one line.
    with pytest.raises(BaselineError, match="allowed:") as caught:
        PocketSphinxSpotter(keyphrase)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("kwargs", [{"threshold": 1.5}, {"threshold": float("nan")}, {"kws_threshold": 0.0},
                                    {"kws_threshold": float("inf")}])
def test_thresholds_out_of_range_are_refused(kwargs):
    # Rule: threshold is a score in [0, 1] and kws_threshold a positive finite float; others are refused.
    with pytest.raises(BaselineError, match="allowed:"):
        PocketSphinxSpotter(WAKEWORD, **kwargs)


def test_without_the_extra_the_message_says_how_to_install(monkeypatch):
    # Rule: without pocketsphinx, building a spotter says in one line to install the `baseline` extra.
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)  # what Python does for a module that is not installed
    with pytest.raises(MissingExtraError) as caught:
        PocketSphinxSpotter(WAKEWORD)
    assert "pip install 'kd-tune[baseline]'" in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.exit_code == 2


def test_the_score_map_is_strictly_increasing_and_inverts_to_kws_thresholds():
    # Rule: scores are a fixed, strictly increasing function of pocketsphinx's margin over every margin a
    # permissive search reports (float32 included), and kws_threshold_for(score) is the kws_threshold whose least
    # reported margin is exactly the one with that score.
    margins = np.arange(margin_of_kws_threshold(PERMISSIVE_KWS_THRESHOLD), KWS_MAX + 200)
    scores = np.array([score_of_margin(int(m)) for m in margins], np.float32)
    assert np.all(np.diff(scores) > 0) and scores[0] > 0 and scores[-1] < 1
    for m in (-6000, -675, -1, 0, 1, 700, KWS_MAX):
        assert margin_of_kws_threshold(kws_threshold_for(score_of_margin(m))) == m
        assert margin_of_kws_threshold(kws_threshold_for(np.nextafter(np.float32(score_of_margin(m)),
                                                                      np.float32(1)))) == m + 1


def test_the_default_threshold_is_pocketsphinx_default(spotter):
    # Rule: without a threshold, the spotter operates where pocketsphinx does by default (kws_threshold 1e-30).
    assert margin_of_kws_threshold(kws_threshold_for(spotter.threshold)) == margin_of_kws_threshold(
        DEFAULT_KWS_THRESHOLD)
    assert PocketSphinxSpotter(WAKEWORD, threshold=0.25).threshold == 0.25


def positives_and_negatives(root: Path) -> tuple[list[Path], list[Path]]:
    clips = scan(root)
    return ([c.path for c in clips if c.label == 1],
            [c.path for c in clips if c.kind == "negative"])  # everyday speech, not the sound-alike hard negatives


def stream(spotter: PocketSphinxSpotter, root: Path) -> np.ndarray:
    """The start of the small set's held-out negative stream: speech, music and noise, no wake word."""
    return spotter.read(next((root / "long" / "test").glob("*.wav")))[:STREAM_SECONDS * spotter.sample_rate]


@pytest.mark.slow
def test_clips_with_the_wake_word_score_higher(spotter, small_dataset):
    # Rule: the spotter is wired to the wake word: a clip's score (its highest window) ranks clips that say it above
    # clips of other speech, clip ROC AUC > 0.6 (measured: ~0.8 on the small set, ~1.0 on the piper voice alone).
    positives, negatives = positives_and_negatives(small_dataset)
    assert len(positives) >= 30 and len(negatives) >= 30
    scores = [float(spotter.probabilities(spotter.read(p)).max()) for p in positives + negatives]
    labels = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    assert roc_auc(np.array(scores), labels) > 0.6


@pytest.mark.slow
def test_thresholding_the_scores_is_pocketsphinx_at_a_stricter_kws_threshold(spotter, small_dataset):
    # Rule: windows scoring >= t are exactly the windows of the detections pocketsphinx reports at
    # kws_threshold_for(t), with the same scores, so false activations counted on the scores are pocketsphinx's;
    # checked on a long stream and a few clips at several t among the scores seen.
    positives, negatives = positives_and_negatives(small_dataset)
    for path, audio in [("stream", stream(spotter, small_dataset)),
                        *((p.name, spotter.read(p)) for p in [*positives[:3], *negatives[:2]])]:
        scores = spotter.probabilities(audio)
        seen = np.unique(scores[scores > 0])
        for t in np.unique(np.quantile(seen, [0.0, 0.5, 0.9, 1.0], method="lower")):
            strict = PocketSphinxSpotter(WAKEWORD, kws_threshold=kws_threshold_for(float(t))).probabilities(audio)
            fired = np.flatnonzero(scores >= t)
            assert np.array_equal(np.flatnonzero(strict > 0), fired), (path, t)
            assert np.array_equal(strict[fired], scores[fired]), (path, t)
            assert count_activations(strict, threshold=float(t), hop_seconds=0.1) == count_activations(
                scores, threshold=float(t), hop_seconds=0.1)


@pytest.mark.slow
def test_audio_scores_the_same_whatever_was_scored_before(spotter, small_dataset):
    # Rule: each call starts from a fresh front end and search: a reused spotter scores as a new one does.
    positives, negatives = positives_and_negatives(small_dataset)
    clip, other = spotter.read(positives[0]), spotter.read(negatives[0])
    first = spotter.probabilities(clip)
    spotter.probabilities(other)
    assert np.array_equal(spotter.probabilities(clip), first)
    assert np.array_equal(PocketSphinxSpotter(WAKEWORD).probabilities(clip), first)


@pytest.mark.slow
def test_detect_fires_where_the_scores_cross_the_threshold(spotter, small_dataset):
    # Rule: detect() applies the Detector's rule (rising edge, refractory period) to the scores at `threshold`.
    audio = stream(spotter, small_dataset)
    scores = spotter.probabilities(audio)
    times = spotter.detect(audio)
    assert len(times) == count_activations(scores, threshold=spotter.threshold, hop_seconds=0.1)
    assert all(0 <= t <= len(audio) / spotter.sample_rate + 1 for t in times)
