"""The streaming form of an exported detector: one hop of audio and the state in, the probability and the state out.

The windowed model recomputes the whole 1 s window every hop, and ~90% of its front end was done for the previous
hop. `StreamingDetector` keeps the window's audio and its mel power frames as state, and computes only the frames the
new hop brings plus the few edge frames that the window's own reflect padding makes (see scoring.window_log_mels),
all in one matrix product. The per-window normalization and the network then see the windowed model's input, so
the probabilities are the windowed model's, hop for hop (export checks it). Frames are cached as mel power, not
log-mel, so an all-zero state is the state of a silent past for every normalization.
"""

from __future__ import annotations

import io
import math
import warnings

import torch
from torch import Tensor, nn

from kd_tune.audio.features import N_SAMPLES, LogMel
from kd_tune.deploy.windows import STATE_INPUTS, STATE_OUTPUTS, STREAM_INPUT, STREAM_OUTPUT
from kd_tune.errors import InputError

STREAM_INPUTS, STREAM_OUTPUTS = (STREAM_INPUT, *STATE_INPUTS), (STREAM_OUTPUT, *STATE_OUTPUTS)


class StreamingError(InputError):
    """A hop that the streaming form cannot serve."""


class StreamingDetector(nn.Module):
    """(hop [B, H], audio_state [B, N], frames_state [B, n_mels, T]) -> (P(wake word) [B], new audio_state,
    new frames_state); N = N_SAMPLES, T the window's frames. Start from zeros: the state of a silent past."""

    index: Tensor  # a buffer, declared: through nn.Module.__getattr__ it would read as Tensor | Module

    def __init__(self, student: nn.Module, log_mel: LogMel, *, hop_samples: int):
        super().__init__()
        step = log_mel.hop_length
        if hop_samples < 1 or hop_samples % step or N_SAMPLES % hop_samples or hop_samples == N_SAMPLES:
            raise StreamingError(f"hop_samples {hop_samples}: the streaming form needs a hop that is a whole number "
                                 f"of frames ({step} samples) and divides the {N_SAMPLES}-sample window into two or "
                                 f"more; allowed: e.g. {N_SAMPLES // 10} (training.eval_hop_ms 100)")
        if log_mel.n_fft % 2:  # the frame count and edge frames below assume a centred window of even length
            raise StreamingError(f"features.window_ms gives a {log_mel.n_fft}-sample frame; the streaming form needs "
                                 "an even number of samples, e.g. window_ms 25 (400)")
        self.student, self.log_mel, self.hop_samples = student, log_mel, hop_samples
        self.n_frames = N_SAMPLES // step + 1
        head = math.ceil(log_mel.n_fft // 2 / step)  # frames whose left half reaches before the window (reflected)
        tail = N_SAMPLES // step - (N_SAMPLES - log_mel.n_fft // 2) // step  # ... whose right half reaches past it
        kept = max(self.n_frames - head - tail - hop_samples // step, 0)  # interior frames the last window holds
        # The frames computed anew each hop: the edges, and the interior ones the hop brings.
        new = [*range(head), *range(head + kept, self.n_frames)]
        self.register_buffer("index", log_mel.frame_index(N_SAMPLES, new), persistent=False)  # [F, n_fft]
        self.split = (head, len(new) - head)  # the edge frames at the start, then the rest
        self.kept = slice(self.n_frames - tail - kept, self.n_frames - tail)  # where the kept ones are in the state

    def forward(self, hop: Tensor, audio: Tensor, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        window = torch.cat([audio[:, self.hop_samples:], hop], dim=1)  # [B, N]
        head, rest = self.log_mel.power_of(window[:, self.index]).split(self.split, dim=2)  # [B, M, head], [B, M, F']
        power = torch.cat([head, frames[:, :, self.kept], rest], dim=2)  # [B, M, T], the window's mel power
        logits = self.student(self.log_mel.per_window(self.log_mel.compress(power)))  # [B, 2]
        return logits.float().softmax(-1)[:, 1], window, power


def streaming_onnx(detector: StreamingDetector, *, opset: int) -> bytes:
    """The legacy exporter's graph of the detector: a dynamic batch of streams, every other size fixed."""
    batch = 2  # a batch of 1 would fix the batch axis
    example = (torch.zeros(batch, detector.hop_samples), torch.zeros(batch, N_SAMPLES),
               torch.zeros(batch, detector.log_mel.n_mels, detector.n_frames))
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # torch types f as a path, but the legacy exporter (dynamo=False) writes to a file object as well
        torch.onnx.export(detector.eval(), example, buffer,  # type: ignore[arg-type]
                          input_names=list(STREAM_INPUTS), output_names=list(STREAM_OUTPUTS), opset_version=opset,
                          dynamo=False, dynamic_axes={name: {0: "batch"} for name in STREAM_INPUTS + STREAM_OUTPUTS})
    return buffer.getvalue()
