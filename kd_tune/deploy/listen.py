"""`kd-tune detect MODEL --mic`: the wake word, live, from a microphone (miniaudio, the optional `mic` extra).

The device's audio is resampled by the soxr resampler that files go through (audio.samples) and fed one hop at a
time to the streaming form, or without one to the windowed model over the last window. A detection fires on the
rising edge and refractory rule of detection over a file (metrics.activation_indices), at the same times.
"""

from __future__ import annotations

import contextlib
import os
import queue
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from kd_tune.audio.samples import BlockResampler
from kd_tune.deploy.detect import Detector, DetectError
from kd_tune.deploy.windows import INPUT_NAME, STATE_INPUTS, STREAM_INPUT
from kd_tune.errors import shown
from kd_tune.metrics import refractory_window_count

MIC_RATE_HZ = 48_000  # asked of the device (miniaudio converts from its own); soxr takes it to the model's rate
MIC_BLOCK_MS = 100
SILENT_DEVICE_S = 5.0  # no block for this long: the device has stopped delivering audio
MAX_QUEUED_BLOCKS = 50  # 5 s of audio waiting: detection has fallen behind the microphone, refused, not hoarded
BACKENDS = ("default", "alsa", "pulseaudio", "jack", "coreaudio", "wasapi", "null")  # null: silence, a dry run


class Trigger:
    """metrics.activation_indices one window at a time: True on a rising edge past the threshold, unless within
    refractory_windows of the previous detection."""

    def __init__(self, *, threshold: float, refractory_windows: int):
        self.threshold, self.refractory_windows = threshold, max(refractory_windows, 1)
        self.window, self.above = -1, False  # the stream starts below the threshold
        self.fired: int | None = None

    def __call__(self, probability: float) -> bool:
        self.window += 1
        rising = probability >= self.threshold and not self.above
        self.above = probability >= self.threshold
        fire = rising and (self.fired is None or self.window - self.fired >= self.refractory_windows)
        self.fired = self.window if fire else self.fired
        return fire


class LiveDetector:
    """Detector.detect over audio that arrives block by block: feed() returns the times (s from the first sample)
    of the detections that its block completes, the windows that reach before the first sample left out."""

    def __init__(self, detector: Detector):
        self.detector, self.hop = detector, detector.hop_samples
        self.pending = np.zeros(0, np.float32)  # streaming: [< hop] samples; windowed: from the next window's start
        self.windows = 0  # windows scored so far, those before the first sample counted (streaming)
        session = detector.stream_session
        # the streaming form starts from a silent past, so its first outputs are windows that reach before it
        self.lead = 0 if session is None else detector.window_samples // self.hop - 1
        self.state = [] if session is None else [np.zeros([1, *i.shape[1:]], np.float32)
                                                 for i in session.get_inputs()[1:]]
        self.trigger = Trigger(threshold=detector.threshold, refractory_windows=refractory_window_count(
            detector.refractory_seconds, self.hop / detector.sample_rate))

    def feed(self, audio: np.ndarray) -> list[float]:
        """audio [T] mono float32 at the model's rate -> detection times."""
        self.pending = np.concatenate([self.pending, np.asarray(audio, np.float32)])
        need = self.hop if self.detector.stream_session is not None else self.detector.window_samples
        times = []
        while len(self.pending) >= need:
            probability = self.score(self.pending[:need])
            self.pending, self.windows = self.pending[self.hop:], self.windows + 1
            index = self.windows - self.lead - 1  # the window just scored, counted from the first sample
            if index >= 0 and self.trigger(probability):
                times.append((index * self.hop + self.detector.window_samples / 2) / self.detector.sample_rate)
        return times

    def score(self, audio: np.ndarray) -> float:
        """P(wake word) of the window that ends with audio: a hop [H] for the streaming form, else the window [W]."""
        d = self.detector
        if d.stream_session is None:
            return float(d.session.run(None, {INPUT_NAME: audio[None]})[0].reshape(-1)[0])
        probability, *self.state = d.stream_session.run(None, {STREAM_INPUT: audio[None], **dict(zip(
            STATE_INPUTS, self.state, strict=True))})
        return float(np.asarray(probability).reshape(-1)[0])


