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

from kd_tune.config import Config, FeaturesConfig

SAMPLE_RATE = 16000  # Hz
CLIP_SECONDS = 1
N_SAMPLES = CLIP_SECONDS * SAMPLE_RATE  # samples per clip
WINDOW_MS = 25
HOP_MS = 10
HOP_LENGTH = SAMPLE_RATE * HOP_MS // 1000  # 160 samples between frames
N_MELS = 40
N_FRAMES = N_SAMPLES // HOP_LENGTH + 1  # 101 frames per clip with centred windows
LOG_FLOOR = 1e-6  # fixed floor, not AmplitudeToDB's top_db, so a clip's features never depend on its batch
MEL_SCALES = ("htk", "slaney")
VIEW_CHUNK = 256  # clips per seeded draw: fixed, so a view is the same whatever the batch size


def samples(ms: float) -> int:
    """Milliseconds -> whole samples at SAMPLE_RATE."""
    return int(round(SAMPLE_RATE * ms / 1000))


class LogMel(nn.Module):
    """Waveform [B, N] -> natural-log mel power spectrogram [B, n_mels, N // hop + 1].

    Equals torchaudio's MelSpectrogram(center=True, power=2) followed by log(x + 1e-6), but the STFT is a conv1d with
    a fixed windowed-DFT basis: the legacy ONNX exporter has no STFT, and this way the front end can sit inside an
    exported model that takes raw audio. mel_scale "slaney" (with Slaney area norm) is the librosa/Whisper filterbank.
    """

    def __init__(self, *, n_mels: int = N_MELS, window_ms: float = WINDOW_MS, hop_ms: float = HOP_MS,
                 mel_scale: str = "htk"):
        super().__init__()
        if n_mels < 1:
            raise ValueError(f"n_mels must be >= 1, got {n_mels!r}")
        if mel_scale not in MEL_SCALES:
            raise ValueError(f"mel_scale must be one of {MEL_SCALES}, got {mel_scale!r}")
        self.n_fft, self.hop_length = samples(window_ms), samples(hop_ms)
        if self.n_fft < 2 or self.hop_length < 1:
            raise ValueError(f"window_ms {window_ms!r} and hop_ms {hop_ms!r} give {self.n_fft} and {self.hop_length}"
                             " samples (allowed: a window of >= 2 samples and a hop of >= 1)")
        self.n_mels = n_mels
        self.register_buffer("dft_basis", dft_basis(self.n_fft), persistent=False)  # [2 * n_freq, 1, n_fft]
        fbank = AF.melscale_fbanks(self.n_fft // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE,
                                   norm="slaney" if mel_scale == "slaney" else None, mel_scale=mel_scale)
        self.register_buffer("mel_fbank", fbank.T.contiguous(), persistent=False)  # [n_mels, n_freq]

    @classmethod
    def from_config(cls, features: FeaturesConfig) -> LogMel:
        return cls(n_mels=features.n_mels, window_ms=features.window_ms, hop_ms=features.hop_ms)

    def power(self, wave: Tensor) -> Tensor:
        """Mel power spectrogram [B, n_mels, T] of wave [B, N]."""
        half = self.n_fft // 2
        # float32 even under autocast: a loud clip's power spectrum overflows float16 (max 65504).
        with torch.autocast(wave.device.type, enabled=False):
            x = F.pad(wave.float().unsqueeze(1), (half, half), mode="reflect")  # [B, 1, N + n_fft]
            spec = F.conv1d(x, self.dft_basis.float(), stride=self.hop_length)  # [B, 2 * n_freq, T]
            real, imag = spec.chunk(2, dim=1)
            return torch.matmul(self.mel_fbank.float(), real.square() + imag.square())  # [B, n_mels, T]

    def forward(self, wave: Tensor) -> Tensor:
        return torch.log(self.power(wave) + LOG_FLOOR)


def dft_basis(n_fft: int) -> Tensor:
    """Periodic-Hann-windowed real and imaginary DFT rows as conv1d weights [2 * (n_fft // 2 + 1), 1, n_fft]."""
    # Built in float64 so the float32 basis is accurate to rounding, matching torch.stft to ~1e-6.
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    angle = 2 * math.pi * k[:, None] * n[None, :] / n_fft  # [n_freq, n_fft]
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window  # [2 * n_freq, n_fft]
    return basis.unsqueeze(1).float()


def uniform(low: float, high: float, size: int, generator: torch.Generator) -> Tensor:
    """[size] uniform draws on the generator's device (a CPU generator gives the same views on any device)."""
    return low + (high - low) * torch.rand(size, generator=generator, device=generator.device)


