"""ONNX export of a trained student, front end included, and streaming wake-word detection with the exported file.

`export_student` writes model.onnx, raw 16 kHz audio [B, 16000] -> P(wake word) [B], and model.json beside it: the
streaming settings, a threshold calibrated on the validation split for the target false accepts per hour, and the
figures that vouch for the file (parity with PyTorch, validation metrics, latency). `Detector` runs such a pair with
onnxruntime, numpy and soundfile only: everything that needs torch is imported inside the export functions, so this
module itself loads no torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tempfile
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from kd_tune import __version__
from kd_tune.metrics import activation_indices

if TYPE_CHECKING:  # torch-backed modules, imported inside the functions that use them
    from torch import nn

    from kd_tune.config import Config
    from kd_tune.data import WakewordData
    from kd_tune.features import LogMel
    from kd_tune.storage import Checkpoint, Storage

FORMAT = "kd_tune.onnx/1"
INPUT_NAME, OUTPUT_NAME = "audio", "probability"
OPSET = 17
NEGATIVE_LABEL = "not_wakeword"
STUDENT_SCOPE = "/student/"  # ONNX node-name prefix of the student's operators (its module name in the export)
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]  # where the student's weights and arithmetic are
LEADERBOARD_NAME = "leaderboard.json"
PARITY_TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| wake-word probability
PARITY_CLIPS = 256
CHECK_BATCHES = (1, 7)  # batch sizes besides the full one that the exported graph must run
RUN_BATCH = 256  # windows per onnxruntime call
LATENCY_RUNS = 200
LATENCY_WARMUP_RUNS = 10
RESAMPLE_ZERO_CROSSINGS = 16  # of the windowed sinc, on each side
RESAMPLE_ROLLOFF = 0.99  # low-pass cut-off as a fraction of the lower Nyquist frequency
RESAMPLE_CHUNK = 65536  # output samples per vectorised step, bounding memory on long files


class ParityError(RuntimeError):
    """onnxruntime's probabilities differ from PyTorch's by more than the tolerance."""


# ---------------------------------------------------------------- where the checkpoint comes from


@dataclass(frozen=True)
class Source:
    """A student checkpoint's place: a storage root, the checkpoint directory under it and, from a sweep, its trial."""

    store: Storage
    rel_dir: str
    experiment: str | None = None
    trial: str | None = None

    def load(self) -> Checkpoint:
        """The checkpoint, verified (file set, sizes, SHA-256, signature rules) before any tensor is built."""
        from kd_tune import storage

        return storage.load_checkpoint(self.store, self.rel_dir)

    def describe(self) -> dict:
        return {"experiment": self.experiment, "trial": self.trial,
                "checkpoint": f"{self.store.uri.rstrip('/')}/{self.rel_dir}"}


def locate_source(source: str, config: Config) -> Source:
    """A checkpoint directory, or an experiment `PATH_OR_URI/NAME` whose leaderboard.json names its best checkpoint.

    Both may be local or s3://; config.storage supplies the S3 endpoint and region.
    """
    from kd_tune import storage, tune

    store, name = tune.experiment_storage(source, config)
    if store.exists(f"{name}/{storage.MANIFEST_NAME}"):
        return Source(store, name)
    if store.exists(f"{name}/{LEADERBOARD_NAME}"):
        return best_trial(store, name, experiment=source)
    raise FileNotFoundError(f"{source} is neither a checkpoint directory (it has no {storage.MANIFEST_NAME}) nor an "
                            f"experiment (it has no {LEADERBOARD_NAME})")