class Microphone:
    """The backend's default capture device, as blocks [B] of mono float32 audio at MIC_RATE_HZ (iterate inside
    `with`); opening it is what fails on a machine without one."""

    def __init__(self, backend: str):
        if backend not in BACKENDS:
            raise DetectError(f"--backend: got {shown(backend)}; allowed: {', '.join(BACKENDS)}")
        try:
            import miniaudio
        except ImportError:
            raise DetectError("--mic: miniaudio is not installed; allowed: pip install 'kd_tune[mic]'") from None
        self.blocks: queue.Queue[np.ndarray] = queue.Queue(maxsize=MAX_QUEUED_BLOCKS)
        self.overflowed = False
        try:
            backends = [] if backend == "default" else [miniaudio.Backend[backend.upper()]]
            with c_stderr_silenced():  # libasound prints its probing of every absent card; the refusal says it all
                self.device = miniaudio.CaptureDevice(input_format=miniaudio.SampleFormat.FLOAT32, nchannels=1,
                                                      sample_rate=MIC_RATE_HZ, buffersize_msec=MIC_BLOCK_MS,
                                                      backends=backends)
        except miniaudio.MiniaudioError as error:
            raise DetectError(f"--mic: no capture device on the {backend} backend (miniaudio: "
                              f"{', '.join(map(str, error.args))}); allowed: a machine with a working audio input, "
                              f"or another --backend ({', '.join(BACKENDS)})") from None
        self.backend = self.device.backend

    def capture(self) -> Any:  # miniaudio's callback generator, run on its own thread
        while True:
            block = np.frombuffer((yield), np.float32).copy()
            try:
                self.blocks.put_nowait(block)
            except queue.Full:  # never block miniaudio's thread; the reader says so
                self.overflowed = True

    def __enter__(self) -> Microphone:
        generator = self.capture()
        next(generator)
        self.device.start(generator)
        return self

    def __exit__(self, *exc: object) -> None:
        self.device.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            try:
                block = self.blocks.get(timeout=SILENT_DEVICE_S)
            except queue.Empty:
                raise DetectError(f"--mic: the {self.backend} device delivered no audio for {SILENT_DEVICE_S:g} s; "
                                  "allowed: a capture device that is not in use or muted") from None
            if self.overflowed:
                raise DetectError(f"--mic: detection fell {MAX_QUEUED_BLOCKS * MIC_BLOCK_MS / 1000:g} s behind the "
                                  "microphone; allowed: a machine that runs the model in real time (see `kd-tune "
                                  "bench`), or a smaller model")
            yield block


@contextlib.contextmanager
def c_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null meanwhile: what C libraries print there, Python's own stderr included."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def listen(detector: Detector, blocks: Iterable[np.ndarray], *, rate_hz: int, seconds: float | None,
           echo: Callable[[str], None]) -> list[float]:
    """Detect over blocks of audio at rate_hz until `seconds` of it, the blocks' end or Ctrl-C; echo each detection
    and return their times."""
    live, resampler = LiveDetector(detector), BlockResampler(rate_hz, detector.sample_rate)
    heard, found = 0, []
    try:
        for block in blocks:
            for t in live.feed(resampler.push(block)):
                echo(f"wake word at {t:.2f} s")
                found.append(t)
            heard += len(block)
            if seconds is not None and heard >= seconds * rate_hz:
                break
    except KeyboardInterrupt:
        echo("stopped")
    return found


def listen_to_microphone(detector: Detector, *, backend: str, seconds: float | None,
                         echo: Callable[[str], None]) -> list[float]:
    """`kd-tune detect --mic`: listen() to the backend's default capture device; Ctrl-C stops it."""
    with Microphone(backend) as mic:
        echo(f"listening on the {mic.backend} capture device (threshold {detector.threshold:.4g}); "
             + ("Ctrl-C to stop" if seconds is None else f"for {seconds:g} s"))
        found = listen(detector, mic, rate_hz=MIC_RATE_HZ, seconds=seconds, echo=echo)
    echo(f"{len(found)} detection(s)")
    return found
