"""Log-mel front end and batched, seeded augmentation for 1 s wake-word clips (runs on the batch's device).

The front end follows the keyword-spotting literature (Hello Edge / DS-CNN, TC-ResNet, BC-ResNet): 40 log-mel bands
from 25 ms windows every 10 ms, ~100 frames per 1 s clip. Augmentation draws every random number from an explicit
torch.Generator, so the teacher-output cache can replay exactly the same views later.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torch import Tensor, nn

from kd_tune.audio.acoustics import (EQ_HZ, SAMPLE_RATE, TINY, at_peak, channel_gain_db, clip, coloured_table, crops,
                                     db_to_gain, fft_size, filter_rows, log_uniform, mix_at_snr, quantize,
                                     response_grid, reverberate, synthetic_rirs, tones, transients, uniform, wavetables)
from kd_tune.config import AugmentConfig, Config, FeaturesConfig

CLIP_SECONDS = 1
N_SAMPLES = CLIP_SECONDS * SAMPLE_RATE  # samples per clip
WINDOW_MS = 25
HOP_MS = 10
HOP_LENGTH = SAMPLE_RATE * HOP_MS // 1000  # 160 samples between frames
N_MELS = 40
N_FRAMES = N_SAMPLES // HOP_LENGTH + 1  # 101 frames per clip with centred windows
LOG_FLOOR = 1e-6  # fixed floor, not AmplitudeToDB's top_db, so a clip's features never depend on its batch
MEL_SCALES = ("htk", "slaney")
# Per-window normalization of the features (features.normalize): "mean" subtracts the window's mean log-mel, so a
# gain changes nothing; "pcen" is per-channel energy normalization (Wang et al. 2017, librosa's defaults): each band
# divided by its own smoothed energy, an automatic gain control per band that also flattens stationary noise.
NORMALIZATIONS = ("none", "mean", "pcen")
PCEN_TIME_CONSTANT_S = 0.4
PCEN_GAIN = 0.98  # the exponent of the smoothed energy divided out: 1 would be a pure ratio
PCEN_BIAS = 2.0  # added before the square root that compresses in place of the log (librosa's power 0.5)
PCEN_EPS = 1e-6
MAX_PCEN_FRAMES = 3001  # the smoother is a [T, T] matrix: 36 MB at 30 s; a window is 1 s
VIEW_CHUNK = 256  # clips per seeded draw: fixed, so a view is the same whatever the batch size


def samples(ms: float) -> int:
    """Milliseconds -> whole samples at SAMPLE_RATE."""
    return int(round(SAMPLE_RATE * ms / 1000))


class LogMel(nn.Module):
    """Waveform [B, N] -> natural-log mel power spectrogram [B, n_mels, N // hop + 1], normalized per window.

    With normalize "none" it equals torchaudio's MelSpectrogram(center=True, power=2) followed by log(x + 1e-6), but
    the STFT is a conv1d with a fixed windowed-DFT basis: the legacy ONNX exporter has no STFT, and this way the front
    end can sit inside an exported model that takes raw audio. mel_scale "slaney" (with Slaney area norm) is the
    librosa/Whisper filterbank. `frames` is frame-local; `per_window` is the step that needs the whole window.
    """

    # Buffers, declared: through nn.Module.__getattr__ they would read as Tensor | Module
    dft_basis: Tensor
    mel_fbank: Tensor
    pcen_kernel: Tensor
    clip_smoother: Tensor

    def __init__(self, *, n_mels: int = N_MELS, window_ms: float = WINDOW_MS, hop_ms: float = HOP_MS,
                 mel_scale: str = "htk", normalize: str = "none"):
        super().__init__()
        if n_mels < 1:
            raise ValueError(f"n_mels must be >= 1, got {n_mels!r}")
        if mel_scale not in MEL_SCALES:
            raise ValueError(f"mel_scale must be one of {MEL_SCALES}, got {mel_scale!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.n_fft, self.hop_length = samples(window_ms), samples(hop_ms)
        if self.n_fft < 2 or self.hop_length < 1:
            raise ValueError(f"window_ms {window_ms!r} and hop_ms {hop_ms!r} give {self.n_fft} and {self.hop_length}"
                             " samples (allowed: a window of >= 2 samples and a hop of >= 1)")
        self.n_mels = n_mels
        self.register_buffer("dft_basis", dft_basis(self.n_fft), persistent=False)  # [2 * n_freq, 1, n_fft]
        fbank = AF.melscale_fbanks(self.n_fft // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE,
                                   norm="slaney" if mel_scale == "slaney" else None, mel_scale=mel_scale)
        self.register_buffer("mel_fbank", fbank.T.contiguous(), persistent=False)  # [n_mels, n_freq]
        self.normalize = normalize
        self.register_buffer("pcen_kernel", pcen_kernel(hop_ms), persistent=False)  # [1, 1, K]
        # PCEN's smoother for a 1 s clip, built ahead: built inside forward, it would be traced into an exported
        # graph as operators instead of one constant. Other lengths are built on first use.
        self.clip_frames = N_SAMPLES // self.hop_length + 1
        self.register_buffer("clip_smoother", pcen_smoother(self.pcen_kernel.flatten(), self.clip_frames),
                             persistent=False)
        self.smoothers: dict[int, Tensor] = {}

    @classmethod
    def from_config(cls, features: FeaturesConfig) -> LogMel:
        return cls(n_mels=features.n_mels, window_ms=features.window_ms, hop_ms=features.hop_ms,
                   normalize=features.normalize)

    def power(self, wave: Tensor) -> Tensor:
        """Mel power spectrogram [B, n_mels, T] of wave [B, N]."""
        half = self.n_fft // 2
        # float32 even under autocast: a loud clip's power spectrum overflows float16 (max 65504).
        with torch.autocast(wave.device.type, enabled=False):
            x = F.pad(wave.float().unsqueeze(1), (half, half), mode="reflect")  # [B, 1, N + n_fft]
            return self.mel_power(F.conv1d(x, self.dft_basis.float(), stride=self.hop_length))

    def power_of(self, frames: Tensor) -> Tensor:
        """Mel power [B, n_mels, F] of F frames of samples [B, F, n_fft] (power's frames, cut by the caller)."""
        with torch.autocast(frames.device.type, enabled=False):  # float32, as in power()
            spec = torch.matmul(frames.float(), self.dft_basis.float().flatten(1).T)  # [B, F, 2 * n_freq]
            return self.mel_power(spec.transpose(1, 2))

    def mel_power(self, spec: Tensor) -> Tensor:
        """Mel power [B, n_mels, T] of the real and imaginary DFT rows [B, 2 * n_freq, T] of T frames."""
        real, imag = spec.chunk(2, dim=1)
        return torch.matmul(self.mel_fbank.float(), real.square() + imag.square())

    def frame_index(self, n_samples: int, frames: list[int]) -> Tensor:
        """[F, n_fft] positions in a wave of n_samples of the samples power() puts in each of the given frames,
        the edges reflected as power() pads them."""
        half = self.n_fft // 2
        position = torch.tensor(frames)[:, None] * self.hop_length - half + torch.arange(self.n_fft)  # [F, n_fft]
        position = torch.where(position < 0, -position, position)
        return torch.where(position >= n_samples, 2 * (n_samples - 1) - position, position)

    def frames(self, wave: Tensor) -> Tensor:
        """The frame-local part [B, n_mels, T]: log mel power, or mel power itself for PCEN."""
        return self.compress(self.power(wave))

    def compress(self, power: Tensor) -> Tensor:
        """Mel power [B, n_mels, T] -> the frame-local features: its log, or itself for PCEN."""
        return power if self.normalize == "pcen" else torch.log(power + LOG_FLOOR)

    def per_window(self, frames: Tensor) -> Tensor:
        """The window's features [B, n_mels, T] from its frames: the normalization sees one window at a time, so a
        stream's windows are featurized exactly as the 1 s clips training saw."""
        with torch.autocast(frames.device.type, enabled=False):
            if self.normalize == "mean":
                return frames - frames.mean(dim=(1, 2), keepdim=True)
            if self.normalize == "pcen":
                return pcen(frames.float(), self.smoother(int(frames.shape[-1])))  # int: a constant when traced
            return frames

    def smoother(self, n_frames: int) -> Tensor:
        """PCEN's smoother [T, T] for windows of n_frames, built once per length, on the front end's device."""
        if n_frames == self.clip_frames:
            return self.clip_smoother
        if n_frames > MAX_PCEN_FRAMES:
            raise ValueError(f"PCEN normalizes one window at a time: {n_frames} frames is longer than the "
                             f"{MAX_PCEN_FRAMES} allowed (cut long audio into windows first)")
        if n_frames not in self.smoothers or self.smoothers[n_frames].device != self.pcen_kernel.device:
            self.smoothers[n_frames] = pcen_smoother(self.pcen_kernel.flatten(), n_frames).to(self.pcen_kernel.device)
        return self.smoothers[n_frames]

    def forward(self, wave: Tensor) -> Tensor:
        return self.per_window(self.frames(wave))


def pcen_kernel(hop_ms: float) -> Tensor:
    """Weights [1, 1, K] of the first-order smoother with PCEN_TIME_CONSTANT_S, oldest first, summing to 1."""
    frames = PCEN_TIME_CONSTANT_S * 1000 / hop_ms
    s = (math.sqrt(1 + 4 * frames ** 2) - 1) / (2 * frames ** 2)  # librosa's smoothing coefficient
    taps = math.ceil(math.log(0.01) / math.log(1 - s))  # the weights left out sum to under 1%
    weights = s * (1 - s) ** torch.arange(taps - 1, -1, -1, dtype=torch.float64)
    return (weights / weights.sum()).float().view(1, 1, -1)


def pcen_smoother(kernel: Tensor, n_frames: int) -> Tensor:
    """The causal smoother [T, T] with weights kernel [K] (oldest first) as a matrix: smoothed = power @ matrix.

    Before its first frame a window's energy is its first frame's (replicate padding), so column 0 also takes the
    weights that reach before the window. As one matmul it costs ~6x less than the K-tap convolution in onnxruntime.
    """
    lag = torch.arange(n_frames)[None, :] - torch.arange(n_frames)[:, None]  # [s, t]: t - s
    weights = kernel.double().flip(0)  # weights[j]: the weight of the frame j frames back
    matrix = torch.where((lag >= 0) & (lag < len(weights)), weights[lag.clamp(0, len(weights) - 1)], 0.0)
    back = weights.flip(0).cumsum(0).flip(0)  # back[j]: the weights of every tap j or more frames back
    t = torch.arange(n_frames)
    matrix[0] = torch.where(t < len(weights), back[t.clamp(max=len(weights) - 1)], 0.0)  # frame 0 stands for those
    return matrix.float()


def pcen(power: Tensor, smoother: Tensor) -> Tensor:
    """PCEN [B, n_mels, T] of mel power [B, n_mels, T], with the smoother [T, T] of pcen_smoother: a window's
    features depend on that window alone."""
    smooth = torch.matmul(power, smoother)  # [B, n_mels, T]
    # exp/log and sqrt, not pow: onnxruntime's Pow with a fractional exponent took ~17% of a streaming hop
    gained = power * torch.exp(-PCEN_GAIN * torch.log(PCEN_EPS + smooth))
    return torch.sqrt(gained + PCEN_BIAS) - math.sqrt(PCEN_BIAS)


def dft_basis(n_fft: int) -> Tensor:
    """Periodic-Hann-windowed real and imaginary DFT rows as conv1d weights [2 * (n_fft // 2 + 1), 1, n_fft]."""
    # Built in float64 so the float32 basis is accurate to rounding, matching torch.stft to ~1e-6.
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    angle = 2 * math.pi * k[:, None] * n[None, :] / n_fft  # [n_freq, n_fft]
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window  # [2 * n_freq, n_fft]
    return basis.unsqueeze(1).float()


NOISE_KINDS = ("bank", "coloured", "tones", "transients")
N_ROOMS = 64
MAX_NOTES = 10  # a melody changes note at most every NOTE_S[0] s, so a 1 s clip holds at most 10 notes
NOTE_S = (0.1, 0.5)
PITCH_SEMITONES = (-24, 12)  # from A4: A2 (110 Hz) to A5 (880 Hz)
TONE_DECAY_S = (0.05, 1.0)  # plucked to sustained
MAX_EVENTS = 4  # transients per clip
EVENT_ONSET_S = (0.0, 0.9)
EVENT_DECAY_S = (0.002, 0.08)  # a click to a door slam
EVENT_RANGE_DB = 20.0  # the events of one clip differ in level by up to this
EQ_OCTAVES = (0.3, 1.5)  # widths (std, octaves) of the EQ peaks
HARD_CLIP_PROB = 0.5  # otherwise soft (tanh) saturation


class Augment(nn.Module):
    """Random time shift, room, background noise, microphone channel, gain and level on waveforms [B, N].

    Noise at a random SNR comes from noise_bank [K, L] (L >= N: the training set's background clips, cropped at
    random), coloured noise, generated melodies or generated transients. Rooms are synthetic impulse responses
    generated once from `seed` unless rirs [R, L] are given. The channel is band-limiting, EQ, clipping and low bit
    depth. settings gives each effect's probability and range.
    """

    # Buffers, declared: through nn.Module.__getattr__ they would read as Tensor | Module
    noise_bank: Tensor
    rirs: Tensor
    colours: Tensor
    wavetables: Tensor
    response_hz: Tensor

    def __init__(self, settings: AugmentConfig | None = None, *, noise_bank: Tensor | None = None,
                 rirs: Tensor | None = None, n_rirs: int = N_ROOMS, seed: int = 0):
        super().__init__()
        settings = AugmentConfig() if settings is None else settings
        self.settings, self.shift_samples = settings, samples(settings.time_shift_ms)
        noise_bank = torch.zeros(0, 0) if noise_bank is None else noise_bank
        if noise_bank.ndim != 2:
            raise ValueError(f"noise_bank must be [K, L] clips, got shape {tuple(noise_bank.shape)}")
        rirs = synthetic_rirs(n_rirs, seed=seed) if rirs is None else rirs
        if rirs.ndim != 2 or len(rirs) == 0:
            raise ValueError(f"rirs must be [R, L] impulse responses with R >= 1, got shape {tuple(rirs.shape)}")
        weights = torch.tensor([getattr(settings, f"noise_{kind}_weight") for kind in NOISE_KINDS])
        self.kind_edges = (weights.cumsum(0) / weights.sum().clamp_min(TINY))[:-1]  # CPU, like the draws
        self.register_buffer("noise_bank", noise_bank.float(), persistent=False)  # [K, L]
        self.register_buffer("rirs", rirs.float(), persistent=False)  # [R, L_rir]
        self.register_buffer("colours", coloured_table(seed=seed), persistent=False)  # [colours, L_table]
        self.register_buffer("wavetables", wavetables(), persistent=False)  # [timbres, WAVETABLE_SIZE + 1]
        self.register_buffer("response_hz", response_grid(), persistent=False)  # [RESPONSE_BINS]
        self.room_spectra_cache: dict[tuple[int, torch.device], Tensor] = {}

    def forward(self, wave: Tensor, *, generator: torch.Generator, rows: int | None = None) -> Tensor:
        """wave [B, N] augmented; the draws are made for `rows` (>= B) rows and the first B used, so a fixed `rows`
        gives a clip the same view whatever else is in its batch."""
        rows = len(wave) if rows is None else rows
        if rows < len(wave):
            raise ValueError(f"rows must be >= the batch's {len(wave)} clips, got {rows!r}")
        draws = {name: value[:len(wave)].to(wave.device) for name, value in self.draw(rows, generator).items()}
        return self.apply(wave, draws)

    def draw(self, rows: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Every random number of `rows` clips, one row per clip, on the generator's device."""
        s, g = self.settings, generator

        def u(low: float = 0.0, high: float = 1.0, *shape: int) -> Tensor:
            return uniform(low, high, (rows, *shape), g)

        def integers(low: int, high: int, *shape: int) -> Tensor:  # low <= n < high
            return torch.randint(low, high, (rows, *shape), generator=g, device=g.device)

        eq_low, eq_high = torch.tensor(EQ_HZ, device=g.device).T
        # Every draw happens in this fixed order whatever the probabilities (a dict literal evaluates in order), so
        # a seed always names the same view.
        return {"shift": (u(-1, 1) * self.shift_samples).round().long(),
                "reverb": u() < s.reverb_prob, "room": integers(0, len(self.rirs)),
                "noisy": u() < s.noise_prob, "snr_db": u(s.snr_db_min, s.snr_db_max),
                "kind": torch.searchsorted(self.kind_edges.to(g.device), u(), right=True),
                "bank_clip": integers(0, max(len(self.noise_bank), 1)), "bank_start": u(),
                "colour": integers(0, len(self.colours)), "colour_start": u(),
                "timbre": integers(0, len(self.wavetables)), "note_s": log_uniform(*NOTE_S, rows, g),
                "pitch": integers(PITCH_SEMITONES[0], PITCH_SEMITONES[1] + 1, MAX_NOTES),
                "tone_decay_s": log_uniform(*TONE_DECAY_S, rows, g),
                "onset_s": u(*EVENT_ONSET_S, MAX_EVENTS),
                "event_decay_s": log_uniform(*EVENT_DECAY_S, (rows, MAX_EVENTS), g),
                "event_level": 10 ** (-u(0, EVENT_RANGE_DB, MAX_EVENTS) / 20), "events": integers(1, MAX_EVENTS + 1),
                "band_limit": u() < s.band_limit_prob,
                "lowpass_hz": log_uniform(s.lowpass_hz_min, s.lowpass_hz_max, rows, g),
                "highpass_hz": log_uniform(s.highpass_hz_min, s.highpass_hz_max, rows, g),
                "eq": u() < s.eq_prob, "eq_hz": log_uniform(eq_low, eq_high, (rows, len(EQ_HZ)), g),
                "eq_db": u(-s.eq_db, s.eq_db, len(EQ_HZ)), "eq_octaves": u(*EQ_OCTAVES, len(EQ_HZ)),
                "clip": u() < s.clip_prob, "clip_db": u(0, s.clip_db), "hard_clip": u() < HARD_CLIP_PROB,
                "quantize": u() < s.bit_depth_prob, "bits": integers(s.bits_min, s.bits_max + 1),
                "gain_db": u(-s.gain_db, s.gain_db),
                "level": u() < s.level_prob, "peak_dbfs": u(s.level_dbfs_min, s.level_dbfs_max)}

    # Shadows nn.Module.apply(fn), which nothing calls on an Augment (no model holds one as a submodule)
    def apply(self, wave: Tensor, d: dict[str, Tensor]) -> Tensor:  # type: ignore[override]
        """wave [B, N] through the shift, room, noise, channel and gain that the draws d [B, ...] name; each effect
        touches only its rows, and a row whose effects are all off comes back unchanged."""
        wave = time_shift(wave, d["shift"])  # a new tensor, so the effects below may write into it
        n_fft = fft_size(wave.shape[-1] + self.rirs.shape[-1] - 1)
        on_rows(wave, d["reverb"], lambda w, r: reverberate(w, self.room_spectra(n_fft)[d["room"][r]], n_fft))
        on_rows(wave, d["noisy"], lambda w, r: mix_at_snr(w, self.noise(w.shape[-1], pick(d, r)), d["snr_db"][r]))
        on_rows(wave, d["band_limit"] | d["eq"], lambda w, r: filter_rows(w, self.response_db(pick(d, r))))
        on_rows(wave, d["clip"], lambda w, r: clip(w, db_to_gain(-d["clip_db"][r]), d["hard_clip"][r]))
        on_rows(wave, d["quantize"], lambda w, r: quantize(w, d["bits"][r]))
        wave.mul_(db_to_gain(d["gain_db"][:, None]))
        on_rows(wave, d["level"], lambda w, r: at_peak(w, d["peak_dbfs"][r]))  # a near or far, loud or soft talker
        return wave

    def room_spectra(self, n_fft: int) -> Tensor:
        """[R, n_fft // 2 + 1] rfft of every room, computed once per size and device."""
        key = (n_fft, self.rirs.device)
        if key not in self.room_spectra_cache:
            self.room_spectra_cache = {key: torch.fft.rfft(self.rirs, n=n_fft)}
        return self.room_spectra_cache[key]

    def noise(self, length: int, d: dict[str, Tensor]) -> Tensor:
        """[B, length] background of each row's kind: a crop of the bank, coloured noise, a melody or transients."""
        kind = d["kind"]
        if len(self.noise_bank) == 0:
            kind = torch.where(kind == 0, 1, kind)  # no bank: its share is coloured noise
        elif self.noise_bank.shape[-1] < length:
            raise ValueError(f"noise_bank clips have {self.noise_bank.shape[-1]} samples, fewer than the {length} "
                             "of the waveforms (allowed: clips at least as long as the batch's)")
        sources = (lambda k: crops(self.noise_bank, k["bank_clip"], k["bank_start"], length),
                   lambda k: crops(self.colours, k["colour"], k["colour_start"], length),
                   lambda k: tones(k["pitch"], k["note_s"], k["tone_decay_s"], self.wavetables[k["timbre"]], length),
                   lambda k: transients(crops(self.colours, k["colour"], k["colour_start"], length), k["onset_s"],
                                        k["event_decay_s"], k["event_level"] * self.event_mask(k["events"])))
        out = torch.empty(len(kind), length, device=kind.device)
        for index, source in enumerate(sources):
            rows = (kind == index).nonzero().squeeze(1)
            if len(rows):
                out.index_copy_(0, rows, source(pick(d, rows)))
        return out

    @staticmethod
    def event_mask(events: Tensor) -> Tensor:
        """[B, MAX_EVENTS] 1 for the first events[b] events of row b, 0 for the rest."""
        return (torch.arange(MAX_EVENTS, device=events.device) < events[:, None]).float()

    def response_db(self, d: dict[str, Tensor]) -> Tensor:
        """[B, RESPONSE_BINS] channel gains in dB: each row's band limits and EQ, or flat where that effect is off."""
        band, eq = d["band_limit"], d["eq"][:, None]
        lowpass = torch.where(band, d["lowpass_hz"], torch.inf)
        highpass = torch.where(band, d["highpass_hz"], 0.0)
        return channel_gain_db(self.response_hz, lowpass, highpass, d["eq_hz"], d["eq_db"] * eq, d["eq_octaves"])


def pick(draws: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """The draws of the given rows only."""
    return {name: value[rows] for name, value in draws.items()}


def on_rows(wave: Tensor, mask: Tensor, effect) -> None:
    """Replace, in place, the rows of wave [B, N] where mask [B] holds with effect(those rows, their indices)."""
    rows = mask.nonzero().squeeze(1)
    if len(rows):  # only these rows pay for the effect; torch.fft refuses empty batches
        wave.index_copy_(0, rows, effect(wave[rows], rows).to(wave.dtype))


def time_shift(wave: Tensor, shift: Tensor) -> Tensor:
    """Delay each row of wave [B, N] by shift [B] samples (negative: advance), zero-filling rather than wrapping."""
    length, most = wave.shape[-1], int(shift.abs().max()) if len(shift) else 0
    windows = F.pad(wave, (most, most)).unfold(1, length, 1)  # [B, 2 * most + 1, N], a view
    return windows[torch.arange(len(wave), device=wave.device), most - shift]  # only the chosen windows are copied


class SpecAugment(nn.Module):
    """Frequency and time masks on log-mels [B, F, T], filled with each example's mean (log-mel 0 is not silence)."""

    def __init__(self, *, freq_mask_bins: int = 5, time_mask_frames: int = 10, num_freq_masks: int = 2,
                 num_time_masks: int = 2):
        super().__init__()
        for name, value in [("freq_mask_bins", freq_mask_bins), ("time_mask_frames", time_mask_frames),
                            ("num_freq_masks", num_freq_masks), ("num_time_masks", num_time_masks)]:
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        self.freq = (freq_mask_bins, num_freq_masks)
        self.time = (time_mask_frames, num_time_masks)

    def forward(self, features: Tensor, *, generator: torch.Generator) -> Tensor:
        batch, n_bins, n_frames = features.shape
        freq_mask = band_mask(batch, n_bins, *self.freq, generator).to(features.device)  # [B, F]
        time_mask = band_mask(batch, n_frames, *self.time, generator).to(features.device)  # [B, T]
        masked = freq_mask[:, :, None] | time_mask[:, None, :]  # [B, F, T]
        mean = features.mean(dim=(1, 2), keepdim=True)
        return torch.where(masked, mean, features)


def band_mask(batch: int, size: int, max_width: int, count: int, generator: torch.Generator) -> Tensor:
    """[batch, size] bool: the union of `count` bands per row, each of width uniform in [0, max_width]."""
    device = generator.device
    width = torch.randint(min(max_width, size) + 1, (batch, count), generator=generator, device=device)
    start = (torch.rand(batch, count, generator=generator, device=device) * (size - width + 1)).long()
    index = torch.arange(size, device=device)  # [size]
    inside = (index >= start[..., None]) & (index < (start + width)[..., None])  # [batch, count, size]
    return inside.any(dim=1)


# ---------------------------------------------------------------- the configured front end, and seeded views


def front_end(config: Config, noise_bank: Tensor, device: torch.device) -> tuple[LogMel, Augment | None, SpecAugment]:
    """The log-mel front end, waveform augmentation (None when off) and SpecAugment of a config.

    noise_bank [N_bg, N_SAMPLES]: background clips mixed in as noise (the training split's background clips).
    """
    a = config.augment
    log_mel = LogMel.from_config(config.features).to(device)
    augment = Augment(a, noise_bank=noise_bank, seed=config.training.seed).to(device) if a.enabled else None
    spec_augment = SpecAugment(freq_mask_bins=a.freq_mask_bins if a.enabled else 0,
                               time_mask_frames=a.time_mask_frames if a.enabled else 0)
    return log_mel, augment, spec_augment


@torch.no_grad()
def render_view(audio: Tensor, augment: Augment | None, *, view: int, seed: int) -> Tensor:
    """Augmented copy number `view` of every clip [N, N_SAMPLES]; the same (seed, view) always gives the same audio.

    Clip i's view depends on (seed, view, i) only: not on the other clips, nor on how many there are.
    """
    if augment is None:
        return audio
    chunks = []
    for start in range(0, len(audio), VIEW_CHUNK):
        # A CPU generator draws the same numbers on every device, so a view rendered on a GPU worker and in the
        # teacher-output cache (possibly on another machine) is the same audio, up to float rounding. Drawing for a
        # whole chunk even when fewer clips are left keeps the last chunk's views independent of the clip count.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + view * 10_007 + start)
        chunks.append(augment(audio[start:start + VIEW_CHUNK], generator=generator, rows=VIEW_CHUNK))
    return torch.cat(chunks)
