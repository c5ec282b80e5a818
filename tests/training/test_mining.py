"""Hard negatives mined by the student (kd_tune.training.mining), and their part in the distillation loss."""

import math

import pytest
import torch
from test_train import KeepCheckpoints, tiny_config
from torch import nn

from kd_tune.audio.features import N_SAMPLES, SAMPLE_RATE, LogMel
from kd_tune.datasets.data import WINDOW_KIND
from kd_tune.training.distill import distillation_loss, weighted_cross_entropy
from kd_tune.training.mining import Miner, spaced_top
from kd_tune.training.train import fit

HOP_SAMPLES = SAMPLE_RATE // 10  # 100 ms


class Loudness(nn.Module):
    """A detector whose wake-word logit is a window's mean log-mel: the loudest windows score highest."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # so that the model has a device

    def forward(self, feats):  # [B, n_mels, T] -> [B, 2]
        loud = feats.mean(dim=(1, 2))
        return torch.stack([torch.zeros_like(loud), loud], dim=-1)


def test_spaced_top_takes_the_highest_first_never_two_within_the_spacing():
    # rule: the mined set holds the highest scores, highest first, at most one per `spacing` positions
    scores = torch.tensor([0.1, 0.9, 0.8, 0.2, 0.7, 0.3, 0.6])
    assert spaced_top(scores, 3, spacing=2).tolist() == [1, 4, 6]
    assert spaced_top(scores, 10, spacing=1).tolist() == [1, 2, 4, 6, 5, 3, 0]
    assert spaced_top(scores, 0, spacing=2).tolist() == []


def test_mine_finds_the_windows_the_model_scores_highest():
    # rule: mining keeps the windows of the stream the model scores highest: here the ones over two loud bursts
    g = torch.Generator().manual_seed(0)
    stream = 1e-3 * torch.randn(20 * SAMPLE_RATE, generator=g)  # 20 s of faint noise
    for start_s, level in ((5.0, 0.5), (14.0, 0.2)):  # two bursts of half a second, one louder
        start = int(start_s * SAMPLE_RATE)
        stream[start:start + SAMPLE_RATE // 2] += level * torch.randn(SAMPLE_RATE // 2, generator=g).clamp(-2, 2)
    miner = Miner(stream, count=2, hop_samples=HOP_SAMPLES)
    scores = miner.mine(Loudness(), LogMel(normalize="none"))
    assert miner.windows.shape == (2, N_SAMPLES) and scores[0] >= scores[1]
    louder, softer = miner.windows.abs().amax(dim=1)  # the louder burst first, then the other, not its neighbour
    assert louder > 0.6 and 0.2 < softer < 0.45
    for window in miner.windows:  # each mined window holds most of its burst
        assert (window.abs() > 0.02).sum() > SAMPLE_RATE // 3


def test_each_step_gets_its_share_and_an_epoch_covers_every_mined_window():
    # rule: over one epoch's steps the mined windows are handed out once each, in slices of ~M / steps
    miner = Miner(torch.zeros(3 * N_SAMPLES), count=5, hop_samples=HOP_SAMPLES)
    miner.windows = torch.arange(5.0)[:, None].expand(5, N_SAMPLES)
    seen = torch.cat([miner.batch(step, 3) for step in range(3)])[:, 0].tolist()
    assert seen == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert miner.batch(3, 3)[:, 0].tolist() == [0.0, 1.0]  # the next epoch starts over


def test_mining_is_off_for_count_zero_or_a_stream_shorter_than_a_window():
    # rule: nothing is mined without a count or without a whole window of long audio
    assert not Miner(torch.zeros(10 * N_SAMPLES), count=0, hop_samples=HOP_SAMPLES).enabled
    assert not Miner(torch.zeros(N_SAMPLES - 1), count=8, hop_samples=HOP_SAMPLES).enabled
    with pytest.raises(ValueError, match="hop_samples: got 0"):
        Miner(torch.zeros(N_SAMPLES), count=1, hop_samples=0)


def test_negatives_join_the_cross_entropy_only_with_label_zero_and_their_weight():
    # rule: mined negatives count in the hard-label term as label-0 clips of weight negative_weight, never in the KD
    # term; without them the loss is what it was
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    labels, weights = torch.tensor([0, 1, 1, 0, -1, 1]), torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0, 1.0])
    negatives = torch.randn(3, 2, generator=g)
    plain = distillation_loss(student, teacher, labels, alpha=0.3, temperature=2.0, sample_weight=weights)
    mined = distillation_loss(student, teacher, labels, alpha=0.3, temperature=2.0, sample_weight=weights,
                              negatives=negatives, negative_weight=2.0)
    expected = weighted_cross_entropy(torch.cat([student, negatives]), torch.cat([labels, torch.zeros(3).long()]),
                                      torch.cat([weights, torch.full((3,), 2.0)]))
    assert mined.distillation_loss == plain.distillation_loss
    torch.testing.assert_close(mined.student_loss, expected)
    torch.testing.assert_close(mined.total, 0.7 * expected + 0.3 * plain.distillation_loss)
    empty = distillation_loss(student, teacher, labels, alpha=0.3, temperature=2.0, sample_weight=weights,
                              negatives=negatives[:0])
    assert empty.total == plain.total


@pytest.mark.slow
def test_fit_with_mining_trains_on_mined_windows_and_reports_every_epoch(small_dataset, tmp_path):
    # rule: training.mined_negatives > 0 mines from long/train/ each epoch and trains on them as extra steps' share:
    # the run completes, its losses are finite and differ from a run without mining (same seed)
    from kd_tune.datasets.data import load_data
    from kd_tune.training.train import fit_teacher

    runs = {}
    for count in (0, 64):
        config = tiny_config(small_dataset, tmp_path, "training.epochs=1", f"training.mined_negatives={count}")
        data = load_data(config.data)
        assert len(data.train.of_kind(WINDOW_KIND)) > 0  # the small set has long/train/ audio to mine
        if not count:
            fit_teacher(config, config.teacher("cnn"), data=data)
        report = KeepCheckpoints(tmp_path / f"keep{count}")
        fit(config, report, data=data)
        runs[count] = report.metrics[-1]
    assert all(math.isfinite(runs[64][k]) for k in ("total_loss", "student_loss", "distillation_loss"))
    assert runs[64]["student_loss"] != runs[0]["student_loss"]
    assert runs[64]["step"] == runs[0]["step"]  # mining adds windows to steps, not steps
