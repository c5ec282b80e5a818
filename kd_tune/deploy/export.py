"""ONNX export of a trained student, front end included, with its model card.

`export_student` writes model.onnx, raw 16 kHz audio [B, 16000] -> P(wake word) [B], and model.json beside it: the
streaming settings, a threshold calibrated on the validation split for the target false accepts per hour, and the
figures that vouch for the file (parity with PyTorch, validation metrics, latency). With a signing key set the card
is signed (HMAC over every field, the ONNX file's SHA-256 among them). deploy.detect runs such a pair without torch,
and export loads what it wrote through the same checks before it reports success.
"""

from __future__ import annotations

import io
import math
import tempfile
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from kd_tune import __version__
from kd_tune.audio.features import N_SAMPLES, SAMPLE_RATE, LogMel, samples
from kd_tune.config import Config, validate
from kd_tune.datasets.data import WakewordData, load_dataset
from kd_tune.deploy.detect import FORMAT, DetectError, Detector, card_name, open_session, sha256
from kd_tune.deploy.onnxgraph import compute_front_end, short_names
from kd_tune.deploy.streaming import StreamingDetector, streaming_onnx
from kd_tune.deploy.windows import (INPUT_NAME, OUTPUT_NAME, RUN_BATCH, STATE_INPUTS, STREAM_INPUT, run,
                                    stream_probabilities, streamed_probabilities)
from kd_tune.errors import KdTuneError
from kd_tune.metrics import audio_hours, wakeword_metrics
from kd_tune.signing import signed
from kd_tune.store.checkpoint import Checkpoint, CheckpointError, load_state_dict_strict
from kd_tune.store.storage import Storage, pretty_json, write_json
from kd_tune.training.models import build_student, count_parameters
from kd_tune.training.scoring import predict
from kd_tune.training.resume import STUDENT_KIND

OPSET = 17
NEGATIVE_LABEL = "not_wakeword"
STUDENT_SCOPE = "/student/"  # ONNX node-name prefix of the student's operators (its module name in the export)
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]  # where the student's weights and arithmetic are
PARITY_TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| wake-word probability
STREAM_PARITY_TOLERANCE = 1e-5  # max |streaming form - windowed model|, both in onnxruntime, at every hop
PARITY_CLIPS = 256
CHECK_BATCHES = (1, 7)  # batch sizes besides the full one that the exported graph must run
LATENCY_RUNS = 200
LATENCY_WARMUP_RUNS = 10


class ExportError(KdTuneError, RuntimeError):
    """A file export produced fails a check of its own (exit code 1: not the user's input, but the output)."""


class ParityError(ExportError):
    """onnxruntime's probabilities differ from PyTorch's by more than the tolerance."""


# ---------------------------------------------------------------- export (needs torch)


def load_student(checkpoint: Checkpoint) -> tuple[Config, nn.Module, LogMel]:
    """The checkpoint's resolved config, its student in eval mode, and the front end it was trained with."""
    kind = checkpoint.manifest.get("kind")
    if kind != STUDENT_KIND or "model" not in checkpoint.tensors:
        raise CheckpointError(f"checkpoint of kind {kind!r} with files {sorted(checkpoint.tensors)} is not a "
                              "student checkpoint (allowed: kind 'student' with model.safetensors)")
    config = validate(checkpoint.manifest["config"], source="the checkpoint's manifest config")
    f = config.features
    student = build_student(config.student.name, width=config.student.width, n_mels=f.n_mels)
    load_state_dict_strict(student, checkpoint.tensors["model"])
    return config, student.eval(), LogMel.from_config(f)


def probability_model(student: nn.Module, log_mel: LogMel) -> nn.Module:
    """audio [B, N] -> softmax(student(log_mel(audio)))[:, 1] [B], as one module to export."""
    # Column 1 is picked by a fixed one-hot linear map (exact: 0 * p0 + 1 * p1 = p1), so the wrapper is a plain
    # Sequential of standard modules that the exporter maps one to one.
    pick = nn.Linear(2, 1, bias=False).requires_grad_(False)
    pick.weight.copy_(torch.tensor([[0.0, 1.0]]))
    return nn.Sequential(OrderedDict(front_end=log_mel, student=student, softmax=nn.Softmax(dim=-1),
                                     pick_wakeword=pick, flatten=nn.Flatten(0))).eval()