def check_range(name: str, value: float, low: float, high: float = math.inf) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")


class Augment(nn.Module):
    """Random time shift, reverberation, background noise at a random SNR and gain on waveforms [B, N].

    noise_bank [K, L] (L >= N, e.g. the training set's background clips) is cropped at random; without one, coloured
    noise (1/f^beta, beta in [0, 2]) is drawn on the fly. Synthetic room impulse responses (exponentially decaying
    noise) are generated once from rir_seed unless rirs [R, L] are given.
    """

    def __init__(self, *, time_shift_ms: float = 100.0, gain_db: float = 6.0, noise_prob: float = 0.5,
                 snr_db_min: float = 5.0, snr_db_max: float = 20.0, reverb_prob: float = 0.3,
                 noise_bank: Tensor | None = None, rirs: Tensor | None = None, n_rirs: int = 32,
                 rt60_s: tuple[float, float] = (0.1, 0.6), rir_seed: int = 0):
        super().__init__()
        check_range("time_shift_ms", time_shift_ms, 0.0)
        check_range("gain_db", gain_db, 0.0)
        check_range("noise_prob", noise_prob, 0.0, 1.0)
        check_range("reverb_prob", reverb_prob, 0.0, 1.0)
        check_range("snr_db_min", snr_db_min, -math.inf, snr_db_max)
        self.shift_samples, self.gain_db = samples(time_shift_ms), gain_db
        self.noise_prob, self.reverb_prob = noise_prob, reverb_prob
        self.snr_db = (snr_db_min, snr_db_max)
        noise_bank = torch.zeros(0, 0) if noise_bank is None else noise_bank
        if noise_bank.ndim != 2:
            raise ValueError(f"noise_bank must be [K, L] clips, got shape {tuple(noise_bank.shape)}")
        if rirs is None:
            rirs = synthetic_rirs(n_rirs, rt60_s=rt60_s, seed=rir_seed)
        if rirs.ndim != 2 or len(rirs) == 0:
            raise ValueError(f"rirs must be [R, L] impulse responses with R >= 1, got shape {tuple(rirs.shape)}")
        self.register_buffer("noise_bank", noise_bank.float(), persistent=False)  # [K, L]
        self.register_buffer("rirs", rirs.float(), persistent=False)  # [R, L_rir]

    def forward(self, wave: Tensor, *, generator: torch.Generator) -> Tensor:
        batch = len(wave)
        # Every draw happens in this fixed order whatever the probabilities, so a seed always names the same view.
        shift = (uniform(-1, 1, batch, generator) * self.shift_samples).round().long().to(wave.device)
        reverb = (uniform(0, 1, batch, generator) < self.reverb_prob).to(wave.device)
        rir_index = torch.randint(len(self.rirs), (batch,), generator=generator, device=generator.device)
        noisy = (uniform(0, 1, batch, generator) < self.noise_prob).to(wave.device)
        snr_db = uniform(*self.snr_db, batch, generator).to(wave.device)
        noise = self.noise(batch, wave.shape[-1], generator).to(wave.device)
        gain_db = uniform(-self.gain_db, self.gain_db, batch, generator).to(wave.device)

        wave = time_shift(wave, shift)
        rows = reverb.nonzero().squeeze(1)  # only these pay for the FFT convolution
        wave = wave.index_copy(0, rows, reverberate(wave[rows], self.rirs[rir_index.to(wave.device)[rows]]))
        wave = torch.where(noisy[:, None], mix_at_snr(wave, noise, snr_db), wave)
        return wave * 10 ** (gain_db[:, None] / 20)

    def noise(self, batch: int, length: int, generator: torch.Generator) -> Tensor:
        """[batch, length] background: random crops of the bank, or coloured noise when the bank is empty."""
        if len(self.noise_bank) == 0:
            return coloured_noise(batch, length, generator)
        if self.noise_bank.shape[-1] < length:
            raise ValueError(f"noise_bank clips have {self.noise_bank.shape[-1]} samples, fewer than the {length} "
                             "of the waveforms (allowed: clips at least as long as the batch's)")
        device = self.noise_bank.device
        index = torch.randint(len(self.noise_bank), (batch,), generator=generator, device=generator.device)
        start = (uniform(0, 1, batch, generator) * (self.noise_bank.shape[-1] - length + 1)).long()
        positions = start.to(device)[:, None] + torch.arange(length, device=device)  # [batch, length]
        return torch.gather(self.noise_bank[index.to(device)], 1, positions)


