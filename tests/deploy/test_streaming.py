"""The streaming form of a detector: the windowed model's probabilities, hop by hop, for a fraction of the work."""

import numpy as np
import pytest
import torch

from kd_tune.audio.features import N_SAMPLES, NORMALIZATIONS, SAMPLE_RATE, LogMel
from kd_tune.deploy.detect import open_session
from kd_tune.deploy.export import OPSET, probability_model, to_onnx
from kd_tune.deploy.streaming import StreamingDetector, StreamingError, streaming_onnx
from kd_tune.deploy.windows import stream_probabilities, streamed_probabilities, worth_streaming
from kd_tune.training.models import STUDENTS, build_student

HOP = N_SAMPLES // 10  # 100 ms, the default training.eval_hop_ms


def student_with_varied_output(name: str = "tc_resnet") -> torch.nn.Module:
    """A random student whose probabilities spread over (0, 1), so a parity check has something to compare."""
    torch.manual_seed(0)
    student = build_student(name).eval()
    with torch.no_grad():
        for module in student.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(20)
    return student


def speech_like(seconds: float, *, seed: int = 0) -> np.ndarray:
    """Noise whose level moves by ~60 dB every fraction of a second: every window, and every frame, differs."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    level = np.repeat(10 ** rng.uniform(-3, 0, n // 1200 + 1), 1200)[:n]
    return (rng.standard_normal(n) * level * 0.3).astype(np.float32)


def both_forms(student, log_mel, hop=HOP):
    windowed = open_session(to_onnx(probability_model(student, log_mel), window_samples=N_SAMPLES))
    streaming = open_session(streaming_onnx(StreamingDetector(student, log_mel, hop_samples=hop), opset=OPSET))
    return windowed, streaming


@pytest.mark.slow
def test_the_streaming_form_equals_the_windowed_model_at_every_hop_over_an_hour():
    # Rule: over an hour of audio the streaming form's probability at every hop equals the windowed model's within
    # 1e-5 (the bound export enforces, there over the whole validation stream), with the default front end (PCEN).
    student, log_mel = student_with_varied_output(), LogMel(normalize="pcen").eval()
    windowed, streaming = both_forms(student, log_mel)
    audio = speech_like(3600)
    expected = stream_probabilities(windowed, audio, window_samples=N_SAMPLES, hop_samples=HOP)
    got = streamed_probabilities(streaming, audio, window_samples=N_SAMPLES, hop_samples=HOP)
    assert got.shape == expected.shape == (3600 * 10 - 9,)
    assert expected.std() > 0.02, "the probabilities hardly move: the comparison would prove nothing"
    assert np.abs(got - expected).max() <= 1e-5


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_every_student_and_normalization_streams_with_parity(name, normalize):
    # Rule: every registered student, with every normalization, has a streaming form equal to its windowed model,
    # on audio whose length is no whole number of hops (the tail is zero-padded as the windowed model pads it).
    student, log_mel = student_with_varied_output(name), LogMel(normalize=normalize).eval()
    windowed, streaming = both_forms(student, log_mel)
    audio = speech_like(30.37, seed=1)
    expected = stream_probabilities(windowed, audio, window_samples=N_SAMPLES, hop_samples=HOP)
    got = streamed_probabilities(streaming, audio, window_samples=N_SAMPLES, hop_samples=HOP)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seconds", [0.3, 1.0, 1.05, 12.0])
def test_short_audio_and_any_split_into_runs_give_the_same_windows(seconds, monkeypatch):
    # Rule: a recording shorter than a window, exactly one, or split into many runs fed side by side, gives the
    # windowed model's windows: each run starts from the silent state a window ahead of its first kept window.
    from kd_tune.deploy import windows

    student, log_mel = student_with_varied_output(), LogMel(normalize="pcen").eval()
    windowed, streaming = both_forms(student, log_mel)
    audio = speech_like(seconds, seed=2)
    expected = stream_probabilities(windowed, audio, window_samples=N_SAMPLES, hop_samples=HOP)
    for runs, min_hops in ((64, 100), (7, 3), (1000, 1)):
        monkeypatch.setattr(windows, "STREAM_RUNS", runs)
        monkeypatch.setattr(windows, "MIN_RUN_HOPS", min_hops)
        got = streamed_probabilities(streaming, audio, window_samples=N_SAMPLES, hop_samples=HOP)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=f"{runs} runs")


def test_the_zero_state_is_the_state_of_silence():
    # Rule: a stream may start from all-zero state: fed silence first, the state is unchanged (frames are cached
    # as mel power, whose value for silence is 0 for every normalization).
    detector = StreamingDetector(student_with_varied_output(), LogMel(normalize="none").eval(), hop_samples=HOP)
    audio, frames = torch.zeros(1, N_SAMPLES), torch.zeros(1, 40, 101)
    _, audio_out, frames_out = detector(torch.zeros(1, HOP), audio, frames)
    assert torch.equal(audio_out, audio) and torch.equal(frames_out, frames)


@pytest.mark.parametrize("hop", [800 + 1, 480, 3200 * 2, N_SAMPLES])
def test_a_hop_the_streaming_form_cannot_serve_is_refused_naming_it(hop):
    # Rule: a hop that is no whole number of frames, or does not divide the window, is refused in one line that
    # names it and what is allowed.
    with pytest.raises(StreamingError, match=rf"hop_samples {hop}: .* allowed: e\.g\. 1600"):
        StreamingDetector(build_student("tc_resnet"), LogMel(), hop_samples=hop)


def test_an_odd_frame_length_is_refused_naming_the_setting():
    # Rule: the streaming form's frame bookkeeping needs an even frame; another is refused in one line naming it.
    with pytest.raises(StreamingError, match=r"window_ms gives a 401-sample frame.*even"):
        StreamingDetector(build_student("tc_resnet"), LogMel(window_ms=25.0625), hop_samples=HOP)


def test_empty_and_float64_audio_score_like_the_windowed_model():
    # Rule: streamed_probabilities takes what stream_probabilities takes: empty audio is one silent window, and
    # float64 samples are scored as float32.
    windowed, streaming = both_forms(student_with_varied_output(), LogMel(normalize="pcen").eval())
    for audio in (np.zeros(0, np.float32), speech_like(2.5, seed=3).astype(np.float64)):
        expected = stream_probabilities(windowed, audio, window_samples=N_SAMPLES, hop_samples=HOP)
        got = streamed_probabilities(streaming, audio, window_samples=N_SAMPLES, hop_samples=HOP)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_short_audio_is_scored_window_by_window():
    # Rule: the streaming form first spends a window's worth of hops on its state, so audio of fewer than
    # MIN_STREAMED_WINDOW_LENGTHS windows' lengths is scored window by window, and longer audio streams.
    nineteen_windows = N_SAMPLES + 18 * HOP  # 2.8 s
    assert not worth_streaming(nineteen_windows, window_samples=N_SAMPLES, hop_samples=HOP)  # 19 < 2 x 10
    assert worth_streaming(nineteen_windows + 1, window_samples=N_SAMPLES, hop_samples=HOP)


def test_a_hop_costs_less_than_a_window():
    # Rule: the streaming form computes less per hop than the windowed model per window: its front end transforms
    # the new and edge frames only (14 of 101), so its multiply-adds are fewer. Counted, not timed.
    detector = StreamingDetector(build_student("tc_resnet"), LogMel(normalize="pcen"), hop_samples=HOP)
    assert detector.index.shape == (2 + 10 + 2, 400)  # head edge frames, the hop's 10 new ones, tail edge frames