def best_trial(store: Storage, name: str, *, experiment: str) -> Source:
    """The checkpoint of the best leaderboard row that has one; it must lie inside the experiment directory."""
    from kd_tune import storage

    rows = storage.read_json(store, f"{name}/{LEADERBOARD_NAME}")
    row = next((r for r in rows if isinstance(r, dict) and r.get("checkpoint")), None)  # rows are sorted best first
    if row is None:
        raise FileNotFoundError(f"{experiment}: no trial in {LEADERBOARD_NAME} has a checkpoint")
    root, path = store.root, str(row["checkpoint"]).rstrip("/")
    # A leaderboard is data: a path elsewhere would make export load a checkpoint the experiment never wrote.
    if not path.startswith(f"{root}/{name}/"):
        raise storage.PathEscapeError(f"{experiment}: trial {row.get('trial')}'s checkpoint {path!r} lies outside the "
                                      f"experiment directory {root}/{name} (moved? pass the checkpoint directory)")
    return Source(store, path[len(root) + 1:], experiment=experiment, trial=row.get("trial"))


def resolve_source(source: str, config: Config) -> Checkpoint:
    """The verified checkpoint that a checkpoint directory or an experiment names (see locate_source)."""
    return locate_source(source, config).load()


# ---------------------------------------------------------------- export (needs torch)


def load_student(checkpoint: Checkpoint) -> tuple[Config, nn.Module, LogMel]:
    """The checkpoint's resolved config, its student in eval mode, and the front end it was trained with."""
    from kd_tune import storage
    from kd_tune.config import validate
    from kd_tune.features import LogMel
    from kd_tune.models import build_student

    kind = checkpoint.manifest.get("kind")
    if kind != "student" or "model" not in checkpoint.tensors:
        raise storage.CheckpointError(f"checkpoint of kind {kind!r} with files {sorted(checkpoint.tensors)} is not a "
                                      "student checkpoint (allowed: kind 'student' with model.safetensors)")
    config = validate(checkpoint.manifest["config"], source="the checkpoint's manifest config")
    f = config.features
    student = build_student(config.student.name, width=config.student.width, n_mels=f.n_mels)
    storage.load_state_dict_strict(student, checkpoint.tensors["model"])
    return config, student.eval(), LogMel(n_mels=f.n_mels, window_ms=f.window_ms, hop_ms=f.hop_ms)


def probability_model(student: nn.Module, log_mel: LogMel) -> nn.Module:
    """audio [B, N] -> softmax(student(log_mel(audio)))[:, 1] [B], as one module to export."""
    import torch
    from torch import nn

    # Column 1 is picked by a fixed one-hot linear map (exact: 0 * p0 + 1 * p1 = p1), so the wrapper is a plain
    # Sequential and this module defines no torch class of its own: the Detector path imports it without torch.
    pick = nn.Linear(2, 1, bias=False).requires_grad_(False)
    pick.weight.copy_(torch.tensor([[0.0, 1.0]]))
    return nn.Sequential(OrderedDict(front_end=log_mel, student=student, softmax=nn.Softmax(dim=-1),
                                     pick_wakeword=pick, flatten=nn.Flatten(0))).eval()


def to_onnx(model: nn.Module, *, window_samples: int) -> bytes:
    """The legacy TorchScript exporter (exact and fast): a dynamic batch axis, the window length fixed."""
    import torch

    buffer = io.BytesIO()
    # Its deprecation notice and constant-folding notes are expected; the parity check is what vouches for the file.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, window_samples),), buffer, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=OPSET, dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return buffer.getvalue()


def quantize_int8(model: bytes, calibration: np.ndarray) -> bytes:
    """Static int8 quantization of the student's QUANTIZED_OPS (QDQ: per-channel QInt8 weights, QUInt8 activations).

    Activation ranges are calibrated on `calibration` windows [N, window_samples]. Dynamic quantization was tried
    first: it runs, but onnxruntime's ConvInteger path made a ds_cnn window 6-10x slower than float32. Only nodes
    under STUDENT_SCOPE are quantized: in 8 bits the front end's DFT and mel matrices would squeeze the power
    spectrum's ~100 dB range into ~48 dB, and the probability head is an exact one-hot pick.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="kd_tune_int8_") as tmp:
        source, prepared, quantized = (Path(tmp, name) for name in ("float.onnx", "prepared.onnx", "int8.onnx"))
        source.write_bytes(model)
        quant_pre_process(source, prepared)  # shape inference and BatchNorm folding, as onnxruntime recommends
        keep_float = [n.name for n in onnx.load(prepared).graph.node if not n.name.startswith(STUDENT_SCOPE)]
        quantize_static(prepared, quantized, CalibrationReader(calibration), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=QUANTIZED_OPS, per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8, nodes_to_exclude=keep_float)
        return quantized.read_bytes()


class CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol over windows [N, window_samples], RUN_BATCH at a time."""

    def __init__(self, windows: np.ndarray):
        self.batches = iter(np.array_split(windows, max(1, math.ceil(len(windows) / RUN_BATCH))))

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}


