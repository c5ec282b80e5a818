"""Streaming wake-word detection with an exported model: onnxruntime, numpy, soundfile, soxr and pydantic, never torch.

`kd-tune export` (kd_tune.deploy.export) writes model.onnx, raw 16 kHz audio [B, 16000] -> P(wake word) [B], and
model.json beside it, the model card: the streaming settings, the calibrated threshold and the ONNX file's SHA-256,
signed with an HMAC over every field when a key is set (kd_tune.signing). `Detector` verifies such a pair (size
caps, signature, schema, hash) and runs it over audio of any length, rate and channel count within the limits below,
checked from the file's header before anything is decoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import stat
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
import soundfile as sf
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kd_tune.audio.samples import BlockResampler, header_problem, sample_problem
from kd_tune.deploy.windows import (INPUT_NAME, STATE_INPUTS, STATE_OUTPUTS, STREAM_INPUT, STREAM_OUTPUT,
                                    detection_times, stream_probabilities, streamed_probabilities, worth_streaming)
from kd_tune.errors import InputError, shown
from kd_tune.signing import SpecialFileError, open_regular, parse_json, verify_signature

FORMAT = "kd_tune.onnx/1"
# Memory of reading a file: its audio at the model's rate, 4 bytes a sample (~230 MB per hour at 16 kHz, whatever
# the file's own rate: it is decoded READ_BLOCK_FRAMES at a time and resampled as it comes, never held at 192 kHz),
# plus a fixed working set of a few MB for a mono file (a decoded block, 4 bytes per frame and channel, and soxr's
# state). Scoring adds 4 bytes per window and one batch of RUN_BATCH
# windows (16 MiB for 1 s windows). tests/deploy/test_detect.py measures both. Split recordings past MAX_AUDIO_SECONDS.
MAX_AUDIO_SECONDS = 3600
READ_BLOCK_FRAMES = 2**18  # frames decoded at a time: 1 MiB per channel
MAX_CARD_BYTES = 2**20  # a card is ~2 KB
# A wake-word model is well under 1 MB: 64 MiB leaves room for a student 50x larger, and a larger file (a 2 GB
# sparse one) is refused from its size before it is read and hashed whole.
MAX_MODEL_BYTES = 64 * 2**20
# Every exported model holds the 16 kHz front end (kd_tune.audio.features.SAMPLE_RATE): a card naming another rate would
# feed it audio resampled to that rate, and its answers would be wrong without a word.
MODEL_SAMPLE_RATE_HZ = 16_000
MIN_HOP_SECONDS = 0.01  # windows closer than 10 ms multiply the work (100x at 0.1 ms) without telling anything new
# A window holds at most ~8 s at 16 kHz: a batch of RUN_BATCH windows is then at most 128 MiB of float32.
MAX_WINDOW_SAMPLES = 2**17
MAX_REFRACTORY_SECONDS = MAX_AUDIO_SECONDS
# onnxruntime raises its own exception types (InvalidProtobuf, InvalidGraph, Fail, ...) derived from Exception only.
ORT_ERRORS = tuple(v for v in vars(ort_state).values() if isinstance(v, type) and issubclass(v, Exception))


log = logging.getLogger(__name__)

class DetectError(InputError):
    """A model, model card or audio file that detection cannot use; the message names the file."""


class StreamingFile(BaseModel):
    """The card's `streaming` entry: the streaming form of the same model (kd_tune.deploy.streaming), beside it."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    onnx_file: str = Field(pattern=r"^[A-Za-z0-9._-]+\.onnx$")  # a name in the model's folder, never a path
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    hop_samples: int = Field(ge=1, le=MAX_WINDOW_SAMPLES)


