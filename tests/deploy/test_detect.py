"""deploy.detect: verifying an exported pair (signature, schema, hash, ONNX), checking audio before and while it is
decoded, and the streaming primitives (windows, resampling, the detection rule). Refusals go through `kd-tune detect`
where a user meets them: one line naming the file, exit code 2."""

import io
import json
import logging
import math
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from kd_tune.audio.features import N_SAMPLES, SAMPLE_RATE
from kd_tune.cli import main
from kd_tune.config import load_config
from kd_tune.deploy import detect, export, windows
from kd_tune.metrics import activation_indices, activation_times, sliding_windows
from kd_tune.signing import ENV_REQUIRE_SIGNATURE, ENV_SIGNING_KEY, ENV_SIGNING_KEY_FILE
from kd_tune.store.checkpoint import load_checkpoint
from kd_tune.training.models import build_student
from kd_tune.training.resume import TrainState, save_training_checkpoint

REPO = Path(__file__).resolve().parents[2]
KEY = "correct horse battery staple"
LIMITED_AS_BYTES = 3 * 2**30  # address space of a limited `kd-tune detect` run: ample for it, far below 12-22 GB
CLI_TIMEOUT_S = 120


def export_random_student(root: Path, name: str, data_root: Path, *, streaming: bool = False) -> Path:
    """An untrained student at width 0.25, exported as training and `kd-tune export` would (with its streaming form
    if asked); returns model.onnx."""
    torch.manual_seed(0)
    student = build_student(name, width=0.25)
    config = load_config(None, overrides=[f"data.root={data_root}", f"storage.root={root}", f"student.name={name}",
                                          "student.width=0.25"], check_paths=False)
    ckpt = save_training_checkpoint(root, student, torch.optim.AdamW(student.parameters()), TrainState(), config, {})
    out = root / "export" / "model.onnx"
    export.export_student(load_checkpoint(ckpt.parent, ckpt.name), out, data=data_root, streaming=streaming)
    return out


@pytest.fixture(scope="session")
def exports(small_dataset, tmp_path_factory) -> dict[str, Path]:
    """Two exported pairs: "unsigned" (no key) and "signed" (with KEY), of different students."""
    with pytest.MonkeyPatch.context() as mp:
        for name in (ENV_SIGNING_KEY, ENV_SIGNING_KEY_FILE, ENV_REQUIRE_SIGNATURE):
            mp.delenv(name, raising=False)
        unsigned = export_random_student(tmp_path_factory.mktemp("unsigned"), "tc_resnet", small_dataset)
        mp.setenv(ENV_SIGNING_KEY, KEY)
        signed = export_random_student(tmp_path_factory.mktemp("signed"), "ds_cnn", small_dataset)
    return {"unsigned": unsigned, "signed": signed}


@pytest.fixture
def env(monkeypatch):
    """No signing settings but the ones a test sets."""
    for name in (ENV_SIGNING_KEY, ENV_SIGNING_KEY_FILE, ENV_REQUIRE_SIGNATURE):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> Path:
    """2 s of quiet noise at 16 kHz: audio every model can run on."""
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    sf.write(path, 0.01 * np.random.default_rng(0).standard_normal(2 * SAMPLE_RATE).astype(np.float32), SAMPLE_RATE)
    return path


