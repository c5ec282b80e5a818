"""kd_tune.audio.features: the log-mel front end, its normalizations, and training's augmentation of each clip."""

import math

import numpy as np
import onnxruntime
import pytest
import torch
import torchaudio

from kd_tune.audio.acoustics import (DRR_DB, channel_gain_db, filter_rows, response_grid, reverberate,
                                     synthetic_rirs)
from kd_tune.audio.features import (HOP_LENGTH, HOP_MS, N_FRAMES, N_MELS, N_SAMPLES, NOISE_KINDS, NORMALIZATIONS,
                                    PCEN_TIME_CONSTANT_S, SAMPLE_RATE, WINDOW_MS, Augment, LogMel, SpecAugment,
                                    front_end, pcen_kernel, render_view, samples, time_shift)
from kd_tune.config import AugmentConfig, validate
from kd_tune.errors import ConfigError

# Augment settings: every effect off, every effect on every clip, every effect on half the clips.
OFF = dict(time_shift_ms=0.0, gain_db=0.0, noise_prob=0.0, reverb_prob=0.0, band_limit_prob=0.0, eq_prob=0.0,
           clip_prob=0.0, bit_depth_prob=0.0)
ALL_ON = dict(noise_prob=1.0, reverb_prob=1.0, band_limit_prob=1.0, eq_prob=1.0, clip_prob=1.0, bit_depth_prob=1.0)
HALF = dict(noise_prob=0.5, reverb_prob=0.5, band_limit_prob=0.5, eq_prob=0.5, clip_prob=0.5, bit_depth_prob=0.5)
CHANNEL_DRAWS = ("lowpass_hz", "highpass_hz", "eq_hz", "eq_db", "eq_octaves")  # channel_gain_db's arguments


