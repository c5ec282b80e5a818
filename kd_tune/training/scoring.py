"""A model's validation figures: wake-word probabilities of clips and of every window of a negative stream, then
accuracy, AUC, EER and FRR at the target false activations per hour, clean and under a fixed mix of acoustic
conditions (`VALIDATION_MIX`, rendered once per run by `validation_conditions`). `Validation` holds a run's
inputs featurized once, since only the model changes from epoch to epoch.

`window_inputs` serves a stream's 1 s windows, or their log-mels, batch by batch. The log-mels come from one pass over
the stream instead of one per window (windows overlap ten-fold at a 100 ms hop), and equal the per-window ones: only
the few frames that reach past a window's edge are recomputed from the window alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from kd_tune.audio.conditions import MICROPHONES, NOISE_TYPES, Condition, Conditioner, noise_condition
from kd_tune.audio.features import N_SAMPLES, SAMPLE_RATE, LogMel
from kd_tune.config import Config
from kd_tune.datasets.data import Split
from kd_tune.metrics import audio_hours, clip_metrics, sliding_windows, wakeword_metrics

# Validation batch. Ray Train runs the loop in a thread, and there, with 256 (or 128) windows a batch, validation
# ran ~17% slower than in a main thread (glibc serves a thread's large allocations from bounded heaps, most likely
# mapped and unmapped again); with 64 it ran as fast as in the main thread, and faster in both. Measured on CPU.
EVAL_BATCH = 64
# metric -> the conditions cycled over the validation positives (positive i gets conditions[i % len]). The evaluation
# grid's generator with its own seed and its own room: selection looks at conditions like the grid's, never at the
# grid's own noise excerpts or room responses.
VALIDATION_MIX = {
    "frr_snr10": [noise_condition(n, 10.0) for n in NOISE_TYPES],
    "frr_snr0": [noise_condition(n, snr) for n in NOISE_TYPES for snr in (0.0, 5.0)],
    "frr_room": [Condition(f"bedroom_rt{rt:g}_{d}", "room", rt60_s=rt, distance=d, room="bedroom")
                 for rt, d in ((0.6, "far"), (0.3, "far"), (0.9, "near"))],
    "frr_level": [Condition(f"level_{db:g}dBFS", "level", peak_dbfs=db) for db in (-45.0, -40.0, -35.0)],
    "frr_mic": [Condition(f"mic_{m}", "mic", microphone=m) for m in MICROPHONES],
}
VALIDATION_SEED = 17


def validation_conditions(split: Split) -> dict[str, Tensor]:
    """{metric: the split's positives [P, N_SAMPLES] under that metric's conditions}, the same every run."""
    positives = split.audio[split.labels == 1].numpy()
    speech = [clip for clip in split.of_kind("negative").numpy()] or list(split.audio[split.labels == 0].numpy())
    conditioner = Conditioner(speech=speech, seed=VALIDATION_SEED)
    return {metric: torch.from_numpy(np.stack([conditioner.clip(clip, mix[i % len(mix)], i)
                                               for i, clip in enumerate(positives)]))
            for metric, mix in VALIDATION_MIX.items()}


@torch.no_grad()
def predict(model: nn.Module, audio: Tensor, log_mel: LogMel | None) -> Tensor:
    """Wake-word probability per clip [N] for audio [N, N_SAMPLES]; log_mel=None feeds raw audio."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for chunk in audio.split(EVAL_BATCH):
        x = chunk.to(device)
        out.append(model(log_mel(x) if log_mel is not None else x).float().softmax(-1)[:, 1].cpu())
    return torch.cat(out)