def copy_pair(model: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    for path in (model, model.with_suffix(".json")):
        shutil.copy(path, into / path.name)
    return into / model.name


def edit_card(model: Path, change) -> Path:
    card_path = model.with_suffix(".json")
    card = json.loads(card_path.read_text())
    change(card)
    card_path.write_text(json.dumps(card))
    return card_path


def detect_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["detect", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def refusal(code: int, err: str, *, names: Path | str, exit_code: int = 2) -> str:
    """The single stderr line of a refusal that names `names` and exits with `exit_code`."""
    lines = err.splitlines()
    assert code == exit_code and len(lines) == 1, (code, err[-3000:])
    assert lines[0].startswith(f"kd-tune: {names}: "), lines[0]
    assert "Traceback" not in err and "object at 0x" not in err
    return lines[0]


def wav_header(rate: int, channels: int, data: bytes, *, bits: int = 16, claimed: int | None = None) -> bytes:
    """A PCM WAV file's bytes, written by hand so that its header can claim anything."""
    claimed = len(data) if claimed is None else claimed
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    return (b"RIFF" + struct.pack("<I", 36 + claimed) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data"
            + struct.pack("<I", claimed) + data)


def without_signing_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KD_TUNE_")}


def limited_detect(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`kd-tune detect` in a child without torch and with LIMITED_AS_BYTES of address space: a run that would
    allocate gigabytes fails there instead of taking the machine down."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMITED_AS_BYTES, LIMITED_AS_BYTES))

    code = ("import sys; sys.modules['torch'] = None  # any `import torch` now raises\n"
            "from kd_tune.cli import main; sys.exit(main(['detect', *sys.argv[1:]]))")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, preexec_fn=limit, env=env)


# ---------------------------------------------------------------- signed model cards


def test_export_signs_the_card_and_detect_accepts_it(exports, speech, env, capsys):
    # Rule: with a key, export signs model.json (HMAC-SHA256 over every field, onnx_sha256 among them) and
    # `kd-tune detect` accepts the untouched pair.
    env.setenv(ENV_SIGNING_KEY, KEY)
    card = json.loads(exports["signed"].with_suffix(".json").read_text())
    assert card["signature"]["alg"] == "HMAC-SHA256" and len(card["signature"]["value"]) == 64
    code, out, err = detect_cli(capsys, exports["signed"], speech)
    assert code == 0 and out.startswith(f"{speech}: ") and err == ""


@pytest.mark.parametrize("attack", ["threshold", "swap-model", "strip-signature"])
def test_a_signed_card_that_was_changed_is_refused(exports, speech, tmp_path, env, capsys, attack):
    # Rule: with a key set, editing the threshold in model.json, swapping model.onnx and fixing onnx_sha256, or
    # deleting the signature is refused by `kd-tune detect`: one line naming model.json, exit 2.
    env.setenv(ENV_SIGNING_KEY, KEY)
    model = copy_pair(exports["signed"], tmp_path)
    if attack == "threshold":
        card_path = edit_card(model, lambda card: card.update(threshold=0.01))
    elif attack == "swap-model":
        shutil.copy(exports["unsigned"], model)
        other = detect.sha256(model.read_bytes())
        card_path = edit_card(model, lambda card: card.update(onnx_sha256=other))
    else:
        card_path = edit_card(model, lambda card: card.pop("signature"))
    line = refusal(*detect_cli(capsys, model, speech)[::2], names=card_path)
    assert ("unsigned, but a signature is required" if attack == "strip-signature" else
            "signature does not match") in line


def test_an_unsigned_card_is_accepted_only_when_opted_out(exports, speech, env, capsys, caplog):
    # Rule: with a key set an unsigned card is refused by default; KD_TUNE_REQUIRE_SIGNATURE=0 accepts it with a
    # warning naming the card.
    env.setenv(ENV_SIGNING_KEY, KEY)
    card_path = exports["unsigned"].with_suffix(".json")
    refusal(*detect_cli(capsys, exports["unsigned"], speech)[::2], names=card_path)
    env.setenv(ENV_REQUIRE_SIGNATURE, "0")
    with caplog.at_level(logging.WARNING, logger="kd_tune.signing"):
        assert detect_cli(capsys, exports["unsigned"], speech)[0] == 0
    assert [r.getMessage() for r in caplog.records] == [f"{card_path}: unsigned, accepted only because "
                                                        f"{ENV_REQUIRE_SIGNATURE}=0"]


def test_require_signature_refuses_an_unsigned_card_without_a_key(exports, speech, env, capsys):
    # Rule: KD_TUNE_REQUIRE_SIGNATURE=1 is honoured by detect: an unsigned card is refused even without a key.
    env.setenv(ENV_REQUIRE_SIGNATURE, "1")
    line = refusal(*detect_cli(capsys, exports["unsigned"], speech)[::2],
                   names=exports["unsigned"].with_suffix(".json"))
    assert "KD_TUNE_REQUIRE_SIGNATURE=1" in line


# ---------------------------------------------------------------- the card's schema


@pytest.mark.parametrize("change, needle", [
    (lambda c: c.pop("threshold"), "threshold: Field required"),
    (lambda c: c.update(sample_rate="16000"), "sample_rate: Input should be a valid integer"),
    (lambda c: c.update(sample_rate=16000.5), "sample_rate: Input should be a valid integer"),
    (lambda c: c.update(sample_rate=8000), "sample_rate: Value error, 8000 Hz, but the model's front end runs at"),
    (lambda c: c.update(window_samples=10**9), f"window_samples: Input should be less than or equal to {2**17}"),
    (lambda c: c.update(hop_samples=0), "hop_samples: Input should be greater than or equal to 1"),
    (lambda c: c.update(hop_samples=20000), "hop_samples 20000 is outside 160 (10 ms) to window_samples 16000"),
    (lambda c: c.update(hop_samples=16), "hop_samples 16 is outside 160 (10 ms) to window_samples 16000"),
    (lambda c: c.update(threshold=1.5), "threshold: Input should be less than or equal to 1"),
    (lambda c: c.update(threshold=True), "threshold: Input should be a valid number"),
    (lambda c: c.update(refractory_seconds=-1), "refractory_seconds: Input should be greater than or equal to 0"),
    (lambda c: c.update(onnx_sha256=None), "onnx_sha256: Input should be a valid string"),
    (lambda c: c.update(format="other/1"), "format: Input should be 'kd_tune.onnx/1'"),
], ids=["missing", "string", "fraction", "low-rate", "huge-window", "zero-hop", "hop-past-window", "threshold",
        "bool", "refractory", "no-hash", "format", "1-ms-hop"])
def test_a_malformed_card_is_one_line_per_field(exports, speech, tmp_path, env, capsys, change, needle):
    # Rule: model.json is validated against a schema before use: a missing or wrong-typed field, or a value out of
    # range, is one line naming the card and the field (no KeyError, TypeError or ZeroDivisionError), exit 2. A rate
    # other than the front end's 16 kHz would give wrong answers silently, a hop under 10 ms 100x the work (1 ms).
    model = copy_pair(exports["unsigned"], tmp_path)
    card_path = edit_card(model, change)
    assert needle in refusal(*detect_cli(capsys, model, speech)[::2], names=card_path)


@pytest.mark.parametrize("content, needle", [
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[1, 2]", "a JSON list, not an object"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON: nested 100000 levels deep"),
    (b'{"threshold": NaN}', "not valid JSON: NaN is not JSON"),
    (b" " * (detect.MAX_CARD_BYTES + 1), f"allowed: at most {detect.MAX_CARD_BYTES} bytes"),
], ids=["not-utf8", "list", "deep", "nan", "huge"])
def test_a_card_that_is_not_a_card_names_the_file(exports, speech, tmp_path, env, capsys, content, needle):
    # Rule: a model.json that is not UTF-8, not an object, nested too deep, not strict JSON or too large is one line
    # naming the card (never a codec error without a file name, a RecursionError or a huge read), exit 2.
    model = copy_pair(exports["unsigned"], tmp_path)
    model.with_suffix(".json").write_bytes(content)
    assert needle in refusal(*detect_cli(capsys, model, speech)[::2], names=model.with_suffix(".json"))


def test_a_card_with_a_huge_sample_rate_allocates_nothing(exports, speech, tmp_path):
    # Rule: a model.json with sample_rate 2^31-1 is refused from its schema before any audio is resampled: the
    # limited, torch-free `kd-tune detect` run prints one line and exits 2 (it used to allocate 22 GB).
    model = copy_pair(exports["unsigned"], tmp_path)
    card_path = edit_card(model, lambda card: card.update(sample_rate=2**31 - 1))
    result = limited_detect(model, speech, env=without_signing_env())
    line = refusal(result.returncode, result.stderr, names=card_path)
    assert "sample_rate: Value error, 2147483647 Hz, but the model's front end runs at 16000 Hz" in line
    assert "torch" not in result.stderr


def test_missing_files_are_named(exports, speech, tmp_path, env, capsys):
    # Rule: a missing model.json or model.onnx is one line naming it, exit 2.
    model = copy_pair(exports["unsigned"], tmp_path / "no_card")
    model.with_suffix(".json").unlink()
    refusal(*detect_cli(capsys, model, speech)[::2], names=model.with_suffix(".json"))
    refusal(*detect_cli(capsys, tmp_path / "absent.onnx", speech)[::2], names=tmp_path / "absent.json")


def test_a_broken_protobuf_is_one_line_naming_the_model(exports, speech, tmp_path, env, capsys):
    # Rule: a model.onnx onnxruntime cannot parse (its hash fixed in an unsigned card) is one line naming it, exit 2.
    model = copy_pair(exports["unsigned"], tmp_path)
    model.write_bytes(b"\x08\x07\x12\x03not a protobuf" * 10)
    edit_card(model, lambda card: card.update(onnx_sha256=detect.sha256(model.read_bytes())))
    assert "onnxruntime cannot load it" in refusal(*detect_cli(capsys, model, speech)[::2], names=model)


# ---------------------------------------------------------------- audio: header first, then samples


def test_a_tiny_wav_claiming_10_mhz_is_refused_from_its_header(exports, tmp_path):
    # Rule: a 444-byte WAV that claims 10,000,019 Hz is refused before it is decoded: one line naming it, exit 2,
    # in a torch-free run limited to 3 GiB of address space (it used to allocate 12 GB and report a wake word).
    wav = tmp_path / "tiny.wav"
    wav.write_bytes(wav_header(10_000_019, 1, bytes(400)))
    assert wav.stat().st_size == 444
    result = limited_detect(exports["unsigned"], wav, env=without_signing_env())
    line = refusal(result.returncode, result.stderr, names=wav)
    assert "bad sample rate (10000019 Hz; allowed: 8000 to 192000 Hz)" in line and "torch" not in result.stderr


@pytest.mark.parametrize("case", ["channels", "duration", "empty"])
def test_audio_outside_the_limits_is_refused_before_decoding(exports, tmp_path, env, capsys, case):
    # Rule: more than 32 channels, more than an hour (a sparse 1 h 0 min 1 s file here), or no samples: one line
    # naming the file, exit 2; the other files of the command are still processed.
    bad, good = tmp_path / f"{case}.wav", tmp_path / "good.wav"
    sf.write(good, np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    if case == "channels":
        sf.write(bad, np.zeros((100, 33), np.float32), SAMPLE_RATE)
    elif case == "duration":
        frames = 8000 * (detect.MAX_AUDIO_SECONDS + 1)
        with open(bad, "wb") as f:  # 8-bit PCM at 8 kHz, its samples a hole in the file: no disk space used
            f.write(wav_header(8000, 1, b"", bits=8, claimed=frames))
            f.truncate(44 + frames)
    else:
        bad.write_bytes(wav_header(SAMPLE_RATE, 1, b""))
    code = main(["detect", str(exports["unsigned"]), str(bad), str(good)])
    out, err = capsys.readouterr()
    needle = {"channels": "bad channel count (33; allowed: 1 to 32)", "empty": "holds no samples",
              "duration": "3601 s long; allowed: at most 3600 s"}[case]
    assert needle in refusal(code, err, names=bad) and out.startswith(f"{good}: ")


@pytest.mark.parametrize("value, needle", [
    (float("nan"), "non-finite (NaN or infinite samples; allowed: finite samples)"),
    (float("inf"), "non-finite (NaN or infinite samples; allowed: finite samples)"),
    (1e30, "out of range (peak |x| 1e+30; allowed: at most 1000, full scale is 1)"),
])
def test_non_finite_or_absurd_samples_are_an_error_not_silence(exports, tmp_path, env, capsys, value, needle):
    # Rule: NaN, inf or 1e30 samples (in one channel of a float WAV) are an error naming the file, exit 2, not
    # "no wake word" with exit 0.
    audio = np.zeros((SAMPLE_RATE, 2), np.float32)
    audio[SAMPLE_RATE // 2, 1] = value
    wav = tmp_path / "bad.wav"
    sf.write(wav, audio, SAMPLE_RATE, subtype="FLOAT")
    assert needle in refusal(*detect_cli(capsys, exports["unsigned"], wav)[::2], names=wav)
    with pytest.raises(detect.DetectError, match=f"^audio: {re.escape(needle)}$"):
        detect.Detector(exports["unsigned"]).probabilities(np.full(100, value, np.float32))


def test_errors_name_a_file_object_by_its_name_never_its_repr(tmp_path):
    # Rule: audio given as a file object is named by its `name` in errors, never as <_io.BytesIO object at 0x...>.
    buffer = io.BytesIO(b"not audio at all" * 10)
    with pytest.raises(detect.DetectError) as error:
        detect.load_audio(buffer, sample_rate=SAMPLE_RATE)
    assert "object at 0x" not in str(error.value) and str(error.value).startswith("<BytesIO without a file name>: ")
    buffer.name = "clip.wav"
    with pytest.raises(detect.DetectError, match=r"^clip\.wav: cannot read audio"):
        detect.load_audio(buffer, sample_rate=SAMPLE_RATE)
    good = io.BytesIO()
    sf.write(good, np.zeros(8000, np.float32), 8000, format="WAV")
    good.seek(0)
    assert detect.load_audio(good, sample_rate=SAMPLE_RATE).shape == (SAMPLE_RATE,)


def test_load_audio_names_an_unreadable_file(tmp_path):
    # Rule: a file soundfile cannot read is an error naming the file.
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio")
    with pytest.raises(detect.DetectError, match="notes.wav: cannot read audio"):
        detect.load_audio(bad, sample_rate=SAMPLE_RATE)


def test_load_audio_averages_channels_block_by_block(tmp_path, monkeypatch):
    # Rule: decoding in blocks gives exactly the whole-file downmix (the blocks only bound memory).
    rng = np.random.default_rng(1)
    audio = (0.1 * rng.standard_normal((10_001, 3))).astype(np.float32)
    wav = tmp_path / "three.wav"
    sf.write(wav, audio, SAMPLE_RATE, subtype="FLOAT")
    monkeypatch.setattr(detect, "READ_BLOCK_FRAMES", 1000)
    np.testing.assert_allclose(detect.load_audio(wav, sample_rate=SAMPLE_RATE), audio.mean(axis=1), rtol=0,
                               atol=1e-7)


# ---------------------------------------------------------------- streaming primitives


@pytest.mark.parametrize("refractory_s", [0.0, 0.25, 1.0, 2.1])
def test_detection_rule_matches_metrics(refractory_s):
    # Rule: detect uses kd_tune.metrics.activation_times' rising-edge + refractory rule (re-implemented without torch).
    rng = np.random.default_rng(0)
    probabilities = np.convolve(rng.random(600), np.ones(5) / 5, mode="same")  # runs above and below threshold
    hop_s = 0.1
    for threshold in (0.5, 0.6, 0.7):
        windows = activation_indices(probabilities, threshold=threshold,
                                     refractory_windows=math.ceil(round(refractory_s / hop_s, 9)))
        expected = activation_times(probabilities, threshold=threshold, hop_seconds=hop_s,
                                    refractory_seconds=refractory_s)
        assert [i * hop_s for i in windows] == pytest.approx(expected)


@pytest.mark.parametrize("length", [1, 15999, 16000, 16001, 41234])
def test_frames_match_metrics_sliding_windows(length):
    # Rule: detection cuts audio exactly as evaluation does (kd_tune.metrics.sliding_windows).
    audio = np.random.default_rng(length).standard_normal(length).astype(np.float32)
    expected = sliding_windows(torch.from_numpy(audio), window_samples=N_SAMPLES, hop_samples=1600).numpy()
    np.testing.assert_array_equal(windows.frames(audio, window_samples=N_SAMPLES, hop_samples=1600), expected)


def test_reading_and_scoring_192_khz_audio_costs_what_detect_py_claims(tmp_path):
    # Rule: detect.py's comment holds: a file costs its audio at 16 kHz (4 bytes a sample, ~230 MB an hour at any
    # rate) plus ~20 MB to decode and resample it, and scoring adds one batch of windows (16 MiB for 1 s windows):
    # measured on a minute at 192 kHz (an hour costs 60x its audio share). It used to hold the 192 kHz samples and a
    # padded copy of them: 5.8 GB an hour, twice the 2.8 GB the comment claimed.
    from test_heldout import peak_model

    detector = detect.Detector(peak_model(tmp_path / "model.onnx"))
    path, rate = tmp_path / "minute.flac", 192_000
    with sf.SoundFile(path, "w", rate, 1, subtype="PCM_16") as f:
        for _ in range(60):
            f.write(0.01 * np.sin(np.arange(rate, dtype=np.float32) / 10))
    tracemalloc.start()
    try:
        audio = detector.read(path)
        read_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        detector.probabilities(audio)
        score_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    audio_bytes = 4 * SAMPLE_RATE * 60
    assert len(audio) == SAMPLE_RATE * 60
    assert read_peak < audio_bytes + 24 * 2**20, read_peak
    assert score_peak < audio_bytes + 4 * 2**20 + windows.RUN_BATCH * N_SAMPLES * 4, score_peak