class ModelCard(BaseModel):
    """The fields of model.json that detection relies on (the card holds more: figures, provenance)."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    format: Literal["kd_tune.onnx/1"]
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    sample_rate: int
    window_samples: int = Field(ge=1, le=MAX_WINDOW_SAMPLES)
    hop_samples: int = Field(ge=1, le=MAX_WINDOW_SAMPLES)
    threshold: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    refractory_seconds: float = Field(ge=0.0, le=MAX_REFRACTORY_SECONDS, allow_inf_nan=False)
    streaming: StreamingFile | None = None

    @field_validator("sample_rate")
    @classmethod
    def _the_front_end_rate(cls, rate: int) -> int:
        if rate != MODEL_SAMPLE_RATE_HZ:
            raise ValueError(f"{shown(rate)} Hz, but the model's front end runs at {MODEL_SAMPLE_RATE_HZ} Hz")
        return rate

    @model_validator(mode="after")
    def _hop_fits_the_window(self) -> ModelCard:
        least = round(self.sample_rate * MIN_HOP_SECONDS)
        if not least <= self.hop_samples <= self.window_samples:
            raise ValueError(f"hop_samples {self.hop_samples} is outside {least} ({MIN_HOP_SECONDS * 1000:g} ms) to "
                             f"window_samples {self.window_samples}")
        if self.streaming is not None and self.streaming.hop_samples != self.hop_samples:
            raise ValueError(f"streaming.hop_samples {self.streaming.hop_samples} differs from hop_samples "
                             f"{self.hop_samples}")
        return self


def card_name(model_path: Path) -> str:
    """model.onnx -> model.json; model.int8.onnx -> model.int8.json."""
    return model_path.with_suffix(".json").name


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def name_of(source: Any) -> str:
    """A file's name for messages: a path as given, a file object's `name`, never an object's repr."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else f"<{type(source).__name__} without a file name>"


def read_file(path: Path, *, max_bytes: int, what: str) -> bytes:
    """A regular file of at most max_bytes, checked from its metadata before anything is read."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device could block or never end
            raise DetectError(f"{path}: not a regular file; allowed: {what}")
        if info.st_size > max_bytes:
            raise DetectError(f"{path}: {info.st_size} bytes; allowed: at most {max_bytes} bytes for {what}")
        with open(path, "rb") as f:
            data = f.read(info.st_size + 1)
    except FileNotFoundError:
        raise DetectError(f"{path}: no such file; allowed: {what}") from None
    except OSError as error:
        raise DetectError(f"{path}: cannot read it ({error.strerror or error}); allowed: {what}") from None
    if len(data) > max_bytes:
        raise DetectError(f"{path}: grew past {max_bytes} bytes while read; allowed: {what}")
    return data


def read_card(model_path: Path) -> ModelCard:
    """The model card beside an exported model: size-capped, signature verified, then checked against the schema."""
    card_path = model_path.with_name(card_name(model_path))
    what = "the model card `kd-tune export` writes beside the model"
    data = read_file(card_path, max_bytes=MAX_CARD_BYTES, what=what)
    try:
        card = parse_json(data)
    except ValueError as error:
        raise DetectError(f"{card_path}: not valid JSON: {error}; allowed: {what}") from None
    if not isinstance(card, dict):
        raise DetectError(f"{card_path}: a JSON {type(card).__name__}, not an object; allowed: {what}")
    verify_signature(card, str(card_path), error=DetectError)
    try:
        return ModelCard.model_validate(card)
    except ValidationError as error:
        raise DetectError(f"{card_path}: {field_errors(error)}; allowed: {what}") from None


def field_errors(error: ValidationError, *, shown: int = 4) -> str:
    """Pydantic's errors as `field: what is wrong`, without the (possibly huge) input values."""
    problems = [f"{'.'.join(map(str, e['loc'])) or 'card'}: {e['msg']}" for e in error.errors(include_url=False)]
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


