"""Synthetic acoustic conditions for waveform augmentation: rooms, noise sources and microphone channels.

Every function works on rows [B, N] with one parameter set per row and draws no random numbers: features.Augment
draws them all from its generator. The only randomness here builds fixed tables (rooms, coloured noise) once, from a
seed. Slow curves (pitch, envelopes, channel responses) are computed on a coarse grid and interpolated, so each
effect costs a few passes over the samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SAMPLE_RATE = 16000  # Hz
NYQUIST_HZ = SAMPLE_RATE / 2
TINY = 1e-12  # floor for powers and peaks, so silent rows stay silent instead of turning into NaN

RT60_S = (0.1, 1.0)  # synthetic rooms: a dry booth to a bare hall
DRR_DB = (-6.0, 12.0)  # direct-to-reverberant ratio: a far talker in a live room to a close talker
EARLY_REFLECTIONS = 6  # discrete wall reflections before the diffuse tail
EARLY_MS = (1.0, 50.0)
EARLY_SHARE = (0.1, 0.6)  # fraction of the reverberant energy in the early reflections
AIR_SPLIT_HZ = 4000.0  # above it the tail decays HIGH_DECAY_RATIO times as long (air and soft furnishings absorb highs)
HIGH_DECAY_RATIO = 0.5

COLOUR_BETAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)  # 1/f^beta spectra: white, pink (1), brown (2)
NOISE_TABLE_S = 4  # seconds of noise per colour; a 1 s crop starts anywhere in it
NOISE_FLOOR_HZ = 20.0  # brown noise is mostly inaudible drift below this: cut it so the SNR measures audible noise
STEP = 16  # samples per step (1 ms) of the coarse grid for pitch and envelopes
WAVETABLE_SIZE = 4096
# Harmonic amplitudes of the tone timbres (flute, clarinet, brass, organ); 8 x 880 Hz stays below NYQUIST_HZ.
TIMBRES = ({1: 1.0, 2: 0.3, 3: 0.1}, {1: 1.0, 3: 1 / 3, 5: 1 / 5, 7: 1 / 7}, {h: 1.0 / h for h in range(1, 9)},
           {1: 1.0, 2: 0.5, 4: 0.25, 8: 0.125})

LOWPASS_ORDER = 8  # Butterworth magnitude: a steep codec / anti-aliasing edge
HIGHPASS_ORDER = 2  # a microphone's gentle bass roll-off
EQ_SHAPES = ("low_shelf", "peak", "peak", "high_shelf")
EQ_HZ = ((80.0, 400.0), (200.0, 5000.0), (200.0, 5000.0), (2000.0, 6000.0))  # where each band's centre may fall
SHELF_SLOPE = 4.0  # a shelf moves from 12% to 88% of its gain within one octave of its centre
RESPONSE_BINS = 257  # coarse grid (31 Hz) of a channel response; interpolated to the FFT bins
RESPONSE_FLOOR_DB = -120.0
FILTER_PAD = 256  # zero padding before FFT filtering, so a filter's ringing does not wrap around


def uniform(low: float | Tensor, high: float | Tensor, size: int | tuple[int, ...],
            generator: torch.Generator) -> Tensor:
    """Uniform draws on the generator's device (a CPU generator gives the same views on any device)."""
    return low + (high - low) * torch.rand(size, generator=generator, device=generator.device)


def log_uniform(low: float | Tensor, high: float | Tensor, size: int | tuple[int, ...],
                generator: torch.Generator) -> Tensor:
    """Draws whose logarithm is uniform: equal odds per octave (frequencies) or per decade (times)."""
    low, high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
    return torch.exp(uniform(low.log(), high.log(), size, generator))


def fft_size(length: int) -> int:
    """The power of two >= length: odd FFT sizes are ~2x slower."""
    return 2 ** math.ceil(math.log2(max(length, 1)))


# ---------------------------------------------------------------- arithmetic that rounds alike in any batch


# A clip's view must not depend on which other clips share its batch, so the effects avoid the places where torch's CPU
# kernels round an element differently by where it sits (vectorised and scalar loops disagree, and which elements
# meet the scalar loop depends on the tensor's size): the one-row FFT path, complex multiplication, pow and sigmoid.
def db_to_gain(db: Tensor) -> Tensor:
    """Amplitude factor of db decibels: exp, not 10 ** x, whose loops round differently (see above)."""
    return torch.exp(db * (math.log(10) / 20))