def to_onnx(model: nn.Module, *, window_samples: int, compute_constants: bool = True) -> bytes:
    """The legacy TorchScript exporter (exact and fast): a dynamic batch axis, the window length fixed. With
    compute_constants (the default) the constants of the model's front end (its LogMel) are computed by operators
    (kd_tune.deploy.onnxgraph) instead of stored: stored, they are ~70% of the file."""
    buffer = io.BytesIO()
    # Its deprecation notice and constant-folding notes are expected; the parity check is what vouches for the file.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # torch types f as a path, but the legacy exporter (dynamo=False) writes to a file object as well
        torch.onnx.export(model, (torch.zeros(2, window_samples),), buffer,  # type: ignore[arg-type]
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=OPSET, dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    front_end = next((m for m in model.modules() if isinstance(m, LogMel)), None)
    if front_end is None or not compute_constants:
        return buffer.getvalue()
    return compute_front_end(buffer.getvalue(), front_end)[0]


def streaming_model(detector: StreamingDetector) -> bytes:
    """The streaming form as ONNX, its front end's constants computed by operators like the windowed model's."""
    return compute_front_end(streaming_onnx(detector, opset=OPSET), detector.log_mel)[0]


def quantize_int8(model: bytes, calibration: np.ndarray, log_mel: LogMel) -> bytes:
    """Static int8 quantization of the student's QUANTIZED_OPS (QDQ: per-channel QInt8 weights, QUInt8 activations).

    Activation ranges are calibrated on `calibration` windows [N, window_samples]. Dynamic quantization was tried
    first: it runs, but onnxruntime's ConvInteger path made a ds_cnn window 6-10x slower than float32. Only nodes
    under STUDENT_SCOPE are quantized: in 8 bits the front end's DFT and mel matrices would squeeze the power
    spectrum's ~100 dB range into ~48 dB, and the probability head is an exact one-hot pick. The pre-processing
    folds the front end's computed constants back in, so they are computed by operators again after quantization,
    and the quantizer's long tensor names are shortened (kd_tune.deploy.onnxgraph.short_names).
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
        return short_names(compute_front_end(quantized.read_bytes(), log_mel)[0])


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
    stream: np.ndarray  # [T] float32, the long negative recordings (see kd_tune.datasets.data.negative_stream)
    reference: np.ndarray  # [min(N, PARITY_CLIPS)] PyTorch's probabilities of the first clips
    sample_rate: int
    hop_samples: int
    target_fa_per_hour: float
    refractory_seconds: float
    data: dict  # root and manifest sha256 of the data set


def validation_set(config: Config, student: nn.Module, log_mel: LogMel,
                   data: WakewordData | str | Path | None) -> Validation:
    """The val split of `data` (a loaded set or its directory; None: the checkpoint's data.root)."""
    if not isinstance(data, WakewordData):
        data = load_dataset(config.data.root if data is None else data)
    val, stream = data.val, data.val_stream
    if stream.numel() == 0:
        raise ValueError(f"the validation split of {data.root} has no negative clips: the threshold for "
                         f"{config.training.target_fa_per_hour} FA/h is calibrated on them (allowed: a data set "
                         "whose val split holds negatives)")
    clips = val.audio.float()  # [N, N_SAMPLES]
    reference = predict(student, clips[:PARITY_CLIPS], log_mel).numpy()  # [min(N, PARITY_CLIPS)]
    t = config.training
    return Validation(clips.numpy(), val.labels.numpy(), stream.float().numpy(), reference, SAMPLE_RATE,
                      samples(t.eval_hop_ms), t.target_fa_per_hour, t.refractory_seconds,
                      {"root": str(data.root), "manifest_sha256": data.labelled_sha256})


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


def operating_point(session: ort.InferenceSession, val: Validation, stream: np.ndarray | None = None) -> dict:
    """Threshold for the target FA/h on the val negative stream, and the val metrics there, from this model; stream:
    its probabilities on the val stream, when already scored."""
    if stream is None:
        stream = stream_probabilities(session, val.stream, window_samples=val.clips.shape[1],
                                      hop_samples=val.hop_samples)
    m = wakeword_metrics(run(session, val.clips), val.labels, stream, hop_seconds=val.hop_samples / val.sample_rate,
                         target_fa_per_hour=val.target_fa_per_hour, refractory_seconds=val.refractory_seconds,
                         hours=audio_hours(len(val.stream), val.sample_rate))
    metrics = {"accuracy": m["accuracy"], "auc": m["auc"], "eer": m["eer"], "frr": m["frr_at_target_fa"],
               "fa_per_hour": m["fa_per_hour"], "stream_hours": m["stream_hours"]}
    validation = {k: finite_or_none(v) for k, v in metrics.items()} | {"clips": len(val.labels)}
    return {"threshold": m["threshold"], "validation": validation}


def latency_ms(model: bytes, window: np.ndarray) -> float:
    """Median wall time (ms) of one window [window_samples] on one onnxruntime thread, over LATENCY_RUNS runs."""
    session = open_session(model, threads=1)
    feed = {INPUT_NAME: np.ascontiguousarray(window[None], dtype=np.float32)}  # [1, window_samples]
    return median_ms(lambda: session.run([OUTPUT_NAME], feed))


def median_ms(call) -> float:
    """Median wall time (ms) of call() over LATENCY_RUNS runs, after LATENCY_WARMUP_RUNS."""
    for _ in range(LATENCY_WARMUP_RUNS):
        call()
    seconds = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return 1000 * float(np.median(seconds))


def measure(model: bytes, val: Validation, *, strict_parity: bool, stream: np.ndarray | None = None) -> dict:
    """The figures of one exported file: parity (enforced when strict), threshold, val metrics and latency; stream:
    its probabilities on the val stream, when already scored."""
    session = open_session(model)
    expected, got = parity_pairs(session, val)
    parity = check_parity(expected, got) if strict_parity else max_abs_diff(expected, got)
    return {"onnx_sha256": sha256(model), "onnx_bytes": len(model), "parity_max_abs_diff": finite_or_none(parity),
            "parity_clips": len(val.reference), **operating_point(session, val, stream),
            "latency_ms": latency_ms(model, val.clips[0])}


def export_student(checkpoint: Checkpoint, out: str | Path, *, data: WakewordData | str | Path | None = None,
                   int8: bool = False, streaming: bool = False, source: str | dict = "") -> dict:
    """Write the student of a verified checkpoint to `out` (ONNX) and its model card to out.json; return the card.

    data: the set whose val split calibrates the threshold (default: the checkpoint's data.root). int8 also writes
    <stem>.int8.onnx and <stem>.int8.json, with its own re-calibrated threshold. streaming also writes
    <stem>.stream.onnx, named in the card. Raises ParityError when onnxruntime and PyTorch disagree by more than
    PARITY_TOLERANCE, or the streaming form and the windowed model by more than STREAM_PARITY_TOLERANCE; nothing is
    written then.
    """
    out = Path(out)
    config, student, log_mel = load_student(checkpoint)
    hop_samples = samples(config.training.eval_hop_ms)
    streamer = StreamingDetector(student, log_mel, hop_samples=hop_samples) if streaming else None  # checks the hop
    val = validation_set(config, student, log_mel, data)
    model = to_onnx(probability_model(student, log_mel), window_samples=N_SAMPLES)
    # Scored once: the threshold is calibrated on it, and the streaming form must reproduce it.
    stream = stream_probabilities(open_session(model), val.stream, window_samples=N_SAMPLES,
                                  hop_samples=val.hop_samples)  # [W]
    figures = measure(model, val, strict_parity=True, stream=stream)
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
    stream_model = None
    if streamer is not None:
        stream_model = streaming_model(streamer)
        card["streaming"] = measure_streaming(stream_model, stream, val, name=f"{out.stem}.stream.onnx")
    store = Storage.from_uri(out.parent)
    if stream_model is not None:
        store.write_bytes(card["streaming"]["onnx_file"], stream_model)
    store.write_bytes(out.name, model)
    if int8:
        card["int8"] = write_int8(store, out, model, card, val, log_mel)
    card = signed(card)
    write_json(store, card_name(out), card)  # last: it names the files written before it
    check_written(out)
    return card


def measure_streaming(stream_model: bytes, expected: np.ndarray, val: Validation, *, name: str) -> dict:
    """The streaming form's card entry, once its probabilities over the whole val stream, hop by hop, equal the
    windowed model's (`expected` [W]) within STREAM_PARITY_TOLERANCE (ParityError otherwise)."""
    got = streamed_probabilities(open_session(stream_model), val.stream, window_samples=val.clips.shape[1],
                                 hop_samples=val.hop_samples)
    parity = check_parity(expected, got, tolerance=STREAM_PARITY_TOLERANCE)
    return {"onnx_file": name, "onnx_sha256": sha256(stream_model), "onnx_bytes": len(stream_model),
            "hop_samples": val.hop_samples, "parity_max_abs_diff": parity, "parity_windows": len(expected),
            "latency_ms_per_hop": hop_latency_ms(stream_model, val.stream[:val.hop_samples])}


def hop_latency_ms(stream_model: bytes, hop: np.ndarray) -> float:
    """Median wall time (ms) of one hop [hop_samples] through the streaming form, one onnxruntime thread."""
    session = open_session(stream_model, threads=1)
    state = [np.zeros([1, *i.shape[1:]], np.float32) for i in session.get_inputs()[1:]]
    feed = {STREAM_INPUT: np.ascontiguousarray(hop[None], dtype=np.float32),
            **dict(zip(STATE_INPUTS, state, strict=True))}
    return median_ms(lambda: session.run(None, feed))


def write_int8(store: Storage, out: Path, model: bytes, card: dict, val: Validation, log_mel: LogMel) -> dict:
    """Quantize, measure and write <stem>.int8.onnx with its own card; returns its figures and deltas vs float."""
    path = out.with_name(f"{out.stem}.int8.onnx")
    quantized = quantize_int8(model, val.clips, log_mel)
    figures = {"onnx_file": path.name, **measure(quantized, val, strict_parity=False)}
    float_metrics, int8_metrics = card["validation"], figures["validation"]
    deltas = {k: difference(int8_metrics[k], float_metrics[k]) for k in ("accuracy", "frr", "fa_per_hour")}
    quantization = {"method": "static QDQ, calibrated on the val clips", "weights": "QInt8 per channel",
                    "activations": "QUInt8", "scope": "the student; front end and probability head in float32",
                    "float_model": out.name, "delta_vs_float": deltas}
    store.write_bytes(path.name, quantized)
    float_only = {k: v for k, v in card.items() if k != "streaming"}  # the streaming form is the float model's
    write_json(store, card_name(path), signed({**float_only, **figures, "quantization": quantization}))
    check_written(path)
    return {**figures, "delta_vs_float": deltas}


def check_written(model_path: Path) -> None:
    """Load an exported pair the way `kd-tune detect` will: card size, signature and schema, the model's hash."""
    try:
        Detector(model_path, threads=1)
    except DetectError as error:
        raise ExportError(f"{error}; export wrote a pair that detection refuses") from None


def manifest_sha256(manifest: dict) -> str:
    """SHA-256 of manifest.json's bytes as the checkpoint writer wrote them (storage.pretty_json)."""
    return sha256(pretty_json(manifest))


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
    if "streaming" in card:
        st = card["streaming"]
        lines.append(f"{st['onnx_file']}: {st['onnx_bytes'] / 1024:.1f} KB, {st['latency_ms_per_hop']:.2f} ms per "
                     f"{st['hop_samples'] / card['sample_rate'] * 1000:g} ms hop; max |diff| from the windowed model "
                     f"{st['parity_max_abs_diff']:.2g} over {st['parity_windows']:,} windows of the val stream")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3g}"


# ---------------------------------------------------------------- run time: onnxruntime, numpy, soundfile only