@dataclass(frozen=True)
class Validation:
    """The validation split as numpy: what thresholds are calibrated on and exported models are measured on."""

    clips: np.ndarray  # [N, window_samples] float32
    labels: np.ndarray  # [N] 0/1
    stream: np.ndarray  # [T] float32, every negative clip end to end
    reference: np.ndarray  # [min(N, PARITY_CLIPS)] PyTorch's probabilities of the first clips
    sample_rate: int
    hop_samples: int
    target_fa_per_hour: float
    refractory_seconds: float
    data: dict  # root and manifest sha256 of the data set


def validation_set(config: Config, student: nn.Module, log_mel: LogMel,
                   data: WakewordData | str | Path | None) -> Validation:
    """The val split of `data` (a loaded set or its directory; None: the checkpoint's data.root)."""
    from kd_tune.data import WakewordData, load_dataset
    from kd_tune.features import SAMPLE_RATE
    from kd_tune.train import predict

    if not isinstance(data, WakewordData):
        data = load_dataset(config.data.root if data is None else data)
    val, stream = data.val, data.negative_stream("val")
    if stream.numel() == 0:
        raise ValueError(f"the validation split of {data.root} has no negative clips: the threshold for "
                         f"{config.training.target_fa_per_hour} FA/h is calibrated on them (allowed: a data set "
                         "whose val split holds negatives)")
    clips = val.audio.float()  # [N, N_SAMPLES]
    reference = predict(student, clips[:PARITY_CLIPS], log_mel).numpy()  # [min(N, PARITY_CLIPS)]
    t = config.training
    return Validation(clips.numpy(), val.labels.numpy(), stream.float().numpy(), reference, SAMPLE_RATE,
                      round(t.eval_hop_ms * SAMPLE_RATE / 1000), t.target_fa_per_hour, t.refractory_seconds,
                      {"root": str(data.root), "manifest_sha256": data.manifest_sha256})