class StreamInputs:
    """A stream's model inputs every hop_samples (see window_inputs), batch by batch, featurized once: the front end
    has no parameters, so a run that scores the same stream every epoch pays for its STFT once. A batch keeps the
    frames of the audio its windows span and the few edge frames of each window (~85 MB an hour of stream), not
    whole windows (~580 MB an hour); only the per-window normalization is left to each pass."""

    def __init__(self, stream: Tensor, *, hop_samples: int, log_mel: LogMel | None,
                 device: torch.device | None = None):
        self.stream, self.hop_samples, self.log_mel, self.device = stream, hop_samples, log_mel, device
        self.hours = audio_hours(len(stream), SAMPLE_RATE)
        self.parts: list[tuple[Tensor, Tensor, Tensor]] | None = None
        if log_mel is not None and on_frame_grid(log_mel, hop_samples):
            windows = sliding_windows(stream, window_samples=N_SAMPLES, hop_samples=hop_samples)  # [W, N_SAMPLES]
            with torch.no_grad():
                self.parts = [window_frames(log_mel, chunk.to(device), hop_samples=hop_samples)
                              for chunk in windows.split(EVAL_BATCH)]

    def __iter__(self) -> Iterator[Tensor]:
        if self.parts is None or self.log_mel is None:
            return window_inputs(self.stream, hop_samples=self.hop_samples, batch=EVAL_BATCH, log_mel=self.log_mel,
                                 device=self.device)
        log_mel, hop_samples = self.log_mel, self.hop_samples
        return (assemble_windows(log_mel, *part, hop_samples=hop_samples) for part in self.parts)


@dataclass(frozen=True)
class Validation:
    """A run's validation inputs, featurized once (only the model changes from epoch to epoch): the split's clips,
    its positives under VALIDATION_MIX (see validation_conditions) and, for FA/h, its negative stream."""

    labels: Tensor  # [N]
    clips: Tensor  # [N, ...] the model's inputs: log-mels, or the audio itself for a waveform model
    conditions: dict[str, Tensor]  # metric -> the model's inputs [P, ...] of the positives under its conditions
    stream: StreamInputs | None

    @classmethod
    def of(cls, split: Split, stream: Tensor | None, conditions: dict[str, Tensor], log_mel: LogMel | None, *,
           hop_samples: int, device: torch.device | None = None) -> Validation:
        def inputs(audio: Tensor) -> Tensor:  # in predict's batches, so the features are the ones it would make
            with torch.no_grad():
                return audio if log_mel is None else torch.cat([log_mel(c.to(device)) for c in audio.split(EVAL_BATCH)])

        streamed = None if stream is None else StreamInputs(stream, hop_samples=hop_samples, log_mel=log_mel,
                                                            device=device)
        return cls(split.labels, inputs(split.audio), {k: inputs(v) for k, v in conditions.items()}, streamed)


@torch.no_grad()
def evaluate(model: nn.Module, v: Validation, config: Config, *, with_stream: bool = True) -> dict:
    """Clip metrics of the split and, with a stream, the operating point for the target FA/h on it, and the FRR
    there of each conditions entry with their mean over clean and all."""
    clips = predict(model, v.clips, None)
    if v.stream is None or not with_stream:
        return clip_metrics(clips, v.labels)
    t = config.training
    windows = score_inputs(model, v.stream)  # [W]
    metrics = wakeword_metrics(clips, v.labels, windows, hop_seconds=v.stream.hop_samples / SAMPLE_RATE,
                               target_fa_per_hour=t.target_fa_per_hour, refractory_seconds=t.refractory_seconds,
                               hours=v.stream.hours)
    if not v.conditions:
        return metrics
    frr = {name: float((predict(model, inputs, None) < metrics["threshold"]).float().mean())
           for name, inputs in v.conditions.items()}
    return metrics | frr | {"frr_conditions": float(np.mean([metrics["frr_at_target_fa"], *frr.values()]))}


@torch.no_grad()
def stream_scores(model: nn.Module, stream: Tensor, *, hop_samples: int, log_mel: LogMel | None) -> Tensor:
    """Wake-word probability [W] of each of the stream's windows every hop_samples (see window_inputs)."""
    device = next(model.parameters()).device
    return score_inputs(model, window_inputs(stream, hop_samples=hop_samples, batch=EVAL_BATCH, log_mel=log_mel,
                                             device=device))