def open_session(model: bytes, *, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = options.inter_op_num_threads = threads
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def opened(source: Any):
    """A path opened once os.stat shows a regular file (a FIFO would block the open forever, a device never end), or
    a file object as given."""
    return open_regular(source) if isinstance(source, (str, os.PathLike)) else contextlib.nullcontext(source)


def load_audio(source: Any, *, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Mono float32 [T] at sample_rate from a file soundfile reads (a path or a file object): the header is checked
    first, then blocks are decoded, their channels averaged, samples checked and other rates resampled as they come.
    max_seconds: read only the file's first max_seconds."""
    where = name_of(source)
    try:
        with opened(source) as raw, sf.SoundFile(raw) as f:  # opening reads the header only
            rate = f.samplerate
            check_header(rate, f.channels, f.frames, where=where)
            frames = f.frames if max_seconds is None else min(f.frames, math.ceil(max_seconds * rate))
            return decoded(f, frames, sample_rate, where=where)
    except SpecialFileError as error:
        raise DetectError(f"{where}: not a regular file ({error.kind}); allowed: an audio file") from None
    except (sf.SoundFileError, RuntimeError, OSError) as error:
        raise DetectError(f"{where}: cannot read audio ({str(error).replace(repr(source), where)}); allowed: a file "
                          "soundfile reads (WAV, FLAC, OGG, ...)") from None


def decoded(f: sf.SoundFile, frames: int, sample_rate: int, *, where: str) -> np.ndarray:
    """The first `frames` frames of open file f, mono at sample_rate, filled into one array sized from the header."""
    resampler = BlockResampler(f.samplerate, sample_rate) if f.samplerate != sample_rate else None
    out = np.empty(-(-frames * sample_rate // f.samplerate), np.float32)  # the header's count, bounded above
    done = filled = 0
    while done < frames:
        block = f.read(min(READ_BLOCK_FRAMES, frames - done), dtype="float32", always_2d=True)  # [t, C]
        if not len(block):
            break
        check_samples(block, where=where)
        mono = block.mean(axis=1)
        done += len(block)
        filled = fill(out, filled, resampler.push(mono) if resampler else mono)
    if done == 0:
        raise DetectError(f"{where}: holds no samples; allowed: audio of at least one sample")
    filled = fill(out, filled, resampler.finish()) if resampler else filled
    return out[:filled]


def fill(out: np.ndarray, filled: int, piece: np.ndarray) -> int:
    """piece copied into out after its first `filled` samples (a file shorter than its header stops early)."""
    piece = piece[:len(out) - filled]
    out[filled:filled + len(piece)] = piece
    return filled + len(piece)


def check_header(rate: int, channels: int, frames: int, *, where: str) -> None:
    """Refuse, before decoding, audio whose header promises what detection will not take."""
    if refused := header_problem(rate, channels):
        raise DetectError(f"{where}: {refused}")
    if frames > MAX_AUDIO_SECONDS * rate:
        raise DetectError(f"{where}: {frames / rate:.0f} s long; allowed: at most {MAX_AUDIO_SECONDS} s per file "
                          "(split longer recordings)")


def check_samples(samples: np.ndarray, *, where: str) -> None:
    """Refuse NaN, infinite or absurdly large samples: they would not give a wrong answer, but no answer at all."""
    if refused := sample_problem(samples):
        raise DetectError(f"{where}: {refused}")


class Detector:
    """Wake-word detection over long audio with an exported model and the model card beside it.

    The audio is cut into windows of window_samples every hop_samples (the tail zero-padded to a whole window), and
    the detector fires on a rising edge past the threshold, at least refractory_seconds after the previous detection
    (see activation_indices). A detection's time is the centre of the window where the edge rises, start +
    window / 2: the wake word lies inside that window, and a window centred on it scores highest.
    """

    def __init__(self, model_path: str | Path, *, threshold: float | None = None, threads: int | None = None,
                 streaming: bool = True):
        self.model_path = Path(model_path)
        self.card = read_card(self.model_path)
        self.session = self.load(self.model_path, self.card.onnx_sha256, "onnx_sha256", threads)
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise DetectError(f"threshold: got {threshold!r}; allowed: a probability in [0, 1]")
        self.threshold = self.card.threshold if threshold is None else float(threshold)
        self.sample_rate, self.window_samples = self.card.sample_rate, self.card.window_samples
        self.hop_samples, self.refractory_seconds = self.card.hop_samples, self.card.refractory_seconds
        inputs = [(i.name, i.shape) for i in self.session.get_inputs()]
        if [name for name, _ in inputs] != [INPUT_NAME] or list(inputs[0][1])[1:] != [self.window_samples]:
            raise DetectError(f"{self.model_path}: takes {inputs}; allowed: one input {INPUT_NAME!r} of shape "
                              f"[batch, {self.window_samples}] (window_samples in {card_name(self.model_path)})")
        # The streaming form, when the card names one: the same probabilities for a fraction of the work per hop.
        # One left behind (only model.onnx and its card copied) costs speed, not answers.
        entry = self.card.streaming if streaming else None
        if entry is not None and not self.model_path.with_name(entry.onnx_file).exists():
            log.warning("%s: the streaming form %s named in its card is missing; scoring window by window",
                        self.model_path, entry.onnx_file)
            entry = None
        self.stream_session = None if entry is None else self.load(
            self.model_path.with_name(entry.onnx_file), entry.onnx_sha256, "streaming.onnx_sha256", threads)
        if entry is not None and self.stream_session is not None:
            session = self.stream_session
            names = [[i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]]
            if names != [[STREAM_INPUT, *STATE_INPUTS], [STREAM_OUTPUT, *STATE_OUTPUTS]]:
                raise DetectError(f"{entry.onnx_file}: takes and gives {names}; allowed: those of the streaming form "
                                  "`kd-tune export --streaming` writes")

    def load(self, path: Path, expected_sha256: str, field: str, threads: int | None) -> ort.InferenceSession:
        """A session of the ONNX file at path, once its bytes hash to the card's `field`."""
        model = read_file(path, max_bytes=MAX_MODEL_BYTES, what="an ONNX model written by `kd-tune export`")
        if sha256(model) != expected_sha256:
            raise DetectError(f"{path}: does not match {field} in {card_name(self.model_path)}: the file changed "
                              "after export, so the card's threshold does not belong to it; allowed: the model "
                              "exported with this card (export again)")
        try:
            return open_session(model, threads=threads)
        except ORT_ERRORS as error:
            raise DetectError(f"{path}: onnxruntime cannot load it ({str(error).splitlines()[0][:200]}); "
                              "allowed: an ONNX model written by `kd-tune export`") from None

    def read(self, source: Any, *, max_seconds: float | None = None) -> np.ndarray:
        """A file's audio (a path or a file object) as mono float32 [T] at the model's sample rate; with max_seconds,
        only its start."""
        return load_audio(source, sample_rate=self.sample_rate, max_seconds=max_seconds)

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """P(wake word) [W] of each window of mono audio [T] at the model's sample rate."""
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise DetectError(f"audio: shape {audio.shape}; allowed: non-empty mono samples [T]")
        check_samples(audio, where="audio")
        windows = dict(window_samples=self.window_samples, hop_samples=self.hop_samples)
        streaming = self.stream_session is not None and worth_streaming(len(audio), **windows)
        try:
            if streaming:
                return streamed_probabilities(self.stream_session, audio, **windows)
            return stream_probabilities(self.session, audio, **windows)
        except (ValueError,) + ORT_ERRORS as error:  # not (ValueError, *ORT_ERRORS): mypy rejects that form
            entry = self.card.streaming if streaming else None
            model = self.model_path.with_name(entry.onnx_file) if entry else self.model_path
            raise DetectError(f"{model}: {str(error).splitlines()[0][:200]}; allowed: a model written by "
                              "`kd-tune export` for this card") from None

    def detect(self, audio: np.ndarray) -> list[float]:
        """Times (s) of the detections in mono audio [T]: the centres of the windows where they fire."""
        return detection_times(self.probabilities(audio), threshold=self.threshold, sample_rate=self.sample_rate,
                               window_samples=self.window_samples, hop_samples=self.hop_samples,
                               refractory_seconds=self.refractory_seconds)