def max_abs_diff(reference, candidate) -> float:
    """max |candidate - reference| of two equally shaped, non-empty arrays (NaN when either holds a NaN)."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape or reference.size == 0:
        raise ParityError(f"cannot compare probabilities of shapes {reference.shape} and {candidate.shape} "
                          "(allowed: equal, non-empty shapes)")
    return float(np.max(np.abs(candidate - reference)))


def check_parity(reference, candidate, *, tolerance: float = PARITY_TOLERANCE) -> float:
    """max |candidate - reference|; ParityError when it exceeds tolerance or is NaN."""
    figure = max_abs_diff(reference, candidate)
    if not figure <= tolerance:
        raise ParityError(f"onnxruntime and PyTorch wake-word probabilities differ by up to {figure:.3g} over "
                          f"{np.size(reference)} values (allowed: <= {tolerance:g}): the exported model does not "
                          "compute what the checkpoint does")
    return figure


def parity_pairs(session: ort.InferenceSession, val: Validation) -> tuple[np.ndarray, np.ndarray]:
    """(PyTorch, onnxruntime) probabilities of the reference clips, run in full batches, then in CHECK_BATCHES."""
    clips = val.clips[:len(val.reference)]
    expected, got = [val.reference], [run(session, clips)]
    for batch in CHECK_BATCHES:
        rows = np.arange(batch) % len(clips)  # clips repeat when there are fewer than the batch
        expected.append(val.reference[rows])
        got.append(run(session, clips[rows]))
    return np.concatenate(expected), np.concatenate(got)


def operating_point(session: ort.InferenceSession, val: Validation) -> dict:
    """Threshold for the target FA/h on the val negative stream, and the val metrics there, from this model."""
    from kd_tune.metrics import wakeword_metrics

    stream = stream_probabilities(session, val.stream, window_samples=val.clips.shape[1], hop_samples=val.hop_samples)
    m = wakeword_metrics(run(session, val.clips), val.labels, stream, hop_seconds=val.hop_samples / val.sample_rate,
                         target_fa_per_hour=val.target_fa_per_hour, refractory_seconds=val.refractory_seconds)
    metrics = {"accuracy": m["accuracy"], "auc": m["auc"], "eer": m["eer"], "frr": m["frr_at_target_fa"],
               "fa_per_hour": m["fa_per_hour"], "stream_hours": m["stream_hours"]}
    validation = {k: finite_or_none(v) for k, v in metrics.items()} | {"clips": len(val.labels)}
    return {"threshold": m["threshold"], "validation": validation}


def latency_ms(model: bytes, window: np.ndarray) -> float:
    """Median wall time (ms) of one window [window_samples] on one onnxruntime thread, over LATENCY_RUNS runs."""
    session = open_session(model, threads=1)
    feed = {INPUT_NAME: np.ascontiguousarray(window[None], dtype=np.float32)}  # [1, window_samples]
    for _ in range(LATENCY_WARMUP_RUNS):
        session.run([OUTPUT_NAME], feed)
    seconds = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        session.run([OUTPUT_NAME], feed)
        seconds.append(time.perf_counter() - start)
    return 1000 * float(np.median(seconds))


def measure(model: bytes, val: Validation, *, strict_parity: bool) -> dict:
    """The figures of one exported file: parity (enforced when strict), threshold, val metrics and latency."""
    session = open_session(model)
    expected, got = parity_pairs(session, val)
    parity = check_parity(expected, got) if strict_parity else max_abs_diff(expected, got)
    return {"onnx_sha256": sha256(model), "onnx_bytes": len(model), "parity_max_abs_diff": finite_or_none(parity),
            "parity_clips": len(val.reference), **operating_point(session, val),
            "latency_ms": latency_ms(model, val.clips[0])}


def export_student(checkpoint: Checkpoint, out: str | Path, *, data: WakewordData | str | Path | None = None,
                   int8: bool = False, source: str | dict = "") -> dict:
    """Write the student of a verified checkpoint to `out` (ONNX) and its model card to out.json; return the card.

    data: the set whose val split calibrates the threshold (default: the checkpoint's data.root). int8 also writes
    <stem>.int8.onnx and <stem>.int8.json, with its own re-calibrated threshold. Raises ParityError when
    onnxruntime and PyTorch disagree by more than PARITY_TOLERANCE; nothing is written then.
    """
    from kd_tune import storage
    from kd_tune.features import N_SAMPLES
    from kd_tune.models import count_parameters

    out = Path(out)
    config, student, log_mel = load_student(checkpoint)
    val = validation_set(config, student, log_mel, data)
    model = to_onnx(probability_model(student, log_mel), window_samples=N_SAMPLES)
    figures = measure(model, val, strict_parity=True)
    card = {"format": FORMAT, "kd_tune_version": __version__, "onnx_file": out.name, **figures,
            "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", N_SAMPLES]},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch"]},
            "sample_rate": val.sample_rate, "window_samples": N_SAMPLES, "hop_samples": val.hop_samples,
            "target_fa_per_hour": val.target_fa_per_hour, "refractory_seconds": val.refractory_seconds,
            "wakeword": config.data.wakeword, "labels": [NEGATIVE_LABEL, config.data.wakeword],
            "student": {"name": config.student.name, "width": config.student.width,
                        "parameters": count_parameters(student)},
            "source": source, "checkpoint_manifest_sha256": manifest_sha256(checkpoint.manifest),
            "calibration_data": val.data}
    store = storage.Storage.from_uri(out.parent)
    store.write_bytes(out.name, model)
    if int8:
        card["int8"] = write_int8(store, out, model, card, val)
    storage.write_json(store, card_name(out), card)  # last: it names the files written before it
    return card


def write_int8(store: Storage, out: Path, model: bytes, card: dict, val: Validation) -> dict:
    """Quantize, measure and write <stem>.int8.onnx with its own card; returns its figures and deltas vs float."""
    from kd_tune import storage

    path = out.with_name(f"{out.stem}.int8.onnx")
    quantized = quantize_int8(model, val.clips)
    figures = {"onnx_file": path.name, **measure(quantized, val, strict_parity=False)}
    float_metrics, int8_metrics = card["validation"], figures["validation"]
    deltas = {k: difference(int8_metrics[k], float_metrics[k]) for k in ("accuracy", "frr", "fa_per_hour")}
    quantization = {"method": "static QDQ, calibrated on the val clips", "weights": "QInt8 per channel",
                    "activations": "QUInt8", "scope": "the student; front end and probability head in float32",
                    "float_model": out.name, "delta_vs_float": deltas}
    store.write_bytes(path.name, quantized)
    storage.write_json(store, card_name(path), {**card, **figures, "quantization": quantization})
    return {**figures, "delta_vs_float": deltas}


def card_name(model_path: Path) -> str:
    """model.onnx -> model.json; model.int8.onnx -> model.int8.json."""
    return model_path.with_suffix(".json").name


def manifest_sha256(manifest: dict) -> str:
    """SHA-256 of manifest.json as kd_tune writes it (sorted keys, indent 2, trailing newline)."""
    return sha256(json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False).encode() + b"\n")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a metric that is undefined (e.g. AUC without positives) is stored as null."""
    return float(value) if value is not None and math.isfinite(value) else None


def difference(new: float | None, old: float | None) -> float | None:
    return None if new is None or old is None else new - old


def summary(card: dict) -> str:
    """A few lines for the terminal: size, parameters, parity, threshold, metrics and latency (and int8's)."""
    v, s = card["validation"], card["student"]
    lines = [f"{card['onnx_file']}: {card['onnx_bytes'] / 1024:.1f} KB, {s['name']} width {s['width']} "
             f"({s['parameters']:,} parameters)",
             f"parity with PyTorch: max |diff| {card['parity_max_abs_diff']:.2g} over {card['parity_clips']} clips "
             f"(batches of {', '.join(map(str, CHECK_BATCHES))} and up to {RUN_BATCH})",
             f"threshold {card['threshold']:.4f} for {card['target_fa_per_hour']:g} FA/h: validation FRR "
             f"{_number(v['frr'])}, {_number(v['fa_per_hour'])} FA/h, accuracy {_number(v['accuracy'])}",
             f"latency {card['latency_ms']:.2f} ms per {card['window_samples'] / card['sample_rate']:g} s window "
             f"(1 onnxruntime thread, median of {LATENCY_RUNS})"]
    if "int8" in card:
        q, d = card["int8"], card["int8"]["delta_vs_float"]
        lines.append(f"{q['onnx_file']}: {q['onnx_bytes'] / 1024:.1f} KB, latency {q['latency_ms']:.2f} ms, parity "
                     f"{_number(q['parity_max_abs_diff'])}, threshold {q['threshold']:.4f}; vs float: accuracy "
                     f"{_signed(d['accuracy'])}, FRR {_signed(d['frr'])}, FA/h {_signed(d['fa_per_hour'])}")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3g}"


# ---------------------------------------------------------------- run time: onnxruntime, numpy, soundfile only


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
    import soundfile as sf

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
        # whole windows, rounded so that e.g. 2.1 / 0.3 = 7.000000000000001 does not become 8 (as in kd_tune.metrics)
        refractory_windows = math.ceil(round(self.refractory_seconds / hop_seconds, 9))
        fired = activation_indices(self.probabilities(audio), threshold=self.threshold,
                                   refractory_windows=refractory_windows)
        return [(i * self.hop_samples + self.window_samples / 2) / self.sample_rate for i in fired]
