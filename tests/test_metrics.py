import math

import numpy as np
import pytest
import torch

from kd_tune.metrics import (BestEpoch, activation_times, count_activations, epoch_key, equal_error_rate,
                             false_accepts_per_hour, roc_auc, sliding_windows, threshold_for_fa_rate, wakeword_metrics)

HOP_SECONDS = 0.1


def _spikes(n_windows, indices, value=0.9):
    probabilities = np.zeros(n_windows)
    probabilities[list(indices)] = value
    return probabilities


def _fa_per_hour(probabilities, threshold):
    return false_accepts_per_hour(probabilities, threshold=threshold, hop_seconds=HOP_SECONDS)


def test_roc_auc_matches_pairwise_count_with_ties():
    # rule: AUC = P(score_pos > score_neg) + 0.5 * P(tie), the Mann-Whitney statistic
    rng = np.random.default_rng(0)
    scores = rng.random(300).round(1)  # coarse rounding makes many ties
    labels = rng.random(300) < 0.3
    positives, negatives = scores[labels][:, None], scores[~labels][None, :]
    wins, ties = (positives > negatives).sum(), (positives == negatives).sum()
    expected = (wins + 0.5 * ties) / (positives.size * negatives.size)
    assert roc_auc(scores, labels) == pytest.approx(expected)
    assert roc_auc(torch.tensor(scores), torch.tensor(labels).long()) == pytest.approx(expected)


def test_roc_auc_extremes():
    # rule: separable scores give 1, identical scores 0.5, a missing class nan
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.5] * 4, [0, 1, 0, 1]) == 0.5
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_labels_must_be_binary():
    # rule: labels are 0/1 and errors name the bad values
    with pytest.raises(ValueError, match="2"):
        roc_auc([0.1, 0.2], [0, 2])


def test_eer_of_separable_set_is_zero():
    # rule: a threshold separating the classes gives EER 0 and accepts every positive
    eer, threshold = equal_error_rate([0.1, 0.2, 0.3, 0.7, 0.8], [0, 0, 0, 1, 1])
    assert eer == 0.0 and 0.3 < threshold <= 0.7


def test_eer_on_a_toy_set():
    # rule: EER is where false-accept and false-reject rates meet (score >= threshold accepts)
    eer, threshold = equal_error_rate([0.6, 0.7, 0.8, 0.9, 0.1, 0.2, 0.3, 0.65], [1, 1, 1, 1, 0, 0, 0, 0])
    assert eer == pytest.approx(0.25) and threshold == pytest.approx(0.65)


def test_sustained_activation_counts_once():
    # rule: detections fire on rising edges only
    probabilities = np.zeros(100)
    probabilities[10:60] = 0.9
    assert count_activations(probabilities, threshold=0.5, hop_seconds=HOP_SECONDS) == 1


@pytest.mark.parametrize("gap_windows, expected", [(5, 1), (10, 2), (15, 2)])
def test_refractory_period_merges_close_activations(gap_windows, expected):
    # rule: a rising edge less than refractory_seconds after the last detection is ignored (exactly 1 s is allowed)
    probabilities = _spikes(100, [10, 10 + gap_windows])
    assert count_activations(probabilities, threshold=0.5, hop_seconds=HOP_SECONDS, refractory_seconds=1.0) == expected


def test_refractory_counts_from_the_last_detection_not_the_last_edge():
    # rule: suppressed edges do not extend the refractory period
    probabilities = _spikes(100, [10, 16, 22])
    times = activation_times(probabilities, threshold=0.5, hop_seconds=HOP_SECONDS, refractory_seconds=1.0)
    assert times == pytest.approx([1.0, 2.2])


def test_activation_at_stream_start_counts():
    # rule: the stream is taken to start below threshold
    assert count_activations([0.9, 0.9, 0.0], threshold=0.5, hop_seconds=HOP_SECONDS) == 1