def db_to_power(db: Tensor) -> Tensor:
    return torch.exp(db * (math.log(10) / 10))


def rfft_rows(rows: Tensor, n: int) -> Tensor:
    """torch.fft.rfft of rows [B, L] at size n, rounded the same whatever B."""
    return torch.fft.rfft(rows.repeat(2, 1), n=n)[:1] if len(rows) == 1 else torch.fft.rfft(rows, n=n)


def irfft_rows(spectra: Tensor, n: int) -> Tensor:
    """torch.fft.irfft of spectra [B, F] to n samples, rounded the same whatever B."""
    return torch.fft.irfft(spectra.repeat(2, 1), n=n)[:1] if len(spectra) == 1 else torch.fft.irfft(spectra, n=n)


def complex_product(a: Tensor, b: Tensor) -> Tensor:
    """a * b for complex tensors, in real arithmetic (each element rounded the same wherever it sits)."""
    (ar, ai), (br, bi) = torch.view_as_real(a).unbind(-1), torch.view_as_real(b).unbind(-1)
    return torch.complex(ar * br - ai * bi, ar * bi + ai * br)


# ---------------------------------------------------------------- rooms


def synthetic_rirs(count: int, *, rt60_s: tuple[float, float] = RT60_S, drr_db: tuple[float, float] = DRR_DB,
                   seed: int = 0) -> Tensor:
    """[count, rt60_max * SAMPLE_RATE] unit-energy room responses: direct path, early reflections, diffuse tail.

    Each room draws its RT60 and its direct-to-reverberant ratio; its highs die out faster than its lows.
    """
    if count < 1:
        raise ValueError(f"n_rirs must be >= 1, got {count!r}")
    if not 0 < rt60_s[0] <= rt60_s[1]:
        raise ValueError(f"rt60_s must be (low, high) seconds with 0 < low <= high, got {rt60_s!r}")
    generator = torch.Generator().manual_seed(seed)
    length = int(rt60_s[1] * SAMPLE_RATE)
    rt60 = uniform(*rt60_s, (count, 1), generator)
    drr = uniform(*drr_db, (count, 1), generator)
    early_share = uniform(*EARLY_SHARE, (count, 1), generator)
    delays = (uniform(*EARLY_MS, (count, EARLY_REFLECTIONS), generator) * SAMPLE_RATE / 1000).long()
    signs = torch.randint(2, (count, EARLY_REFLECTIONS), generator=generator) * 2.0 - 1
    early = torch.zeros(count, length).scatter_add_(1, delays, signs * decay(delays / SAMPLE_RATE, rt60))
    low, high = split_at(torch.randn(count, length, generator=generator), AIR_SPLIT_HZ)
    t = torch.arange(length) / SAMPLE_RATE
    tail = (low * decay(t, rt60) + high * decay(t, rt60 * HIGH_DECAY_RATIO)) * (t >= EARLY_MS[0] / 1000)
    reverberant = unit_energy(unit_energy(early) * early_share.sqrt() + unit_energy(tail) * (1 - early_share).sqrt())
    rirs = reverberant * 10 ** (-drr / 20)  # the direct path below has energy 1
    rirs[:, 0] = 1.0
    return unit_energy(rirs)


def decay(t: Tensor, rt60: Tensor) -> Tensor:
    """Amplitude envelope that falls 60 dB at t = rt60."""
    return torch.exp(-3 * math.log(10) * t / rt60)


def unit_energy(rows: Tensor) -> Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(TINY)


def split_at(rows: Tensor, hz: float) -> tuple[Tensor, Tensor]:
    """rows [B, L] as (content below hz, content above it)."""
    length = rows.shape[-1]
    below = torch.fft.rfftfreq(length, 1 / SAMPLE_RATE) < hz
    low = torch.fft.irfft(torch.fft.rfft(rows) * below, n=length)
    return low, rows - low


def reverberate(wave: Tensor, room_spectra: Tensor, n_fft: int) -> Tensor:
    """Each row of wave [B, N] convolved with its room, given as rfft spectra [B, n_fft // 2 + 1]; first N samples."""
    product = complex_product(rfft_rows(wave, n_fft), room_spectra)
    return irfft_rows(product, n_fft)[:, :wave.shape[-1]]


# ---------------------------------------------------------------- noise sources