@torch.no_grad()
def score_inputs(model: nn.Module, inputs: Iterable[Tensor]) -> Tensor:
    """Wake-word probability [W] of each input of the batches [B, ...] that `inputs` yields."""
    model.eval()
    return torch.cat([model(x).float().softmax(-1)[:, 1].cpu() for x in inputs])


def on_frame_grid(log_mel: LogMel, hop_samples: int) -> bool:
    """Whether windows hop_samples apart share their frames (see window_log_mels)."""
    return hop_samples % log_mel.hop_length == 0 and N_SAMPLES % log_mel.hop_length == 0


def window_inputs(stream: Tensor, *, hop_samples: int, batch: int, log_mel: LogMel | None = None,
                  device: torch.device | None = None) -> Iterator[Tensor]:
    """The stream's windows [B, N_SAMPLES] every hop_samples (the tail zero-padded, as in sliding_windows), or with
    log_mel their log-mels [B, n_mels, frames], `batch` windows at a time, on device."""
    windows = sliding_windows(stream, window_samples=N_SAMPLES, hop_samples=hop_samples)  # [W, N_SAMPLES], a view
    shared = log_mel is not None and on_frame_grid(log_mel, hop_samples)
    for start in range(0, len(windows), batch):
        chunk = windows[start:start + batch].to(device)  # [B, N_SAMPLES]
        if log_mel is None:
            yield chunk
        elif not shared:
            yield log_mel(chunk)
        else:
            yield window_log_mels(log_mel, chunk, hop_samples=hop_samples)


def window_log_mels(log_mel: LogMel, windows: Tensor, *, hop_samples: int) -> Tensor:
    """log_mel(windows) [B, n_mels, frames] for consecutive windows [B, N] hop_samples apart, from one log-mel pass over
    the audio they span (see window_frames)."""
    return assemble_windows(log_mel, *window_frames(log_mel, windows, hop_samples=hop_samples), hop_samples=hop_samples)


def window_frames(log_mel: LogMel, windows: Tensor, *, hop_samples: int) -> tuple[Tensor, Tensor, Tensor]:
    """The frame-local features of consecutive windows [B, N] hop_samples apart: the frames [n_mels, M] of the audio
    they span, and each window's first and last frames [B, n_mels, head] and [B, n_mels, tail], the ones that reach
    past its edges and so come from the window alone (reflect-padded, as log_mel pads a clip)."""
    hop, half = log_mel.hop_length, log_mel.n_fft // 2
    span = torch.cat([windows[:-1, :hop_samples].reshape(-1), windows[-1]])  # [(B - 1) * hop_samples + N]
    frames = log_mel.frames(span[None])[0]  # [n_mels, M]
    n_frames = N_SAMPLES // hop + 1
    head = math.ceil(half / hop)  # frames whose left half reaches before the window
    tail = N_SAMPLES // hop - (N_SAMPLES - half) // hop  # ... whose right half reaches past it
    heads = log_mel.frames(windows[:, :(head - 1) * hop + half + 1])[:, :, :head]
    tail_start = (n_frames - tail - head) * hop  # on the frame grid, left of the tail frames' reach
    return frames, heads, log_mel.frames(windows[:, tail_start:])[:, :, -tail:]


def assemble_windows(log_mel: LogMel, frames: Tensor, heads: Tensor, tails: Tensor, *, hop_samples: int) -> Tensor:
    """The windows' features [B, n_mels, frames] from window_frames' parts, normalized per window."""
    n_frames = N_SAMPLES // log_mel.hop_length + 1
    out = frames.unfold(1, n_frames, hop_samples // log_mel.hop_length).permute(1, 0, 2).clone()  # [B, n_mels, T]
    out[:, :, :heads.shape[-1]] = heads
    out[:, :, -tails.shape[-1]:] = tails
    return log_mel.per_window(out)
