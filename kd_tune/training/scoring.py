"""A model's validation figures: wake-word probabilities of clips and of every window of a negative stream, then
accuracy, AUC, EER and FRR at the target false activations per hour, clean and under a fixed mix of acoustic
conditions (`VALIDATION_MIX`, rendered once per run by `validation_conditions`).

`window_inputs` serves a stream's 1 s windows, or their log-mels, batch by batch. The log-mels come from one pass over
the stream instead of one per window (windows overlap ten-fold at a 100 ms hop), and equal the per-window ones: only
the few frames that reach past a window's edge are recomputed from the window alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from kd_tune.audio.conditions import MICROPHONES, NOISE_TYPES, Condition, Conditioner, noise_condition
from kd_tune.audio.features import N_SAMPLES, SAMPLE_RATE, LogMel, samples
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


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, stream: Tensor | None, config: Config, log_mel: LogMel | None,
             conditions: dict[str, Tensor] | None = None) -> dict:
    """Clip metrics of the split and, given a negative stream, the operating point for the target FA/h on it, and
    the FRR there of each conditions entry (see validation_conditions) with their mean over clean and all."""
    clips = predict(model, split.audio, log_mel)
    if stream is None:
        return clip_metrics(clips, split.labels)
    t = config.training
    hop_samples = samples(t.eval_hop_ms)
    windows = stream_scores(model, stream, hop_samples=hop_samples, log_mel=log_mel)  # [W]
    metrics = wakeword_metrics(clips, split.labels, windows, hop_seconds=hop_samples / SAMPLE_RATE,
                               target_fa_per_hour=t.target_fa_per_hour, refractory_seconds=t.refractory_seconds,
                               hours=audio_hours(len(stream), SAMPLE_RATE))
    if not conditions:
        return metrics
    frr = {name: float((predict(model, audio, log_mel) < metrics["threshold"]).float().mean())
           for name, audio in conditions.items()}
    return metrics | frr | {"frr_conditions": float(np.mean([metrics["frr_at_target_fa"], *frr.values()]))}


@torch.no_grad()
def stream_scores(model: nn.Module, stream: Tensor, *, hop_samples: int, log_mel: LogMel | None) -> Tensor:
    """Wake-word probability [W] of each of the stream's windows every hop_samples (see window_inputs)."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(x).float().softmax(-1)[:, 1].cpu() for x in window_inputs(
        stream, hop_samples=hop_samples, batch=EVAL_BATCH, log_mel=log_mel, device=device)])


def window_inputs(stream: Tensor, *, hop_samples: int, batch: int, log_mel: LogMel | None = None,
                  device: torch.device | None = None) -> Iterator[Tensor]:
    """The stream's windows [B, N_SAMPLES] every hop_samples (the tail zero-padded, as in sliding_windows), or with
    log_mel their log-mels [B, n_mels, frames], `batch` windows at a time, on device."""
    windows = sliding_windows(stream, window_samples=N_SAMPLES, hop_samples=hop_samples)  # [W, N_SAMPLES], a view
    shared = log_mel is not None and hop_samples % log_mel.hop_length == 0 and N_SAMPLES % log_mel.hop_length == 0
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
    the audio they span; the frames that reach past a window's edge come from the window alone."""
    hop, half = log_mel.hop_length, log_mel.n_fft // 2
    span = torch.cat([windows[:-1, :hop_samples].reshape(-1), windows[-1]])  # [(B - 1) * hop_samples + N]
    frames = log_mel.frames(span[None])[0]  # [n_mels, M]
    n_frames = N_SAMPLES // hop + 1
    out = frames.unfold(1, n_frames, hop_samples // hop).permute(1, 0, 2).clone()  # [B, n_mels, frames]
    head = math.ceil(half / hop)  # frames whose left half reaches before the window
    tail = N_SAMPLES // hop - (N_SAMPLES - half) // hop  # ... whose right half reaches past it
    out[:, :, :head] = log_mel.frames(windows[:, :(head - 1) * hop + half + 1])[:, :, :head]
    tail_start = (n_frames - tail - head) * hop  # on the frame grid, left of the tail frames' reach
    out[:, :, -tail:] = log_mel.frames(windows[:, tail_start:])[:, :, -tail:]
    return log_mel.per_window(out)