def mix_at_snr(wave: Tensor, noise: Tensor, snr_db: Tensor) -> Tensor:
    """wave + noise scaled so that 10 log10(P_wave / P_noise) = snr_db [B]; silent noise adds nothing."""
    wave_power = wave.square().mean(-1, keepdim=True)  # [B, 1]
    noise_power = noise.square().mean(-1, keepdim=True).clamp_min(TINY)
    return wave + torch.sqrt(wave_power / (noise_power * db_to_power(snr_db[:, None]))) * noise


def coloured_table(*, seed: int = 0, seconds: int = NOISE_TABLE_S) -> Tensor:
    """[len(COLOUR_BETAS), seconds * SAMPLE_RATE] unit-variance noise with power spectrum 1/f^beta, a row per beta."""
    generator = torch.Generator().manual_seed(seed)
    length = seconds * SAMPLE_RATE
    white = torch.randn(len(COLOUR_BETAS), length, generator=generator)
    freqs = torch.fft.rfftfreq(length, 1 / SAMPLE_RATE)
    shape = freqs.clamp_min(NOISE_FLOOR_HZ) ** (-torch.tensor(COLOUR_BETAS)[:, None] / 2) * (freqs >= NOISE_FLOOR_HZ)
    shaped = torch.fft.irfft(torch.fft.rfft(white) * shape, n=length)
    return shaped / shaped.std(dim=-1, keepdim=True)


def crops(clips: Tensor, index: Tensor, start: Tensor, length: int) -> Tensor:
    """[B, length] windows of clips [K, L]: row b from clip index[b], starting at fraction start[b] of the slack."""
    slack = clips.shape[-1] - length
    offset = (start * (slack + 1)).long().clamp(max=slack)
    return clips.unfold(1, length, 1)[index, offset]  # unfold is a view: only the B windows are copied


def wavetables() -> Tensor:
    """[len(TIMBRES), WAVETABLE_SIZE + 1] one period of each timbre, unit RMS; the last sample repeats the first."""
    phase = 2 * math.pi * torch.arange(WAVETABLE_SIZE + 1, dtype=torch.float64) / WAVETABLE_SIZE
    tables = torch.stack([sum((a * torch.sin(h * phase) for h, a in timbre.items()), torch.zeros_like(phase))
                          for timbre in TIMBRES])
    return (tables / tables[:, :-1].square().mean(-1, keepdim=True).sqrt()).float()


