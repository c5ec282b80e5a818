"""Live detection (`kd-tune detect --mic`): fed block by block, the detections of the whole recording."""

import time

import numpy as np
import pytest
from test_detect import detect_cli, edit_card, export_random_student, refusal
from test_heldout import HOP, RATE, WINDOW, peak_model

from kd_tune.deploy.detect import Detector
from kd_tune.deploy.listen import BACKENDS, LiveDetector, Trigger, listen
from kd_tune.metrics import activation_indices


def fed_in_blocks(live: LiveDetector, audio: np.ndarray, *, seed: int) -> list[float]:
    """live.feed over audio cut at random places, from single samples to several hops."""
    rng, times, at = np.random.default_rng(seed), [], 0
    while at < len(audio):
        size = int(rng.choice([1, 7, HOP - 1, HOP, 3 * HOP + 11, 5000]))
        times += live.feed(audio[at:at + size])
        at += size
    return times


@pytest.mark.parametrize("refractory", [0, 1, 3, 10])
def test_the_trigger_fires_where_activation_indices_does(refractory):
    # Rule: one window at a time, the trigger fires on the windows activation_indices picks from the whole series:
    # rising edges, none within the refractory period of the previous detection.
    rng = np.random.default_rng(refractory)
    probabilities = np.repeat(rng.uniform(0, 1, 400), rng.integers(1, 4, 400))
    trigger = Trigger(threshold=0.7, refractory_windows=refractory)
    fired = [i for i, p in enumerate(probabilities) if trigger(float(p))]
    assert fired == activation_indices(probabilities, threshold=0.7, refractory_windows=refractory)
    assert len(fired) > 10


@pytest.mark.parametrize("hop", [HOP, 1300])
def test_live_windowed_detection_finds_the_times_of_the_whole_recording(hop, tmp_path):
    # Rule: without a streaming form, a live detector runs the windowed model on each window as its last sample
    # arrives: fed in blocks of any size, it fires at the times detect() finds in the whole recording (peaks 1.3 s
    # and more apart, some inside the refractory second, one in the first window), also with a hop that does not
    # divide the window.
    model = peak_model(tmp_path / "peak.onnx")
    edit_card(model, lambda card: card.update(hop_samples=hop))
    detector = Detector(model)
    assert detector.stream_session is None and (detector.window_samples, detector.hop_samples) == (WINDOW, hop)
    audio = np.full(WINDOW + 300 * hop, 0.01, np.float32)  # whole windows only, as a live stream has
    for second in (0.2, 3.05, 3.6, 7.0, 8.3, 20.0, 24.9):
        audio[int(second * RATE)] = 0.9
    expected = detector.detect(audio)
    assert len(expected) >= 5
    assert fed_in_blocks(LiveDetector(detector), audio, seed=0) == expected
    assert listen(detector, [audio[i:i + 4800] for i in range(0, len(audio), 4800)], rate_hz=RATE, seconds=None,
                  echo=lambda line: None) == expected  # through the resampler, at the model's own rate


def test_live_streaming_detection_finds_the_times_of_the_whole_recording(small_dataset, tmp_path):
    # Rule: with a streaming form, a live detector feeds it one hop at a time from the silent state: fed in blocks of
    # any size, it fires at the times detect() finds in the whole recording, for a threshold that the
    # probabilities cross often (one between two of them, so no window sits on it).
    from test_streaming import speech_like

    model = export_random_student(tmp_path, "tc_resnet", small_dataset, streaming=True)
    audio = speech_like(WINDOW / RATE + 0.1 * 400, seed=2)
    probabilities = np.sort(Detector(model).probabilities(audio))
    middle = probabilities[len(probabilities) // 4:3 * len(probabilities) // 4]
    gap = int(np.argmax(np.diff(middle)))
    detector = Detector(model, threshold=float(middle[gap] + middle[gap + 1]) / 2)
    assert detector.stream_session is not None
    expected = detector.detect(audio)
    assert len(expected) >= 5
    assert fed_in_blocks(LiveDetector(detector), audio, seed=1) == expected


def test_mic_on_the_null_device_listens_for_the_given_seconds(tmp_path, capsys):
    # Rule: `kd-tune detect MODEL --mic` opens a real capture device (miniaudio's null backend: silence, at its own
    # pace), says which, listens for --seconds and ends with the count; silence holds no wake word.
    model = peak_model(tmp_path / "peak.onnx")
    started = time.monotonic()
    code, out, err = detect_cli(capsys, model, "--mic", "--backend", "null", "--seconds", "1.5")
    assert code == 0, err
    assert out.splitlines() == ["listening on the Null capture device (threshold 0.5); for 1.5 s", "0 detection(s)"]
    assert 1.4 <= time.monotonic() - started < 30  # the device's pace, in real time


@pytest.mark.parametrize("args, names", [
    (["FILE", "--mic"], "detect"),
    ([], "detect"),
    (["FILE", "--seconds", "3"], "detect"),
    (["--mic", "--backend", "winamp"], "--backend"),
])
def test_mic_mistakes_are_one_line_refusals(args, names, tmp_path, capsys):
    # Rule: files and --mic together, neither, --mic's options without it, or a backend miniaudio does not have:
    # one line naming the option and what is allowed, exit 2.
    model = peak_model(tmp_path / "peak.onnx")
    audio = tmp_path / "a.wav"
    import soundfile as sf

    sf.write(audio, np.zeros(RATE, np.float32), RATE)
    line = refusal(*detect_cli(capsys, model, *[str(audio) if a == "FILE" else a for a in args])[::2], names=names)
    assert "allowed:" in line and ("null" in line) == (names == "--backend")
    assert set(BACKENDS) <= set(line.replace(",", " ").split()) or names != "--backend"


def test_a_reader_that_falls_behind_the_device_is_refused_not_hoarded(monkeypatch):
    # Rule: the blocks waiting for detection are bounded; once the reader falls that far behind the (real, null)
    # device, reading refuses with one message instead of queueing audio without end.
    from kd_tune.deploy import listen as live
    from kd_tune.deploy.detect import DetectError

    monkeypatch.setattr(live, "MAX_QUEUED_BLOCKS", 5)  # 0.5 s of the null device's 100 ms blocks
    with live.Microphone("null") as mic:
        time.sleep(1.5)
        with pytest.raises(DetectError, match=r"--mic: detection fell 0.5 s behind the microphone; allowed: "):
            next(iter(mic))