def time_shift(wave: Tensor, shift: Tensor) -> Tensor:
    """Delay each row of wave [B, N] by shift [B] samples (negative: advance), zero-filling rather than wrapping."""
    length = wave.shape[-1]
    source = torch.arange(length, device=wave.device) - shift[:, None]  # [B, N]
    inside = (source >= 0) & (source < length)
    return torch.gather(wave, 1, source.clamp(0, length - 1)) * inside


def reverberate(wave: Tensor, rirs: Tensor) -> Tensor:
    """Convolve each row of wave [B, N] with its impulse response [B, L], keeping the first N samples."""
    length = wave.shape[-1]
    if len(wave) == 0:  # torch.fft refuses empty batches
        return wave
    n_fft = 2 ** math.ceil(math.log2(length + rirs.shape[-1] - 1))  # fftconvolve's odd sizes are ~2x slower
    spectrum = torch.fft.rfft(wave, n=n_fft) * torch.fft.rfft(rirs, n=n_fft)
    return torch.fft.irfft(spectrum, n=n_fft)[:, :length]


def mix_at_snr(wave: Tensor, noise: Tensor, snr_db: Tensor) -> Tensor:
    """wave + noise scaled so that 10 log10(P_wave / P_noise) = snr_db [B]; silent noise adds nothing."""
    wave_power = wave.square().mean(-1, keepdim=True)  # [B, 1]
    noise_power = noise.square().mean(-1, keepdim=True).clamp_min(1e-12)
    scale = torch.sqrt(wave_power / (noise_power * 10 ** (snr_db[:, None] / 10)))
    return wave + scale * noise


def coloured_noise(batch: int, length: int, generator: torch.Generator) -> Tensor:
    """[batch, length] unit-variance noise with power spectrum 1/f^beta, beta uniform in [0, 2] (white to brown)."""
    white = torch.randn(batch, length, generator=generator, device=generator.device)
    beta = uniform(0.0, 2.0, batch, generator)
    freqs = torch.fft.rfftfreq(length, device=generator.device).clamp_min(1.0 / length)  # skip DC's 1/0
    shaped = torch.fft.irfft(torch.fft.rfft(white) * freqs ** (-beta[:, None] / 2), n=length)
    return shaped / shaped.std(dim=-1, keepdim=True).clamp_min(1e-12)


def synthetic_rirs(count: int, *, rt60_s: tuple[float, float] = (0.1, 0.6), seed: int = 0) -> Tensor:
    """[count, rt60_max * SAMPLE_RATE] unit-energy responses: a direct path, then exponentially decaying noise."""
    if count < 1:
        raise ValueError(f"n_rirs must be >= 1, got {count!r}")
    if not 0 < rt60_s[0] <= rt60_s[1]:
        raise ValueError(f"rt60_s must be (low, high) seconds with 0 < low <= high, got {rt60_s!r}")
    generator = torch.Generator().manual_seed(seed)
    length = int(rt60_s[1] * SAMPLE_RATE)
    rt60 = uniform(*rt60_s, count, generator)
    t = torch.arange(length) / SAMPLE_RATE  # [L] seconds
    envelope = torch.exp(-3 * math.log(10) * t / rt60[:, None])  # amplitude falls 60 dB at t = rt60
    rirs = torch.randn(count, length, generator=generator) * envelope * 0.1  # tail ~10-20 dB under the direct path
    rirs[:, 0] = 1.0
    return rirs / rirs.norm(dim=-1, keepdim=True)


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
    augment = Augment(time_shift_ms=a.time_shift_ms, gain_db=a.gain_db, noise_prob=a.noise_prob,
                      snr_db_min=a.snr_db_min, snr_db_max=a.snr_db_max, reverb_prob=a.reverb_prob,
                      noise_bank=noise_bank, rir_seed=config.training.seed).to(device) if a.enabled else None
    spec_augment = SpecAugment(freq_mask_bins=a.freq_mask_bins if a.enabled else 0,
                               time_mask_frames=a.time_mask_frames if a.enabled else 0)
    return log_mel, augment, spec_augment


@torch.no_grad()
def render_view(audio: Tensor, augment: Augment | None, *, view: int, seed: int) -> Tensor:
    """Augmented copy number `view` of every clip [N, N_SAMPLES]; the same (seed, view) always gives the same audio."""
    if augment is None:
        return audio
    chunks = []
    for start in range(0, len(audio), VIEW_CHUNK):
        # A CPU generator draws the same numbers on every device, so a view rendered on a GPU worker and in the
        # teacher-output cache (possibly on another machine) is the same audio.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + view * 10_007 + start)
        chunks.append(augment(audio[start:start + VIEW_CHUNK], generator=generator))
    return torch.cat(chunks)