def waves(batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(N_SAMPLES) / SAMPLE_RATE
    tone = torch.sin(2 * math.pi * 440 * t)
    return 0.5 * tone + 0.1 * torch.randn(batch, N_SAMPLES, generator=generator)  # [B, N]


def augment_with(**overrides) -> Augment:
    """Augment with every effect off except the overridden settings."""
    return Augment(AugmentConfig(**(OFF | overrides)))


def snr_of(clean: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """[B] dB of clean over what was added to it."""
    return 10 * torch.log10(clean.square().mean(-1) / (mixed - clean).square().mean(-1))


def power_ratio(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """[B, 8001] power ratio after / before per 1 Hz bin of 1 s clips, as linear power (not dB).

    Hann-windowed, so that the clip's edges (where a filter's response is cut off) do not leak into the stopband."""
    window = torch.hann_window(before.shape[-1])
    return power_spectrum(after * window) / power_spectrum(before * window).clamp_min(1e-20)


def power_spectrum(wave: torch.Tensor) -> torch.Tensor:
    return torch.fft.rfft(wave).abs().square()


def energy_db(ratios: torch.Tensor) -> torch.Tensor:
    """The mean of power ratios [..., F] over the last axis, in dB."""
    return 10 * torch.log10(ratios.mean(-1))


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


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_log_mel_onnx_round_trip(tmp_path, normalize):
    # Rule: LogMel, with every normalization, exports with the legacy exporter (opset 17, dynamic batch) and
    # onnxruntime matches torch to 1e-4.
    path = tmp_path / "log_mel.onnx"
    model = LogMel(normalize=normalize).eval()
    torch.onnx.export(model, (waves(2),), path, dynamo=False, opset_version=17, input_names=["wave"],
                      output_names=["log_mel"], dynamic_axes={"wave": {0: "batch"}, "log_mel": {0: "batch"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        wave = waves(batch, seed=batch)
        (got,) = session.run(None, {"wave": wave.numpy()})
        np.testing.assert_allclose(got, model(wave).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("normalize", ["mean", "pcen"])
def test_normalized_features_barely_change_with_the_level(normalize):
    # Rule: "mean" makes a gain an exact no-op (but for the log floor); PCEN divides each band by its own smoothed
    # energy, so 40 dB quieter moves it far less than it moves the plain log-mel.
    wave = waves(2)
    plain, normalized = LogMel(), LogMel(normalize=normalize)
    change = {name: (front(wave * 0.01) - front(wave)).abs().mean() / front(wave).std()
              for name, front in (("plain", plain), ("normalized", normalized))}
    assert change["normalized"] < (1e-3 if normalize == "mean" else 0.25) * change["plain"]


def test_pcen_kernel_is_a_smoother_of_the_configured_time_constant():
    # Rule: the PCEN smoother's weights sum to 1, grow towards the newest frame, and a step in energy is followed with
    # the time constant: after PCEN_TIME_CONSTANT_S the smoothed energy has gone 1 - 1/e of the way (within 5%).
    kernel = pcen_kernel(HOP_MS)[0, 0]
    assert kernel.sum() == pytest.approx(1.0) and (kernel.diff() > 0).all()
    frames = round(PCEN_TIME_CONSTANT_S * 1000 / HOP_MS)
    reached = kernel[-frames:].sum() / kernel.sum()
    assert reached == pytest.approx(1 - math.exp(-1), rel=0.05)


def test_unknown_normalization_is_refused_with_the_allowed_ones():
    # Rule: a constructor names the bad value and what is allowed.
    with pytest.raises(ValueError, match="normalize must be one of .*'pcen'.*got 'cmvn'"):
        LogMel(normalize="cmvn")


def test_augment_is_reproducible_from_the_generator_seed():
    # Rule: every random draw comes from the explicit generator, so a seed names exactly one view.
    augment, wave = augment_with(**ALL_ON), waves(4)
    first = augment(wave, generator=torch.Generator().manual_seed(7))
    again = augment(wave, generator=torch.Generator().manual_seed(7))
    other = augment(wave, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert first.shape == wave.shape and torch.isfinite(first).all()


def test_a_clips_view_depends_neither_on_its_batch_nor_on_the_other_clips():
    # Rule: render_view gives clip i the same view whether it is rendered alone, in a shorter batch or next to other
    # audio, so the teacher-output cache and a training epoch agree however they batch.
    audio = waves(260)  # two chunks of render_view
    augment = Augment(AugmentConfig(**HALF), noise_bank=torch.randn(4, N_SAMPLES))
    full = render_view(audio, augment, view=3, seed=5)
    for count in (1, 2, 37):
        assert torch.equal(render_view(audio[:count], augment, view=3, seed=5), full[:count]), count
    assert torch.equal(render_view(audio[:258], augment, view=3, seed=5)[256:], full[256:258])
    changed = audio.clone()
    changed[0] = 0.0
    assert torch.equal(render_view(changed, augment, view=3, seed=5)[1:], full[1:])
    assert not torch.equal(render_view(audio[:8], augment, view=4, seed=5), full[:8])


def test_filters_round_each_row_the_same_whatever_its_batch():
    # Rule: rooms, channel filters and channel responses give a row bit for bit the same result alone or in any
    # batch (torch's one-row FFT, complex product and sigmoid round by position, so the effects avoid them).
    generator = torch.Generator().manual_seed(9)
    wave, rooms = torch.randn(24, N_SAMPLES, generator=generator), synthetic_rirs(24, seed=1)
    n_fft = 2 ** math.ceil(math.log2(N_SAMPLES + rooms.shape[-1] - 1))
    spectra = torch.fft.rfft(rooms, n=n_fft)
    augment = augment_with()
    draws = augment.draw(24, generator)
    gains = channel_gain_db(response_grid(), *(draws[k] for k in CHANNEL_DRAWS))
    whole = (reverberate(wave, spectra, n_fft), gains, filter_rows(wave, gains))
    for count in (1, 3, 5, 21):
        part = (reverberate(wave[:count], spectra[:count], n_fft),
                channel_gain_db(response_grid(), *(draws[k][:count] for k in CHANNEL_DRAWS)),
                filter_rows(wave[:count], gains[:count]))
        for got, want in zip(part, whole, strict=True):
            assert torch.equal(got, want[:count]), count


def test_augment_with_everything_off_is_identity():
    # Rule: each knob can be switched off; with all off the waveform passes through unchanged.
    wave = waves(3)
    assert torch.equal(augment_with()(wave, generator=torch.Generator().manual_seed(0)), wave)


@pytest.mark.parametrize("prob,draw", [("reverb_prob", "reverb"), ("noise_prob", "noisy"),
                                       ("band_limit_prob", "band_limit"), ("eq_prob", "eq"), ("clip_prob", "clip"),
                                       ("bit_depth_prob", "quantize")])
def test_each_effect_changes_only_the_rows_its_probability_picks(prob, draw):
    # Rule: an effect whose coin says no leaves a clip bit for bit untouched; where it says yes the clip changes.
    wave, augment = waves(64), augment_with(**{prob: 0.5})
    picked = augment.draw(64, torch.Generator().manual_seed(2))[draw]
    out = augment(wave, generator=torch.Generator().manual_seed(2))
    assert 0 < picked.sum() < 64
    assert torch.equal(out[~picked], wave[~picked])
    assert (out[picked] != wave[picked]).any(dim=-1).all()


def test_gain_stays_within_bounds():
    # Rule: gain is uniform in +-gain_db.
    wave = waves(256)
    out = augment_with(gain_db=6.0)(wave, generator=torch.Generator().manual_seed(0))
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
    out = augment_with(time_shift_ms=100.0)(ones, generator=torch.Generator().manual_seed(0))
    zeros_per_clip = (out == 0).sum(-1)
    assert zeros_per_clip.max() <= SAMPLE_RATE // 10 and zeros_per_clip.max() > 0


def test_every_noise_kind_is_mixed_at_its_drawn_snr():
    # Rule: with noise_prob=1 every clip gets noise of one of the four kinds (bank, coloured, tones, transients) at
    # the SNR drawn for it, inside [snr_db_min, snr_db_max] (0-20 dB by default).
    wave, bank = waves(64), torch.randn(5, 2 * N_SAMPLES, generator=torch.Generator().manual_seed(3))
    weights = {f"noise_{kind}_weight": 0.25 for kind in NOISE_KINDS}
    augment = Augment(AugmentConfig(**(OFF | weights | {"noise_prob": 1.0})), noise_bank=bank)
    draws = augment.draw(64, torch.Generator().manual_seed(0))
    measured = snr_of(wave, augment(wave, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(measured, draws["snr_db"], rtol=0, atol=0.01)
    assert draws["snr_db"].min() >= 0.0 and draws["snr_db"].max() <= 20.0
    assert set(draws["kind"].tolist()) == set(range(len(NOISE_KINDS)))


def test_band_limit_removes_energy_outside_the_drawn_band():
    # Rule: band-limiting keeps the band between the drawn high-pass and low-pass and removes what lies outside it.
    wave = torch.randn(32, N_SAMPLES, generator=torch.Generator().manual_seed(4))
    augment = augment_with(band_limit_prob=1.0, lowpass_hz_max=5000.0)
    draws = augment.draw(32, torch.Generator().manual_seed(1))
    gain = power_ratio(wave, augment(wave, generator=torch.Generator().manual_seed(1)))  # [B, 8001] per Hz
    cutoffs = zip(draws["lowpass_hz"].tolist(), draws["highpass_hz"].tolist(), strict=True)
    for row, (lowpass, highpass) in enumerate(cutoffs):
        above, passband = gain[row, int(1.5 * lowpass):], gain[row, int(2 * highpass):int(0.7 * lowpass)]
        below = gain[row, 1:int(highpass / 2)]
        assert energy_db(above) < -25 and abs(energy_db(passband)) < 0.5 and energy_db(below) < -10, row


def test_eq_changes_band_energy_by_the_drawn_gains():
    # Rule: a peaking band changes the energy at its centre by its gain, and the EQ the channel applies is the sum of
    # the drawn bands (measured in 1/6-octave bands of white noise, within 0.5 dB).
    hz = torch.arange(1.0, 8001.0)
    one_peak = channel_gain_db(hz, torch.tensor([math.inf]), torch.tensor([0.0]), torch.tensor([[100.0, 1000, 1, 1]]),
                               torch.tensor([[0.0, 5.0, 0, 0]]), torch.tensor([[1.0, 0.5, 1, 1]]))
    assert abs(one_peak[0, 999].item() - 5.0) < 1e-4 and abs(one_peak[0, 7999].item()) < 0.01
    wave = torch.randn(8, N_SAMPLES, generator=torch.Generator().manual_seed(5))
    augment = augment_with(eq_prob=1.0)
    draws = augment.draw(8, torch.Generator().manual_seed(6))
    measured = power_ratio(wave, augment(wave, generator=torch.Generator().manual_seed(6)))
    predicted = channel_gain_db(hz, torch.full((8,), math.inf), torch.zeros(8), draws["eq_hz"], draws["eq_db"],
                                draws["eq_octaves"])
    for centre in 2 ** torch.arange(math.log2(100), math.log2(7000), 1 / 6):
        band = slice(int(centre * 2 ** (-1 / 12)), int(centre * 2 ** (1 / 12)))
        want = 10 * torch.log10((10 ** (predicted[:, band] / 10)).mean(-1))
        torch.testing.assert_close(energy_db(measured[:, band]), want, rtol=0, atol=0.5)
    assert (predicted.amax(-1) - predicted.amin(-1) > 3).all()


def test_clipping_bounds_the_peak():
    # Rule: clipping limits each clip to its drawn level under its own peak, hard (clamped) or soft (tanh).
    wave = waves(32)
    augment = augment_with(clip_prob=1.0, clip_db=12.0)
    draws = augment.draw(32, torch.Generator().manual_seed(2))
    out = augment(wave, generator=torch.Generator().manual_seed(2))
    ceiling = wave.abs().amax(-1) * 10 ** (-draws["clip_db"] / 20)
    assert (out.abs().amax(-1) <= ceiling * (1 + 1e-6)).all()
    hard = draws["hard_clip"]
    at_ceiling = (out.abs() >= ceiling[:, None] * (1 - 1e-6)).sum(-1)
    assert 0 < hard.sum() < 32 and (at_ceiling[hard] > 0).all() and (at_ceiling[~hard] == 0).all()


def test_quantization_gives_at_most_2_to_the_bits_levels():
    # Rule: low bit depth rounds each clip to at most 2^bits levels, at most half a step from the input.
    wave = torch.randn(16, N_SAMPLES, generator=torch.Generator().manual_seed(3))
    augment = augment_with(bit_depth_prob=1.0, bits_min=4, bits_max=8)
    bits = augment.draw(16, torch.Generator().manual_seed(4))["bits"]
    out = augment(wave, generator=torch.Generator().manual_seed(4))
    for row, b in enumerate(bits.tolist()):
        levels = out[row].unique().numel()
        step = wave[row].abs().max() / 2 ** (b - 1)
        assert 2**b // 2 < levels <= 2**b and (out[row] - wave[row]).abs().max() <= step * (1 + 1e-5)


def test_synthetic_rooms_vary_in_rt60_and_direct_to_reverberant_ratio():
    # Rule: synthetic rooms are unit-energy, seeded responses whose direct-to-reverberant ratio spans DRR_DB and
    # whose decay times span short and long rooms; reverberation keeps the clip's shape.
    rirs = synthetic_rirs(64, seed=0)
    assert torch.equal(rirs, synthetic_rirs(64, seed=0))
    torch.testing.assert_close(rirs.norm(dim=-1), torch.ones(64))
    drr_db = 10 * torch.log10(rirs[:, 0] ** 2 / rirs[:, 1:].square().sum(-1))
    assert drr_db.min() >= DRR_DB[0] - 1e-3 and drr_db.max() <= DRR_DB[1] + 1e-3
    assert drr_db.max() - drr_db.min() > 12
    remaining = rirs[:, 1:].square().flip(-1).cumsum(-1).flip(-1)  # Schroeder decay curve of the reverberant part
    decay_20_db_s = (remaining > remaining[:, :1] * 0.01).sum(-1) / SAMPLE_RATE
    assert decay_20_db_s.min() < 0.1 and decay_20_db_s.max() > 0.25
    out = augment_with(reverb_prob=1.0)(waves(3), generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, N_SAMPLES) and not torch.allclose(out, waves(3))


@pytest.mark.parametrize("bad", [dict(noise_prob=1.5), dict(gain_db=-1.0), dict(time_shift_ms=-5.0),
                                 dict(reverb_prob=-0.1), dict(snr_db_min=30.0), dict(band_limit_prob=2.0),
                                 dict(lowpass_hz_min=500.0), dict(highpass_hz_max=2000.0), dict(eq_db=-1.0),
                                 dict(clip_prob=1.1), dict(clip_db=100.0), dict(bit_depth_prob=-0.5),
                                 dict(bits_min=1), dict(bits_max=17), dict(bits_min=14),
                                 dict(lowpass_hz_min=7000.0, lowpass_hz_max=4000.0), dict(noise_tones_weight=3.0)])
def test_augment_settings_out_of_bounds_are_refused_naming_the_field(bad):
    # Rule: each augmentation setting has bounds; a value outside them is refused with a message naming the field.
    with pytest.raises(ConfigError, match=next(iter(bad))):
        validate({"augment": bad})
    with pytest.raises(ValueError, match=next(iter(bad))):
        Augment(AugmentConfig(**bad))


def test_noise_without_any_kind_is_refused():
    # Rule: noise_prob > 0 needs at least one noise kind with a weight above 0.
    zero = {f"noise_{kind}_weight": 0.0 for kind in NOISE_KINDS}
    with pytest.raises(ConfigError, match="noise_prob is 0.5 but every noise_\\*_weight is 0"):
        validate({"augment": zero | {"noise_prob": 0.5}})
    assert validate({"augment": zero | {"noise_prob": 0.0}}).augment.noise_prob == 0.0


def test_front_end_builds_augment_from_the_config():
    # Rule: front_end's Augment carries the config's augment settings; augment.enabled=false gives none.
    config = validate({"augment": {"enabled": True, "eq_prob": 0.7, "bits_min": 9}})
    _, augment, _ = front_end(config, torch.zeros(0, N_SAMPLES), torch.device("cpu"))
    assert augment.settings == config.augment
    off = validate({"augment": {"enabled": False}})
    assert front_end(off, torch.zeros(0, N_SAMPLES), torch.device("cpu"))[1] is None


def test_augment_rejects_short_noise_bank():
    # Rule: noise bank clips shorter than the waveforms are a clear error.
    augment = Augment(AugmentConfig(noise_prob=1.0, noise_bank_weight=1.0), noise_bank=torch.randn(2, 100))
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
