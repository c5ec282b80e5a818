"""Streaming wake-word detection with an exported model: onnxruntime, numpy and soundfile only, never torch.

`kd-tune export` (kd_tune.export) writes model.onnx, raw 16 kHz audio [B, 16000] -> P(wake word) [B], and
model.json beside it, the model card: the streaming settings, the calibrated threshold and the ONNX file's SHA-256.
`Detector` runs such a pair over audio of any length, rate and channel count.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import soundfile as sf

from kd_tune.metrics import activation_indices, refractory_window_count

FORMAT = "kd_tune.onnx/1"
INPUT_NAME, OUTPUT_NAME = "audio", "probability"
RUN_BATCH = 256  # windows per onnxruntime call
RESAMPLE_ZERO_CROSSINGS = 16  # of the windowed sinc, on each side
RESAMPLE_ROLLOFF = 0.99  # low-pass cut-off as a fraction of the lower Nyquist frequency
RESAMPLE_CHUNK = 65536  # output samples per vectorised step, bounding memory on long files


def card_name(model_path: Path) -> str:
    """model.onnx -> model.json; model.int8.onnx -> model.int8.json."""
    return model_path.with_suffix(".json").name


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_session(model: bytes, *, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = options.inter_op_num_threads = threads
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def run(session: ort.InferenceSession, windows: np.ndarray) -> np.ndarray:
    """P(wake word) [N] of windows [N, window_samples], RUN_BATCH at a time."""
    out = []
    for start in range(0, len(windows), RUN_BATCH):
        batch = np.ascontiguousarray(windows[start:start + RUN_BATCH], dtype=np.float32)  # [B, window_samples]
        probabilities = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        if probabilities.shape != (len(batch),):
            raise ValueError(f"the model returned shape {probabilities.shape} for {len(batch)} windows "
                             f"(expected ({len(batch)},))")
        out.append(probabilities)
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def frames(audio: np.ndarray, *, window_samples: int, hop_samples: int) -> np.ndarray:
    """[T] -> [W, window_samples] windows every hop_samples, the tail zero-padded to a whole window.

    The windows of kd_tune.metrics.sliding_windows, as strided views (no copy of the audio per window).
    """
    n_windows = 1 + math.ceil(max(len(audio) - window_samples, 0) / hop_samples)
    padded = np.zeros((n_windows - 1) * hop_samples + window_samples, np.float32)
    padded[:len(audio)] = audio
    return np.lib.stride_tricks.sliding_window_view(padded, window_samples)[::hop_samples]


def stream_probabilities(session: ort.InferenceSession, audio: np.ndarray, *, window_samples: int,
                         hop_samples: int) -> np.ndarray:
    return run(session, frames(audio, window_samples=window_samples, hop_samples=hop_samples))


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Band-limited resampling of [T] audio: polyphase windowed-sinc interpolation (torchaudio's default method).

    Each output sample sums the input under a Hann-windowed sinc low-pass at RESAMPLE_ROLLOFF times the lower
    Nyquist frequency, RESAMPLE_ZERO_CROSSINGS zero crossings wide on each side, so downsampling does not alias.
    The rate ratio up/down is exact (integers), so output n sits at input position n * down / up and the kernel
    takes only `up` distinct phases, computed once.
    """
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be > 0 Hz, got {from_rate!r} and {to_rate!r}")
    audio = np.asarray(audio, np.float32)
    if from_rate == to_rate:
        return audio
    common = math.gcd(from_rate, to_rate)
    up, down = to_rate // common, from_rate // common
    scale = RESAMPLE_ROLLOFF * min(up, down) / down  # cut-off in cycles per input sample, times 2
    half_width = math.ceil(RESAMPLE_ZERO_CROSSINGS / scale)  # taps on each side, in input samples
    offsets = np.arange(-half_width + 1, half_width + 1)  # [K] tap positions relative to floor(position)
    distance = scale * (np.arange(up)[:, None] / up - offsets[None, :])  # [up, K] in zero crossings
    window = np.cos(np.pi * np.clip(distance, -RESAMPLE_ZERO_CROSSINGS, RESAMPLE_ZERO_CROSSINGS)
                    / (2 * RESAMPLE_ZERO_CROSSINGS)) ** 2
    kernels = (scale * np.sinc(distance) * window).astype(np.float32)  # [up, K], one row per phase
    padded = np.pad(audio, (half_width, half_width + 1))
    n_out = math.ceil(len(audio) * up / down)
    out = np.empty(n_out, np.float32)
    for start in range(0, n_out, RESAMPLE_CHUNK):
        n = np.arange(start, min(start + RESAMPLE_CHUNK, n_out))  # [C] output indices
        phase = n * down % up
        taps = padded[(n * down // up + half_width)[:, None] + offsets[None, :]]  # [C, K]
        out[start:start + len(n)] = np.einsum("ck,ck->c", taps, kernels[phase])
    return out


def load_audio(path: str | Path, *, sample_rate: int) -> np.ndarray:
    """Mono float32 [T] at sample_rate from any file soundfile reads: channels averaged, other rates resampled."""
    try:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)  # [T, C]
    except sf.SoundFileError as error:
        raise ValueError(f"{path}: cannot read audio ({error})") from None
    if audio.size == 0:
        raise ValueError(f"{path}: the file holds no samples")
    return resample(audio.mean(axis=1), rate, sample_rate)


def read_card(model_path: Path) -> dict:
    """The model card beside an exported model, checked to belong to that exact file."""
    card_path = model_path.with_name(card_name(model_path))
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{card_path} is missing (`kd-tune export` writes it beside the model)") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        found = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise ValueError(f"{card_path}: format {found!r}, expected {FORMAT!r}")
    return card


class Detector:
    """Wake-word detection over long audio with an exported model and the model card beside it.

    The audio is cut into windows of window_samples every hop_samples (the tail zero-padded to a whole window), and
    the detector fires on a rising edge past the threshold, at least refractory_seconds after the previous detection
    (see activation_indices). A detection's time is the centre of the window where the edge rises, start +
    window / 2: the wake word lies inside that window, and a window centred on it scores highest.
    """

    def __init__(self, model_path: str | Path, *, threshold: float | None = None, threads: int | None = None):
        self.model_path = Path(model_path)
        self.card = read_card(self.model_path)
        model = self.model_path.read_bytes()
        if sha256(model) != self.card["onnx_sha256"]:
            raise ValueError(f"{self.model_path} does not match onnx_sha256 in {card_name(self.model_path)}: the file "
                             "changed after export, so the card's threshold does not belong to it (export again)")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}")
        self.threshold = float(self.card["threshold"] if threshold is None else threshold)
        self.sample_rate, self.window_samples = int(self.card["sample_rate"]), int(self.card["window_samples"])
        self.hop_samples = int(self.card["hop_samples"])
        self.refractory_seconds = float(self.card["refractory_seconds"])
        self.session = open_session(model, threads=threads)
        inputs = self.session.get_inputs()
        if [i.name for i in inputs] != [INPUT_NAME] or inputs[0].shape[1] != self.window_samples:
            raise ValueError(f"{self.model_path} takes {[(i.name, i.shape) for i in inputs]}, expected "
                             f"{INPUT_NAME!r} of shape [batch, {self.window_samples}]")

    def read(self, path: str | Path) -> np.ndarray:
        """A file's audio as mono float32 [T] at the model's sample rate."""
        return load_audio(path, sample_rate=self.sample_rate)

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """P(wake word) [W] of each window of mono audio [T] at the model's sample rate."""
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise ValueError(f"audio must be non-empty mono samples [T], got shape {audio.shape}")
        return stream_probabilities(self.session, audio, window_samples=self.window_samples,
                                    hop_samples=self.hop_samples)

    def detect(self, audio: np.ndarray) -> list[float]:
        """Times (s) of the detections in mono audio [T]: the centres of the windows where they fire."""
        hop_seconds = self.hop_samples / self.sample_rate
        fired = activation_indices(self.probabilities(audio), threshold=self.threshold,
                                   refractory_windows=refractory_window_count(self.refractory_seconds, hop_seconds))
        return [(i * self.hop_samples + self.window_samples / 2) / self.sample_rate for i in fired]
