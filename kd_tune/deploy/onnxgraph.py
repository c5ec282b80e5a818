"""An exported model's front-end constants computed by ONNX operators, so the file holds little more than its weights.

The legacy exporter stores each tensor the front end uses as a constant: the Hann-windowed DFT basis (~640 KB of a
~1 MB file), the mel filterbank (32 KB), PCEN's smoother matrix (40 KB) and the streaming form's frame index (44 KB).
`compute_front_end` finds them by value (Constant nodes or initializers equal, exactly, to what kd_tune.audio.features
builds) and puts in the place of each a small subgraph that builds it from a few numbers. onnxruntime folds such a
subgraph into a constant when it loads a session, so a window costs what it did. Each subgraph is run once in
onnxruntime before it is used, and used only when it reproduces its constant: exactly, the DFT basis within
BASIS_TOLERANCE (it is built in float64 from angles reduced modulo n_fft, then rounded to float32, as dft_basis is).
`short_names` shortens a graph's tensor names: a quantizer's long ones are a third of an int8 file.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchaudio.functional as AF
from onnx import TensorProto, helper, numpy_helper

from kd_tune.audio.features import N_SAMPLES, SAMPLE_RATE, LogMel, pcen_smoother

MIN_ELEMENTS = 1024  # smaller constants are left as they are: a subgraph would not be smaller
BASIS_TOLERANCE = 1e-6  # max |computed - stored| DFT basis entry (|entries| <= 1; float32 rounding is ~6e-8)
MIN_OPSET = 13  # Unsqueeze and Slice take their axes as inputs from here on
HTK, SLANEY = "htk", "slaney"


class Subgraph:
    """Nodes that compute one constant, each output named under `prefix`; `finish` names the last one `target`."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, *inputs: str, **attributes) -> str:
        name = f"{self.prefix}/{op_type}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attributes))
        return name

    def const(self, value, dtype=None) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.asarray(value, dtype)))

    def ints(self, *values: int) -> str:
        return self.const(values, np.int64)

    def scalar(self, value: float | np.floating, dtype=np.float64) -> str:
        return self.const(value, dtype)

    def arange(self, stop: int) -> str:
        """[stop] int64 0, 1, ..., stop - 1."""
        return self.op("Range", self.const(0, np.int64), self.const(stop, np.int64), self.const(1, np.int64))

    def unsqueeze(self, x: str, axis: int) -> str:
        return self.op("Unsqueeze", x, self.ints(axis))

    def slice(self, x: str, start: int, end: int, axis: int = 0) -> str:
        return self.op("Slice", x, self.ints(start), self.ints(end), self.ints(axis))

    def finish(self, target: str) -> list[onnx.NodeProto]:
        self.nodes[-1].output[0] = target
        return self.nodes


# ---------------------------------------------------------------- the recipes: each builds one constant


