import math

import numpy as np
import onnxruntime
import pytest
import torch
import torchaudio

from kd_tune.features import (
    HOP_LENGTH,
    N_FRAMES,
    N_MELS,
    N_SAMPLES,
    SAMPLE_RATE,
    WINDOW_MS,
    Augment,
    LogMel,
    SpecAugment,
    coloured_noise,
    mix_at_snr,
    samples,
    synthetic_rirs,
    time_shift,
)


def waves(batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(N_SAMPLES) / SAMPLE_RATE
    tone = torch.sin(2 * math.pi * 440 * t)
    return 0.5 * tone + 0.1 * torch.randn(batch, N_SAMPLES, generator=generator)  # [B, N]


def no_op_augment(**overrides) -> Augment:
    options = dict(time_shift_ms=0.0, gain_db=0.0, noise_prob=0.0, reverb_prob=0.0)
    return Augment(**(options | overrides))


def test_constants_follow_the_kws_front_end():
    # Rule: audio constants are derived in code: 25 ms / 10 ms windows at 16 kHz give 101 frames per 1 s clip.
    assert (N_SAMPLES, samples(WINDOW_MS), HOP_LENGTH, N_MELS, N_FRAMES) == (16000, 400, 160, 40, 101)


def test_log_mel_shape():
    # Rule: LogMel maps waveform [B, N_SAMPLES] to log-mel [B, n_mels, N_FRAMES].
    assert LogMel()(waves(3)).shape == (3, N_MELS, N_FRAMES)
    assert LogMel(n_mels=64, hop_ms=20)(waves(2)).shape == (2, 64, N_SAMPLES // 320 + 1)


def test_log_mel_matches_torchaudio():
    # Rule: the conv1d STFT front end equals torchaudio MelSpectrogram(center=True) + log(x + 1e-6).
    wave = waves(2)
    reference = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=samples(WINDOW_MS), hop_length=HOP_LENGTH,
                                                     n_mels=N_MELS)
    torch.testing.assert_close(LogMel().power(wave), reference(wave), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(LogMel()(wave), torch.log(reference(wave) + 1e-6), rtol=1e-4, atol=1e-4)


def test_log_mel_of_one_clip_does_not_depend_on_its_batch():
    # Rule: features use a fixed log floor, not a batch-dependent top_db.
    wave = waves(4)
    torch.testing.assert_close(LogMel()(wave[:1]), LogMel()(wave)[:1], rtol=1e-5, atol=1e-5)


def test_log_mel_stays_float32_under_autocast():
    # Rule: the power spectrum is computed in float32 even under mixed precision (float16 overflows on loud clips).
    wave = 30 * waves(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = LogMel()(wave)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, LogMel()(wave))


@pytest.mark.parametrize("bad", [dict(n_mels=0), dict(window_ms=0.0), dict(hop_ms=0.01), dict(mel_scale="bark")])
def test_log_mel_rejects_bad_options(bad):
    # Rule: constructors validate their arguments with a message naming the bad value.
    with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
        LogMel(**bad)


def test_log_mel_onnx_round_trip(tmp_path):
    # Rule: LogMel exports with the legacy exporter (opset 17, dynamic batch) and onnxruntime matches torch to 1e-4.
    path = tmp_path / "log_mel.onnx"
    model = LogMel().eval()
    torch.onnx.export(model, (waves(2),), path, dynamo=False, opset_version=17, input_names=["wave"],
                      output_names=["log_mel"], dynamic_axes={"wave": {0: "batch"}, "log_mel": {0: "batch"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        wave = waves(batch, seed=batch)
        (got,) = session.run(None, {"wave": wave.numpy()})
        np.testing.assert_allclose(got, model(wave).numpy(), rtol=1e-4, atol=1e-4)


def test_augment_is_reproducible_from_the_generator_seed():
    # Rule: every random draw comes from the explicit generator, so a seed names exactly one view.
    augment, wave = Augment(noise_prob=1.0, reverb_prob=1.0), waves(4)
    first = augment(wave, generator=torch.Generator().manual_seed(7))
    again = augment(wave, generator=torch.Generator().manual_seed(7))
    other = augment(wave, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert first.shape == wave.shape and torch.isfinite(first).all()


def test_augment_with_everything_off_is_identity():
    # Rule: each knob can be switched off; with all off the waveform passes through unchanged.
    wave = waves(3)
    assert torch.equal(no_op_augment()(wave, generator=torch.Generator().manual_seed(0)), wave)


def test_gain_stays_within_bounds():
    # Rule: gain is uniform in +-gain_db.
    wave = waves(256)
    out = no_op_augment(gain_db=6.0)(wave, generator=torch.Generator().manual_seed(0))
    gain_db = 20 * torch.log10(out.norm(dim=-1) / wave.norm(dim=-1))
    assert gain_db.abs().max() <= 6.0 + 1e-4
    assert gain_db.min() < -4.0 and gain_db.max() > 4.0


def test_time_shift_zero_fills_and_stays_within_bounds():
    # Rule: time shift delays or advances by at most time_shift_ms, padding with zeros instead of wrapping.
    wave = torch.arange(1, 11, dtype=torch.float32).repeat(2, 1)
    shifted = time_shift(wave, torch.tensor([3, -2]))
    assert shifted[0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert shifted[1].tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 0, 0]
    ones = torch.ones(64, N_SAMPLES)
    out = no_op_augment(time_shift_ms=100.0)(ones, generator=torch.Generator().manual_seed(0))
    zeros_per_clip = (out == 0).sum(-1)
    assert zeros_per_clip.max() <= SAMPLE_RATE // 10 and zeros_per_clip.max() > 0


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
def test_noise_is_mixed_at_the_requested_snr(snr_db):
    # Rule: background noise is scaled so that the signal-to-noise ratio equals the drawn SNR.
    wave = waves(4)
    noise = coloured_noise(4, N_SAMPLES, torch.Generator().manual_seed(1))
    mixed = mix_at_snr(wave, noise, torch.full((4,), snr_db))
    measured = 10 * torch.log10(wave.square().mean(-1) / (mixed - wave).square().mean(-1))
    torch.testing.assert_close(measured, torch.full((4,), snr_db), rtol=0, atol=1e-3)


def test_augment_noise_snr_lies_in_the_configured_range():
    # Rule: with noise_prob=1 every clip gets background from the bank at an SNR in [snr_db_min, snr_db_max].
    wave = waves(32)
    bank = torch.randn(5, 2 * N_SAMPLES, generator=torch.Generator().manual_seed(3))
    augment = no_op_augment(noise_prob=1.0, snr_db_min=5.0, snr_db_max=15.0, noise_bank=bank)
    out = augment(wave, generator=torch.Generator().manual_seed(0))
    snr_db = 10 * torch.log10(wave.square().mean(-1) / (out - wave).square().mean(-1))
    assert snr_db.min() >= 5.0 - 1e-3 and snr_db.max() <= 15.0 + 1e-3


def test_synthetic_rirs_decay_and_reverb_keeps_length():
    # Rule: synthetic RIRs are unit-energy, decaying responses generated once from a seed; reverb keeps shapes.
    rirs = synthetic_rirs(8, seed=0)
    assert torch.equal(rirs, synthetic_rirs(8, seed=0))
    torch.testing.assert_close(rirs.norm(dim=-1), torch.ones(8))
    tail = rirs[:, 1:].abs()
    assert (tail[:, :800].mean(-1) > tail[:, -800:].mean(-1)).all()
    out = no_op_augment(reverb_prob=1.0)(waves(3), generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, N_SAMPLES) and not torch.allclose(out, waves(3))


@pytest.mark.parametrize("bad", [dict(noise_prob=1.5), dict(gain_db=-1.0), dict(time_shift_ms=-5.0),
                                 dict(reverb_prob=-0.1), dict(snr_db_min=30.0)])
def test_augment_rejects_bad_knobs(bad):
    # Rule: augmentation knobs are validated with a message naming the bad value.
    with pytest.raises(ValueError, match=next(iter(bad))):
        Augment(**bad)


def test_augment_rejects_short_noise_bank():
    # Rule: noise bank clips shorter than the waveforms are a clear error.
    augment = Augment(noise_prob=1.0, noise_bank=torch.randn(2, 100))
    with pytest.raises(ValueError, match="noise_bank"):
        augment(waves(2), generator=torch.Generator().manual_seed(0))


def test_spec_augment_masks_only_within_bounds():
    # Rule: SpecAugment replaces at most 2 bands of <= freq_mask_bins bins and 2 of <= time_mask_frames frames.
    features = torch.randn(16, N_MELS, N_FRAMES, generator=torch.Generator().manual_seed(0))
    out = SpecAugment(freq_mask_bins=5, time_mask_frames=10)(features, generator=torch.Generator().manual_seed(1))
    changed = out != features  # [B, F, T]
    masked_bins = changed.all(dim=2).sum(-1)  # whole frequency rows replaced
    masked_frames = changed.all(dim=1).sum(-1)  # whole time columns replaced
    assert masked_bins.max() <= 10 and masked_frames.max() <= 20 and changed.any()
    rows_or_columns = changed.all(dim=2)[:, :, None] | changed.all(dim=1)[:, None, :]
    assert torch.equal(changed, rows_or_columns)
    means = features.mean(dim=(1, 2), keepdim=True).expand_as(features)
    assert torch.equal(out[changed], means[changed])


def test_spec_augment_is_reproducible():
    # Rule: SpecAugment draws from the explicit generator.
    features, spec_augment = torch.randn(4, N_MELS, N_FRAMES), SpecAugment()
    first = spec_augment(features, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, spec_augment(features, generator=torch.Generator().manual_seed(3)))
