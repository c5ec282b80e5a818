"""How a recording becomes windows and their wake-word probabilities in onnxruntime (numpy only, never torch).

The windowed model scores each window whole (`stream_probabilities`); the streaming form (deploy.streaming) is fed
one hop at a time with its state (`streamed_probabilities`), for the same windows and the same probabilities.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort

from kd_tune.metrics import activation_indices, refractory_window_count

INPUT_NAME, OUTPUT_NAME = "audio", "probability"
RUN_BATCH = 256  # windows per onnxruntime call
# The streaming form's inputs (deploy.streaming): a hop of audio, then its state, as the outputs after the probability
STREAM_INPUT, STATE_INPUTS = "hop", ("audio_state", "frames_state")
STREAM_OUTPUT, STATE_OUTPUTS = OUTPUT_NAME, tuple(f"{name}_out" for name in STATE_INPUTS)
STREAM_RUNS = 64  # streams fed side by side when a recording is scored with the streaming form
MIN_RUN_HOPS = 100  # a run's windows at least (or all there are): each run first spends a window's worth of hops
# Audio of fewer windows than this many window lengths is scored whole, window by window: the streaming form's first
# hops of a run only fill its state, and on a short clip they would cost more than the windows they save.
MIN_STREAMED_WINDOW_LENGTHS = 2


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
    n_windows = window_count(len(audio), window_samples=window_samples, hop_samples=hop_samples)
    padded = np.zeros((n_windows - 1) * hop_samples + window_samples, np.float32)
    padded[:len(audio)] = audio
    return np.lib.stride_tricks.sliding_window_view(padded, window_samples)[::hop_samples]


def window_count(n_samples: int, *, window_samples: int, hop_samples: int) -> int:
    """How many windows `frames` cuts from n_samples (the tail zero-padded to a whole window)."""
    return 1 + math.ceil(max(n_samples - window_samples, 0) / hop_samples)


def detection_times(scores: np.ndarray, *, threshold: float, sample_rate: int, window_samples: int,
                    hop_samples: int, refractory_seconds: float) -> list[float]:
    """Times (s) where per-window scores [W] fire: the centres of the windows where an activation rises (the wake
    word lies inside that window, and a window centred on it scores highest)."""
    hop_seconds = hop_samples / sample_rate
    fired = activation_indices(scores, threshold=threshold,
                               refractory_windows=refractory_window_count(refractory_seconds, hop_seconds))
    return [(i * hop_samples + window_samples / 2) / sample_rate for i in fired]


def stream_probabilities(session: ort.InferenceSession, audio: np.ndarray, *, window_samples: int,
                         hop_samples: int) -> np.ndarray:
    """run() over frames(audio), cut RUN_BATCH windows at a time: no zero-padded copy of the whole audio."""
    n_windows = window_count(len(audio), window_samples=window_samples, hop_samples=hop_samples)
    out = []
    for first in range(0, n_windows, RUN_BATCH):
        count = min(RUN_BATCH, n_windows - first)
        piece = audio[first * hop_samples:(first + count - 1) * hop_samples + window_samples]
        out.append(run(session, frames(piece, window_samples=window_samples, hop_samples=hop_samples)[:count]))
    return np.concatenate(out)


def streamed_probabilities(session: ort.InferenceSession, audio: np.ndarray, *, window_samples: int,
                           hop_samples: int) -> np.ndarray:
    """stream_probabilities' windows [W], from a streaming model (kd_tune.deploy.streaming) fed one hop at a time.

    The windows are split into runs of consecutive ones, fed side by side as a batch of streams. Each run starts from
    the silent state at its first window's start, and its first `lead` outputs, whose windows reach before that
    start, are dropped: every kept window then holds only the run's own audio, as the windowed model's does.
    """
    audio = np.asarray(audio, np.float32) if len(audio) else np.zeros(1, np.float32)  # empty: one silent window
    n_windows = window_count(len(audio), window_samples=window_samples, hop_samples=hop_samples)
    lead = window_samples // hop_samples - 1
    per_run = min(max(-(-n_windows // STREAM_RUNS), MIN_RUN_HOPS), n_windows)  # windows per run
    runs = -(-n_windows // per_run)
    first = np.arange(runs) * per_run * hop_samples  # [R] where each run's first hop, and first kept window, start
    state = [np.zeros([runs, *i.shape[1:]], np.float32) for i in session.get_inputs()[1:]]
    out = np.empty((runs, lead + per_run), np.float32)
    for step in range(lead + per_run):
        at = first[:, None] + step * hop_samples + np.arange(hop_samples)  # [R, hop] sample positions
        hop = np.where(at < len(audio), audio[np.minimum(at, len(audio) - 1)], np.float32(0))  # zeros past the end
        probabilities, *state = session.run(None, {STREAM_INPUT: hop, **dict(zip(STATE_INPUTS, state, strict=True))})
        if probabilities.shape != (runs,):
            raise ValueError(f"the streaming model returned shape {probabilities.shape} for {runs} streams "
                             f"(expected ({runs},))")
        out[:, step] = probabilities
    return out[:, lead:].reshape(-1)[:n_windows]


def worth_streaming(n_samples: int, *, window_samples: int, hop_samples: int) -> bool:
    """Whether audio of n_samples is cheaper to score with the streaming form than window by window."""
    n_windows = window_count(n_samples, window_samples=window_samples, hop_samples=hop_samples)
    return n_windows >= MIN_STREAMED_WINDOW_LENGTHS * window_samples // hop_samples