def test_false_accepts_per_hour_arithmetic():
    # rule: FA/h = detections / (windows * hop_seconds / 3600)
    one_hour = int(3600 / HOP_SECONDS)
    assert _fa_per_hour(_spikes(one_hour, [100, 5000, 20000]), 0.5) == pytest.approx(3.0)
    assert _fa_per_hour(_spikes(one_hour // 2, [100, 5000, 10000]), 0.5) == pytest.approx(6.0)


def test_one_false_activation_on_an_hour_of_audio_is_one_per_hour():
    # rule: given the audio's length, FA/h counts per hour of audio, not per window hop: 1 s windows every 100 ms
    # over exactly an hour of audio are 35991 windows (3599.1 s of hops), and one activation there is 1 FA/h, which
    # meets a 1 FA/h target; counted per hop it would read 1.00025 and miss it.
    windows = round((3600 - 1) / HOP_SECONDS) + 1
    stream = _spikes(windows, [1000], value=0.9)
    assert _fa_per_hour(stream, 0.5) > 1.0
    assert false_accepts_per_hour(stream, threshold=0.5, hop_seconds=HOP_SECONDS, hours=1.0) == 1.0
    assert threshold_for_fa_rate(stream, target_fa_per_hour=1.0, hop_seconds=HOP_SECONDS, hours=1.0) == 0.0
    assert threshold_for_fa_rate(stream, target_fa_per_hour=1.0, hop_seconds=HOP_SECONDS) > 0.9
    metrics = wakeword_metrics([0.95, 0.1], [1, 0], stream, hop_seconds=HOP_SECONDS, target_fa_per_hour=1.0,
                               hours=1.0)
    assert (metrics["fa_per_hour"], metrics["stream_hours"], metrics["frr_at_target_fa"]) == (1.0, 1.0, 0.0)


def test_threshold_meets_target_and_a_lower_one_does_not():
    # rule: the threshold is the lowest that meets the target FA/h (checked past the exact-search limit of 512 values)
    stream = np.random.default_rng(0).random(20000)  # 2000 s of noise, 20000 unique values
    target = 30.0
    threshold = threshold_for_fa_rate(stream, target_fa_per_hour=target, hop_seconds=HOP_SECONDS)
    assert _fa_per_hour(stream, threshold) <= target
    next_lower = stream[stream < threshold].max()
    assert _fa_per_hour(stream, next_lower) > target


def test_threshold_ignores_a_lone_dip_in_fa_rate():
    # rule: the threshold must meet the target from there on up; a lower threshold that merges two activations into
    # one sustained run is not trusted
    stream = np.array([0.0, 0.6, 0.9, 0.6, 0.9, 0.6, 0.0])
    hours = len(stream) * 1.0 / 3600
    options = dict(hop_seconds=1.0, refractory_seconds=0.0)
    assert false_accepts_per_hour(stream, threshold=0.6, **options) * hours == 1
    assert false_accepts_per_hour(stream, threshold=0.9, **options) * hours == 2
    threshold = threshold_for_fa_rate(stream, target_fa_per_hour=1.5 / hours, **options)
    assert threshold > 0.9
    assert false_accepts_per_hour(stream, threshold=threshold, **options) == 0


def test_threshold_extremes():
    # rule: a lenient target gives the lowest probability; target 0 on a stream reaching 1.0 gives one above 1.0
    stream = _spikes(1000, [100, 500], value=1.0)
    assert threshold_for_fa_rate(stream, target_fa_per_hour=1e9, hop_seconds=HOP_SECONDS) == 0.0
    threshold = threshold_for_fa_rate(stream, target_fa_per_hour=0.0, hop_seconds=HOP_SECONDS)
    assert threshold > 1.0 and np.float32(threshold) > np.float32(1.0)
    assert _fa_per_hour(stream, threshold) == 0


def test_wakeword_metrics_toy_case():
    # rule: every key is present and computed at the operating point that meets the target FA/h, the lowest
    # threshold that does
    stream = _spikes(int(3600 / 0.5), [100], value=0.7)  # one hour at 0.5 s hop
    stream[3000] = 0.4
    metrics = wakeword_metrics(
        [0.9, 0.8, 0.3, 0.1, 0.6], [1, 1, 1, 0, 0], stream, hop_seconds=0.5, target_fa_per_hour=1.0
    )
    assert metrics == pytest.approx(
        {
            "accuracy": 0.6,
            "auc": 5 / 6,
            "eer": 5 / 12,
            "threshold": 0.4,  # just above the second-highest window: the lowest threshold with one activation
            "frr_at_target_fa": 1 / 3,
            "fa_per_hour": 1.0,
            "stream_hours": 1.0,
        }
    )


@pytest.mark.parametrize(
    "n_samples, expected_windows, padding", [(16000, 1, 0), (20800, 4, 0), (20000, 4, 800), (1000, 1, 15000)]
)
def test_sliding_windows_shapes_and_padding(n_samples, expected_windows, padding):
    # rule: windows every hop, tail zero-padded so the last window is complete
    audio = torch.arange(1, n_samples + 1, dtype=torch.float32)
    windows = sliding_windows(audio, window_samples=16000, hop_samples=1600)
    assert windows.shape == (expected_windows, 16000)
    torch.testing.assert_close(windows[0, : min(n_samples, 16000)], audio[:16000])
    if expected_windows > 1:
        torch.testing.assert_close(windows[1, :16000 - padding], audio[1600 : 17600 - padding])
    assert (windows[-1, 16000 - padding :] == 0).all()
    assert (windows[-1, : 16000 - padding] != 0).all()


def test_sliding_windows_rejects_non_1d_audio():
    # rule: audio is one channel [T]; errors name the bad shape
    with pytest.raises(ValueError, match=r"\(2, 100\)"):
        sliding_windows(torch.zeros(2, 100), window_samples=50, hop_samples=10)


def test_the_best_epoch_rule_ranks_by_metric_then_the_later_epoch():
    # Rule: one rule picks a best epoch everywhere (leaderboard, TensorBoard's trial_best, export, retention,
    # compare): the metric in its direction with NaN or missing last, then the later epoch (what Ray's checkpoint
    # retention keeps of a tie); numpy numbers (a pandas row's) count as numbers, booleans do not.
    epochs = [{"epoch": 1, "frr": math.nan}, {"epoch": 2, "frr": 0.3}, {"epoch": 3, "frr": 0.3, "auc": 0.5},
              {"epoch": 4, "frr": 0.4}, {"epoch": 5}]
    ranked = [r["epoch"] for r in sorted(epochs, key=lambda r: epoch_key(r, "frr", "min"))]
    assert ranked == [3, 2, 4, 5, 1]
    assert [r["epoch"] for r in sorted(epochs, key=lambda r: epoch_key(r, "frr", "max"))][:3] == [4, 3, 2]
    assert epoch_key({"frr": np.float64(0.2), "epoch": np.int64(7)}, "frr", "min") == (0.2, -7.0)
    assert epoch_key({"frr": True}, "frr", "min")[0] == math.inf
    best = BestEpoch("frr", "min")
    for result in epochs:
        best.offer(result)
    assert best.result["epoch"] == 3
