"""kd_tune.deploy.onnxgraph: the front end's constants computed by ONNX operators, with the same probabilities."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_export import holds_dft_basis, noise_and_tones

from kd_tune.audio.features import N_SAMPLES, LogMel
from kd_tune.deploy import detect, export, onnxgraph, windows
from kd_tune.deploy.streaming import StreamingDetector, streaming_onnx
from kd_tune.training.models import build_student


@pytest.mark.parametrize("normalize", ["none", "mean", "pcen"])
def test_front_end_constants_are_computed_in_the_graph_with_the_same_probabilities(normalize):
    # Rule: the exported files compute the front end's constants (DFT basis, mel filterbank, PCEN smoother, the
    # streaming form's frame index) with operators instead of storing them, and give the probabilities of the files
    # that store them within 1e-5, windowed and streaming, for every normalization.
    torch.manual_seed(0)
    student, log_mel = build_student("tc_resnet").eval(), LogMel(normalize=normalize)
    model = export.probability_model(student, log_mel)
    stored = export.to_onnx(model, window_samples=N_SAMPLES, compute_constants=False)
    computed, kinds = onnxgraph.compute_front_end(stored, log_mel)
    assert computed == export.to_onnx(model, window_samples=N_SAMPLES)
    assert sorted(kinds) == ["dft_basis", "mel_fbank", *(["pcen_smoother"] if normalize == "pcen" else [])]
    assert holds_dft_basis(stored) and not holds_dft_basis(computed)
    onnx.checker.check_model(onnx.load_from_string(computed))
    clips = noise_and_tones(16, seed=1)
    got, expected = windows.run(detect.open_session(computed), clips), windows.run(detect.open_session(stored), clips)
    assert np.abs(got - expected).max() <= 1e-5

    detector = StreamingDetector(student, log_mel, hop_samples=1600)
    stored_stream, stream = streaming_onnx(detector, opset=export.OPSET), export.streaming_model(detector)
    assert "frame_index" in onnxgraph.compute_front_end(stored_stream, log_mel)[1] and not holds_dft_basis(stream)
    audio, hops = noise_and_tones(3, seed=2).reshape(-1), dict(window_samples=N_SAMPLES, hop_samples=1600)
    got = windows.streamed_probabilities(detect.open_session(stream), audio, **hops)
    expected = windows.streamed_probabilities(detect.open_session(stored_stream), audio, **hops)
    assert len(got) == windows.window_count(len(audio), **hops) and np.abs(got - expected).max() <= 1e-5


def test_a_model_without_front_end_constants_is_left_as_it_is():
    # Rule: the rewrite touches only constants equal to the front end's: other graphs come back byte for byte.
    log_mel = LogMel()
    weights = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                                   initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    assert onnxgraph.compute_front_end(model, log_mel) == (model, [])