def dft_basis_nodes(g: Subgraph, n_fft: int, *, transposed: bool) -> None:
    """features.dft_basis(n_fft) [2F, 1, n_fft] (or its flatten(1).T [n_fft, 2F]), in float64, then float32."""
    n, k = g.arange(n_fft), g.arange(n_fft // 2 + 1)
    # k * n modulo n_fft in int64: the angle stays in [0, 2 pi), where cos and sin are accurate to rounding
    turns = g.op("Mod", g.op("Mul", g.unsqueeze(k, 1), g.unsqueeze(n, 0)), g.const(n_fft, np.int64))  # [F, n_fft]
    angle = g.op("Div", g.op("Mul", g.op("Cast", turns, to=TensorProto.DOUBLE), g.scalar(2 * math.pi)),
                 g.scalar(n_fft))
    # the periodic Hann window, as torch.hann_window builds it: 0.5 - 0.5 * cos(2 pi n / n_fft)
    phase = g.op("Mul", g.op("Cast", n, to=TensorProto.DOUBLE), g.scalar(math.pi * 2 / n_fft))
    window = g.op("Add", g.op("Mul", g.op("Cos", phase), g.scalar(-0.5)), g.scalar(0.5))  # [n_fft]
    rows = g.op("Concat", g.op("Cos", angle), g.op("Neg", g.op("Sin", angle)), axis=0)  # [2F, n_fft]
    basis = g.op("Cast", g.op("Mul", rows, window), to=TensorProto.FLOAT)
    g.op("Transpose", basis, perm=[1, 0]) if transposed else g.unsqueeze(basis, 1)


def smoother_nodes(g: Subgraph, kernel: np.ndarray, n_frames: int) -> None:
    """features.pcen_smoother(kernel, n_frames) [T, T] from the kernel's K float32 weights."""
    weights = kernel[::-1].copy()  # weights[j]: the weight of the frame j frames back
    taps, w = len(weights), g.const(weights, np.float32)
    t = g.arange(n_frames)
    lag = g.op("Sub", g.unsqueeze(t, 0), g.unsqueeze(t, 1))  # [s, t]: t - s
    inside = g.op("And", g.op("GreaterOrEqual", lag, g.const(0, np.int64)), g.op("Less", lag, g.const(taps, np.int64)))
    tap = g.op("Gather", w, g.op("Max", g.op("Min", lag, g.const(taps - 1, np.int64)), g.const(0, np.int64)))
    toeplitz = g.op("Where", inside, tap, g.const(0.0, np.float32))  # [T, T]
    # row 0 stands for the frames before the window: back[t], every weight t or more frames back (summed in float64)
    back = g.op("CumSum", g.op("Cast", w, to=TensorProto.DOUBLE), g.const(0, np.int64), reverse=1)  # [K]
    first = g.op("Gather", back, g.op("Min", t, g.const(taps - 1, np.int64)))
    first = g.op("Where", g.op("Less", t, g.const(taps, np.int64)), first, g.const(0.0, np.float64))
    first = g.unsqueeze(g.op("Cast", first, to=TensorProto.FLOAT), 0)  # [1, T]
    g.op("Concat", first, g.slice(toeplitz, 1, n_frames), axis=0)


def frame_index_nodes(g: Subgraph, frames: list[int], *, hop: int, n_fft: int, n_samples: int) -> None:
    """LogMel.frame_index(n_samples, frames) [F, n_fft]: the frames' sample positions, reflected at both edges."""
    start = g.op("Sub", g.op("Mul", g.unsqueeze(g.ints(*frames), 1), g.const(hop, np.int64)),
                 g.const(n_fft // 2, np.int64))
    position = g.op("Abs", g.op("Add", start, g.unsqueeze(g.arange(n_fft), 0)))  # reflected at 0
    past = g.op("GreaterOrEqual", position, g.const(n_samples, np.int64))
    g.op("Where", past, g.op("Sub", g.const(2 * (n_samples - 1), np.int64), position), position)


def mel_points(n_mels: int, mel_scale: str) -> torch.Tensor:
    """The n_mels + 2 band edges (Hz, float32) of torchaudio's melscale_fbanks from 0 Hz to Nyquist: its steps."""
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0

    def to_mel(hz: float) -> float:
        if mel_scale == HTK:
            return 2595.0 * math.log10(1.0 + hz / 700.0)
        return hz / f_sp if hz < min_log_hz else min_log_hz / f_sp + math.log(hz / min_log_hz) / logstep

    mels = torch.linspace(to_mel(0.0), to_mel(SAMPLE_RATE / 2), n_mels + 2)
    if mel_scale == HTK:
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    hz = f_sp * mels
    log_part = mels >= min_log_hz / f_sp
    hz[log_part] = min_log_hz * torch.exp(logstep * (mels[log_part] - min_log_hz / f_sp))
    return hz


def mel_nodes(g: Subgraph, n_freqs: int, points: np.ndarray, *, slaney_norm: bool) -> None:
    """LogMel.mel_fbank [M, n_freqs]: torchaudio's triangles over the band edges `points`, op for op in float32."""
    f = g.const(points, np.float32)  # [M + 2]
    m = len(points) - 2
    hz = torch.linspace(0, SAMPLE_RATE // 2, n_freqs).numpy()  # the FFT bins' frequencies, as torchaudio's
    step = np.float32((SAMPLE_RATE // 2) / (n_freqs - 1))
    if np.array_equal(np.arange(n_freqs, dtype=np.float32) * step, hz):  # whole steps (40 Hz at n_fft 400)
        freqs = g.op("Mul", g.op("Cast", g.arange(n_freqs), to=TensorProto.FLOAT), g.scalar(step, np.float32))
    else:
        freqs = g.const(hz, np.float32)
    diff = g.op("Sub", g.slice(f, 1, m + 2), g.slice(f, 0, m + 1))  # [M + 1]
    slopes = g.op("Sub", g.unsqueeze(f, 0), g.unsqueeze(freqs, 1))  # [n_freqs, M + 2]
    down = g.op("Div", g.op("Mul", g.slice(slopes, 0, m, axis=1), g.scalar(-1.0, np.float32)), g.slice(diff, 0, m))
    up = g.op("Div", g.slice(slopes, 2, m + 2, axis=1), g.slice(diff, 1, m + 1))
    fbank = g.op("Max", g.op("Min", down, up), g.scalar(0.0, np.float32))  # [n_freqs, M]
    if slaney_norm:
        fbank = g.op("Mul", fbank, g.op("Div", g.scalar(2.0, np.float32), g.op("Sub", g.slice(f, 2, m + 2),
                                                                              g.slice(f, 0, m))))
    g.op("Transpose", fbank, perm=[1, 0])


# ---------------------------------------------------------------- finding the constants


class FrontEndConstants:
    """What `log_mel`'s constants are, and which recipe rebuilds an array found to equal one of them."""

    def __init__(self, log_mel: LogMel, n_samples: int):
        self.n_fft, self.hop, self.n_samples = log_mel.n_fft, log_mel.hop_length, n_samples
        self.basis = log_mel.dft_basis.float().numpy()  # [2F, 1, n_fft]
        self.basis_t = np.ascontiguousarray(self.basis[:, 0, :].T)  # [n_fft, 2F], as the streaming form uses it
        self.mel = log_mel.mel_fbank.float().numpy()  # [M, F]
        self.kernel = log_mel.pcen_kernel.flatten().float().numpy()  # [K]
        all_frames = list(range(n_samples // self.hop + 1))
        rows = log_mel.frame_index(n_samples, all_frames).numpy()
        self.frame_of_row = {row.tobytes(): f for f, row in zip(all_frames, rows, strict=True)}
        self.mel_scale = next((scale for scale in (HTK, SLANEY) if self.mel_fits(scale)), None)

    def mel_fits(self, scale: str) -> bool:
        """Whether torchaudio's filterbank from mel_points(scale) is the stored one, to the bit."""
        fbank = AF.melscale_fbanks(self.n_fft // 2 + 1, 0.0, SAMPLE_RATE / 2, len(self.mel), SAMPLE_RATE,
                                   norm=SLANEY if scale == SLANEY else None, mel_scale=scale)
        return np.array_equal(fbank.T.numpy(), self.mel)

    def recipe(self, value: np.ndarray):
        """(kind, function adding the nodes to a Subgraph, tolerance) for a known constant; None otherwise."""
        if value.dtype == np.float32:
            # within BASIS_TOLERANCE, not exactly: a basis that onnxruntime folded from this subgraph is found too
            if reproduces(value, self.basis, BASIS_TOLERANCE):
                return "dft_basis", lambda g: dft_basis_nodes(g, self.n_fft, transposed=False), BASIS_TOLERANCE
            if reproduces(value, self.basis_t, BASIS_TOLERANCE):
                return "dft_basis", lambda g: dft_basis_nodes(g, self.n_fft, transposed=True), BASIS_TOLERANCE
            if value.shape == self.mel.shape and np.array_equal(value, self.mel) and self.mel_scale is not None:
                points = mel_points(len(self.mel), self.mel_scale).numpy()
                return "mel_fbank", lambda g: mel_nodes(g, self.mel.shape[1], points,
                                                        slaney_norm=self.mel_scale == SLANEY), 0.0
            if value.ndim == 2 and value.shape[0] == value.shape[1] and np.array_equal(
                    value, pcen_smoother(torch.from_numpy(self.kernel), value.shape[0]).numpy()):
                return "pcen_smoother", lambda g: smoother_nodes(g, self.kernel, value.shape[0]), 0.0
        if value.dtype == np.int64 and value.ndim == 2 and value.shape[1] == self.n_fft:
            frames = [f for row in value if (f := self.frame_of_row.get(row.tobytes())) is not None]
            if len(frames) == len(value):
                return "frame_index", lambda g: frame_index_nodes(g, frames, hop=self.hop, n_fft=self.n_fft,
                                                                  n_samples=self.n_samples), 0
        return None


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def computed(nodes: list[onnx.NodeProto], target: str, value: np.ndarray, opset: int) -> np.ndarray:
    """What the nodes compute for `target`, run alone in onnxruntime."""
    dtype = helper.np_dtype_to_tensor_dtype(value.dtype)
    graph = helper.make_graph(nodes, "constant", [], [helper.make_tensor_value_info(target, dtype, value.shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]


def reproduces(got: np.ndarray, value: np.ndarray, tolerance: float) -> bool:
    if got.shape != value.shape or got.dtype != value.dtype:
        return False
    return np.array_equal(got, value) if tolerance == 0 else float(np.max(np.abs(got - value))) <= tolerance


def compute_front_end(model: bytes, log_mel: LogMel, *, n_samples: int = N_SAMPLES) -> tuple[bytes, list[str]]:
    """The model with each front-end constant (a Constant node or an initializer, of windows of n_samples) built by
    operators instead; returns it and the kinds replaced, in graph order. A constant whose subgraph does not
    reproduce it stays."""
    proto = onnx.load_from_string(model)
    opset = default_opset(proto)
    if opset < MIN_OPSET:
        return model, []
    known, graph, done = FrontEndConstants(log_mel, n_samples), proto.graph, []
    taken = {name for node in graph.node for name in (*node.input, *node.output)} | {i.name for i in graph.initializer}

    def replacement(name: str, value: np.ndarray) -> list[onnx.NodeProto] | None:
        found = known.recipe(value) if value.size >= MIN_ELEMENTS else None
        if found is None:
            return None
        kind, build, tolerance = found
        prefix = next(p for p in itertools.chain([kind], (f"{kind}_{i}" for i in itertools.count(1)))
                      if not any(t.startswith(f"{p}/") for t in taken))
        taken.add(f"{prefix}/")
        g = Subgraph(prefix)
        build(g)
        nodes = g.finish(name)
        if not reproduces(computed(nodes, name, value, opset), value, tolerance):
            return None
        done.append(kind)
        return nodes

    nodes = []
    for node in graph.node:
        value = node.attribute[0].t if node.op_type == "Constant" and len(node.attribute) == 1 else None
        new = None if value is None or node.attribute[0].name != "value" else replacement(
            node.output[0], numpy_helper.to_array(value))
        nodes.extend(new or [node])
    first, kept = [], []
    for init in graph.initializer:
        new = replacement(init.name, numpy_helper.to_array(init))
        first.extend(new or [])
        kept.extend([] if new else [init])
    if not done:
        return model, []
    replaced_inits = {init.name for init in graph.initializer} - {init.name for init in kept}
    inputs = [i for i in graph.input if i.name not in replaced_inits]  # old IRs list initializers as inputs too
    graph.ClearField("node")
    graph.node.extend(first + nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    graph.ClearField("input")
    graph.input.extend(inputs)
    return proto.SerializeToString(), done


def short_names(model: bytes) -> bytes:
    """The model with every tensor but the graph's inputs and outputs renamed to a short name, and without the
    value_info shape annotations (onnxruntime infers them again at load); node names stay, so a profile still names
    the layers. A quantizer's tensor names (`/student/.../Conv_output_0_QuantizeLinear_Output`, three to a node) are
    a third of an int8 file."""
    proto = onnx.load_from_string(model)
    graph = proto.graph
    subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                    for n in graph.node for a in n.attribute)
    if subgraphs or graph.sparse_initializer or graph.quantization_annotation:
        return model  # names read from elsewhere (an inner graph, an annotation): left as they are
    keep, renamed = {v.name for v in (*graph.input, *graph.output)}, {}
    counter = itertools.count()

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in renamed:
            renamed[name] = next(new for new in (np.base_repr(i, 36).lower() for i in counter) if new not in keep)
        return renamed[name]

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.input[:] = [short(name) for name in node.input]
        node.output[:] = [short(name) for name in node.output]
    graph.ClearField("value_info")
    return proto.SerializeToString()