def coarse_times(length: int, device: torch.device) -> Tensor:
    """[ceil(length / STEP) + 1] seconds of the coarse grid's points, one every STEP samples."""
    return torch.arange(-(-length // STEP) + 1, device=device) * (STEP / SAMPLE_RATE)


def upsample(coarse: Tensor, length: int) -> Tensor:
    """[B, length] linear interpolation of coarse [B, S], whose point s sits at sample s * STEP."""
    ramp = torch.arange(STEP, device=coarse.device) / STEP
    return (coarse[:, :-1, None] + (coarse[:, 1:] - coarse[:, :-1])[:, :, None] * ramp).flatten(1)[:, :length]


def tones(pitch: Tensor, note_s: Tensor, decay_s: Tensor, tables: Tensor, length: int) -> Tensor:
    """[B, length] melodies: note i of row b sounds pitch[b, i] semitones from A4 (440 Hz) from i * note_s[b] on, in
    the timbre tables[b] (a wavetable row), decaying with time constant decay_s[b]."""
    t = coarse_times(length, pitch.device)  # [S]
    note = (t / note_s[:, None]).long().clamp(max=pitch.shape[1] - 1)  # [B, S]
    hz = 440.0 * torch.exp(torch.gather(pitch, 1, note).float() * (math.log(2) / 12))
    cycles = (torch.cumsum(hz, 1) - hz) * (STEP / SAMPLE_RATE)  # phase at each step's start
    cycles = cycles - cycles.floor()  # whole cycles dropped while the numbers are few: keeps float32 exact enough
    within = torch.arange(STEP, device=pitch.device) / SAMPLE_RATE
    phase = (cycles[:, :-1, None] + hz[:, :-1, None] * within).flatten(1)[:, :length]  # [B, length] cycles
    index = (torch.remainder(phase, 1.0) * WAVETABLE_SIZE).long()
    envelope = torch.exp(-(t - note * note_s[:, None]) / decay_s[:, None])
    return torch.gather(tables, 1, index) * upsample(envelope, length)


def transients(excitation: Tensor, onset_s: Tensor, decay_s: Tensor, level: Tensor) -> Tensor:
    """excitation [B, N] gated into events (clicks, knocks, slams): event k of row b starts at onset_s[b, k] (a 1 ms
    attack) at amplitude level[b, k] and decays with time constant decay_s[b, k]; level 0 is no event."""
    since = coarse_times(excitation.shape[-1], excitation.device) - onset_s[..., None]  # [B, K, S]
    gates = level[..., None] * torch.exp(-since.clamp_min(0) / decay_s[..., None]) * (since > 0)
    return excitation * upsample(gates.sum(1), excitation.shape[-1])


# ---------------------------------------------------------------- microphone and channel


def channel_gain_db(freqs_hz: Tensor, lowpass_hz: Tensor, highpass_hz: Tensor, eq_hz: Tensor, eq_db: Tensor,
                    eq_octaves: Tensor) -> Tensor:
    """[B, F] gain in dB at freqs_hz [F]: Butterworth low-pass [B] (inf: none) and high-pass [B] (0: none) magnitudes,
    then the EQ_SHAPES bands: centres eq_hz [B, E], gains eq_db [B, E], peak widths eq_octaves [B, E] (std, octaves)."""
    f = freqs_hz.clamp_min(1.0)
    gain = -10 * torch.log10(1 + torch.exp(2 * LOWPASS_ORDER * torch.log(f / lowpass_hz[:, None])))
    gain = gain - 10 * torch.log10(1 + torch.exp(2 * HIGHPASS_ORDER * torch.log(highpass_hz[:, None] / f)))
    for band, shape in enumerate(EQ_SHAPES):
        octaves = torch.log2(f / eq_hz[:, band, None])  # [B, F]
        if shape == "peak":
            weight = torch.exp(-0.5 * (octaves / eq_octaves[:, band, None]).square())
        else:
            weight = 1 / (1 + torch.exp(SHELF_SLOPE * octaves * (-1 if shape == "high_shelf" else 1)))  # sigmoid
        gain = gain + eq_db[:, band, None] * weight
    return gain.clamp_min(RESPONSE_FLOOR_DB)


def response_grid(device: torch.device | None = None) -> Tensor:
    """[RESPONSE_BINS] Hz from 0 to Nyquist: the coarse grid channel responses are computed on."""
    return torch.linspace(0, NYQUIST_HZ, RESPONSE_BINS, device=device)


def filter_rows(wave: Tensor, gain_db: Tensor) -> Tensor:
    """wave [B, N] through zero-phase filters given as gains in dB [B, RESPONSE_BINS] on response_grid()."""
    n_fft = fft_size(wave.shape[-1] + FILTER_PAD)
    spectrum = rfft_rows(wave, n_fft)
    gain_db = F.interpolate(gain_db[:, None], size=spectrum.shape[-1], mode="linear", align_corners=True)[:, 0]
    gain = db_to_gain(gain_db)
    return irfft_rows(torch.complex(spectrum.real * gain, spectrum.imag * gain), n_fft)[:, :wave.shape[-1]]


def clip(wave: Tensor, level: Tensor, hard: Tensor) -> Tensor:
    """wave [B, N] limited to level[b] (<= 1) times the row's peak: hard[b] rows clamp, the others saturate (tanh)."""
    ceiling = (wave.abs().amax(-1, keepdim=True) * level[:, None]).clamp_min(TINY)
    return torch.where(hard[:, None], wave.clamp(-ceiling, ceiling), ceiling * torch.tanh(wave / ceiling))


def at_peak(wave: Tensor, peak_dbfs: Tensor) -> Tensor:
    """wave [B, N] scaled so that row b peaks at peak_dbfs[b] dB below full scale; silent rows stay silent."""
    return wave * (db_to_gain(peak_dbfs)[:, None] / wave.abs().amax(-1, keepdim=True).clamp_min(TINY))


def quantize(wave: Tensor, bits: Tensor) -> Tensor:
    """wave [B, N] rounded to 2^bits[b] levels over the row's peak: a converter whose full scale is the clip's peak."""
    half = torch.ones_like(bits[:, None]).bitwise_left_shift(bits[:, None] - 1).float()  # -half .. half - 1 levels
    step = wave.abs().amax(-1, keepdim=True).clamp_min(TINY) / half
    return (wave / step).round().clamp(-half, half - 1) * step
