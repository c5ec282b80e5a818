"""kd_tune.deploy.export: ONNX export of every student, the model card, int8, streaming detection without torch."""

import hashlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from onnx import numpy_helper

from kd_tune import __version__
from kd_tune.audio.features import N_SAMPLES, SAMPLE_RATE, LogMel, dft_basis
from kd_tune.cli import main
from kd_tune.config import load_config
from kd_tune.datasets.data import Split, WakewordData, load_dataset
from kd_tune.deploy import detect, export, windows
from kd_tune.deploy.streaming import StreamingDetector
from kd_tune.errors import InputError
from kd_tune.evaluation.source import locate_source
from kd_tune.signing import ENV_REQUIRE_SIGNATURE, ENV_SIGNING_KEY, ENV_SIGNING_KEY_FILE
from kd_tune.store import storage
from kd_tune.store.checkpoint import CheckpointError, copy_checkpoint, load_checkpoint
from kd_tune.training.models import STUDENTS, build_student, build_teacher
from kd_tune.training.teachers import TeacherEnsemble
from kd_tune.training.resume import TrainState, save_training_checkpoint
from kd_tune.training.train import fit

REPO = Path(__file__).resolve().parents[2]
KEY = "correct horse battery staple"
CARD_KEYS = {"format", "kd_tune_version", "onnx_file", "onnx_sha256", "onnx_bytes", "input", "output", "sample_rate",
             "window_samples", "hop_samples", "threshold", "target_fa_per_hour", "refractory_seconds", "labels",
             "wakeword", "student", "source", "checkpoint_manifest_sha256", "parity_max_abs_diff", "validation",
             "latency_ms"}
TRAIN_EPOCHS = 20  # the small set needs ~20 epochs before the student tells "hey nova" from "hey" or "nova"
# The small set's val split holds ~13 s of negatives, too little to calibrate 1 FA/h: the stream tests use a fixed
# threshold instead of the card's.
DETECT_THRESHOLD = 0.8
TOLERANCE_S = 0.5


def config_for(data_root, storage_root=".", *overrides):
    return load_config(None, overrides=[f"data.root={data_root}", f"storage.root={storage_root}", *overrides],
                       check_paths=False)


def random_checkpoint(parent: Path, name: str, data_root, *, width: float = 1.0, run: str | None = None,
                      metrics: dict | None = None, overrides: tuple = ()) -> Path:
    """A randomly initialised student saved the way training saves it (for run or trial `run`, with `metrics`)."""
    torch.manual_seed(0)
    student = build_student(name, width=width)
    config = config_for(data_root, parent, f"student.name={name}", f"student.width={width}", *overrides)
    return save_training_checkpoint(parent, student, torch.optim.AdamW(student.parameters()), TrainState(), config,
                                    metrics or {}, name=run)


@pytest.fixture(scope="session")
def small_data(small_dataset) -> WakewordData:
    return load_dataset(small_dataset)


@pytest.fixture(scope="session")
def trained(small_data, tmp_path_factory) -> Path:
    """A tc_resnet student trained by `fit` (tiny cnn teacher) on the small set; its last checkpoint, copied out."""
    root = tmp_path_factory.mktemp("trained")
    # The tiny teacher is untrained here, so alpha 0 lets the labels alone teach the student; tc_resnet is the
    # student that trains fastest on a CPU.
    config = config_for(small_data.root, root, "teachers=[{name: cnn, arch: cnn, source: tiny, epochs: 1}]",
                        "distillation.teachers=[cnn]", "distillation.alpha_start=0.0", "distillation.alpha_end=0.0",
                        "student.name=tc_resnet", f"training.epochs={TRAIN_EPOCHS}", "training.batch_size=8",
                        "training.lr=0.02", "training.device=cpu", "augment.enabled=false",
                        "data.hard_negative_weight=1.0")
    teachers = TeacherEnsemble({"cnn": build_teacher("cnn", source="tiny")}, combine="mean",
                               device=torch.device("cpu"), dtype=torch.float32)

    def report(metrics, checkpoint):
        copy_checkpoint(checkpoint, root, "student")

    fit(config, report, data=small_data, teachers=teachers)
    return root / "student"


@pytest.fixture(scope="session")
def exported(trained, small_data, tmp_path_factory) -> tuple[Path, dict]:
    """The trained student exported with --int8 and --streaming: (model.onnx, the returned card)."""
    out = tmp_path_factory.mktemp("exported") / "model.onnx"
    checkpoint = load_checkpoint(trained.parent, trained.name)
    return out, export.export_student(checkpoint, out, data=small_data, int8=True, streaming=True,
                                      source=str(trained))


@pytest.fixture(scope="session")
def detector(exported) -> detect.Detector:
    return detect.Detector(exported[0], threshold=DETECT_THRESHOLD)


def clips_of(split: Split, *kinds: str) -> list[np.ndarray]:
    return [clip.numpy() for clip, kind in zip(split.audio, split.kinds, strict=True) if kind in kinds]


def phrases_and_pauses(split: Split) -> list[np.ndarray]:
    """Negative speech clips, each followed by a background clip (noise, hum, babble, near-silence)."""
    pauses = itertools.cycle(clips_of(split, "background"))
    return [clip for phrase in clips_of(split, "negative") for clip in (phrase, next(pauses))]


def build_stream(negatives: list[np.ndarray], positives: list[np.ndarray], *, gaps=(2, 3, 2), tail=2):
    """Negative clips with a positive after each gap (in clips of 1 s); returns the audio and each positive's centre."""
    cycle, parts, centres = itertools.cycle(negatives), [], []
    for gap, positive in zip(gaps, positives, strict=True):
        parts += [next(cycle) for _ in range(gap)]
        centres.append((sum(map(len, parts)) + len(positive) / 2) / SAMPLE_RATE)
        parts.append(positive)
    parts += [next(cycle) for _ in range(tail)]
    return np.concatenate(parts), centres


@pytest.fixture(scope="session")
def wake_stream(detector, small_data) -> tuple[np.ndarray, list[float]]:
    """2 s of negatives, a positive, 3 s of negatives, a positive, 2 s, a positive, 2 s; and the positives' centres.

    The positives are the three training clips the model is surest of on their own, so a miss is the streaming
    detector's fault, even after the resampling round trip of `kd-tune detect`'s test.
    The negatives are phrases with pauses between them: back-to-back phrases can join into something close enough to
    the wake word to fool a student trained on 137 clips.
    """
    positives = clips_of(small_data.train, "positive")
    probabilities = windows.run(detector.session, np.stack(positives))
    surest = [positives[i] for i in np.argsort(-probabilities, kind="stable")[:3]]
    assert np.sort(probabilities)[-3] >= DETECT_THRESHOLD, "the trained student recognises < 3 training positives"
    return build_stream(phrases_and_pauses(small_data.train), surest)


# ---------------------------------------------------------------- export


def stored_constants(model: bytes) -> list[np.ndarray]:
    """Every tensor a model file stores: its initializers and its Constant nodes' values."""
    graph = onnx.load_from_string(model).graph
    return [numpy_helper.to_array(t) for t in graph.initializer] + [
        numpy_helper.to_array(n.attribute[0].t) for n in graph.node
        if n.op_type == "Constant" and n.attribute[0].name == "value"]


def holds_dft_basis(model: bytes) -> bool:
    basis = dft_basis(400).numpy()  # [402, 1, 400]
    layouts = (basis, basis[:, 0, :].T)  # the windowed model's conv weights, the streaming form's matrix
    return any(c.shape == b.shape and np.abs(c - b).max() <= 1e-3 for c in stored_constants(model) for b in layouts)


def noise_and_tones(n: int, seed: int) -> np.ndarray:
    """[n, N_SAMPLES] float32: white noise and tones from -60 to 0 dBFS."""
    rng = np.random.default_rng(seed)
    t = np.arange(N_SAMPLES) / SAMPLE_RATE
    tones = np.sin(2 * np.pi * rng.uniform(100, 7000, (n, 1)) * t) + 0.1 * rng.standard_normal((n, N_SAMPLES))
    return (tones * 10 ** rng.uniform(-3, 0, (n, 1))).astype(np.float32)


def test_the_default_student_ships_in_300_kb_and_100_kb_as_int8():
    # Rule: with its front end computed in the graph, the default student's file holds little more than its weights:
    # float32 (windowed and streaming) <= 300 KB, int8 <= 100 KB; int8 also computes its front end (quantization's
    # pre-processing folds it back into constants: export computes it again after).
    torch.manual_seed(0)
    config = load_config(None, check_paths=False)
    student = build_student(config.student.name, width=config.student.width, n_mels=config.features.n_mels).eval()
    log_mel = LogMel.from_config(config.features)
    model = export.to_onnx(export.probability_model(student, log_mel), window_samples=N_SAMPLES)
    stream = export.streaming_model(StreamingDetector(student, log_mel, hop_samples=1600))
    clips = noise_and_tones(16, seed=3)
    int8 = export.quantize_int8(model, clips, log_mel)
    assert len(model) <= 300 * 1024 and len(stream) <= 300 * 1024 and len(int8) <= 100 * 1024
    assert not any(map(holds_dft_basis, (model, stream, int8)))
    weights = sum(p.numel() for p in student.parameters())
    assert len(model) <= 4 * weights + 40 * 1024  # the float32 weights and ~30 KB of graph
    session = detect.open_session(int8)
    assert [i.name for i in session.get_inputs()] == ["audio"] and [o.name for o in session.get_outputs()] == [
        "probability"]
    assert np.abs(windows.run(session, clips) - windows.run(detect.open_session(model), clips)).max() < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_every_student_exports_with_parity(name, small_data, tmp_path):
    # Rule: every registered student exports as raw audio [batch, 16000] -> P(wake word) [batch], one self-contained
    # file within 1e-4 of PyTorch at batches 1 and 7, with its model card beside it.
    checkpoint = random_checkpoint(tmp_path / "ckpt", name, small_data.root)
    out = tmp_path / "out" / "model.onnx"
    card = export.export_student(load_checkpoint(checkpoint.parent, checkpoint.name), out, data=small_data)

    assert card["parity_max_abs_diff"] <= export.PARITY_TOLERANCE
    assert sorted(os.listdir(out.parent)) == ["model.json", "model.onnx"]  # no external data file
    model = onnx.load(out, load_external_data=False)
    onnx.checker.check_model(model)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    session = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    (audio_in,), (prob_out,) = session.get_inputs(), session.get_outputs()
    assert (audio_in.name, audio_in.type, audio_in.shape) == ("audio", "tensor(float)", ["batch", N_SAMPLES])
    assert (prob_out.name, prob_out.type, prob_out.shape) == ("probability", "tensor(float)", ["batch"])
    _, student, log_mel = export.load_student(load_checkpoint(checkpoint.parent, checkpoint.name))
    for batch in (1, 7):
        audio = small_data.val.audio[:batch]  # [batch, N_SAMPLES]
        with torch.no_grad():
            expected = student(log_mel(audio)).softmax(-1)[:, 1].numpy()
        got = session.run(["probability"], {"audio": audio.numpy()})[0]
        assert got.shape == (batch,)
        assert np.abs(got - expected).max() <= export.PARITY_TOLERANCE
    assert json.loads((out.parent / "model.json").read_text()) == card
    assert CARD_KEYS <= set(card)
    assert card["student"] == {"name": name, "width": 1.0, "parameters": sum(p.numel() for p in student.parameters())}
    assert card["onnx_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_check_parity_fails_on_different_probabilities():
    # Rule: parity beyond 1e-4 (or NaN, or a shape mismatch) is an error, not a number to read past.
    reference = np.linspace(0, 1, 50, dtype=np.float32)
    assert export.check_parity(reference, reference + 5e-5) == pytest.approx(5e-5, rel=1e-3)
    with pytest.raises(export.ParityError, match="differ by up to 0.001"):
        export.check_parity(reference, reference + np.float32(1e-3))
    with pytest.raises(export.ParityError):
        export.check_parity(reference, np.where(reference > 0.5, np.nan, reference))
    with pytest.raises(export.ParityError, match="shapes"):
        export.check_parity(reference, reference[:-1])


@pytest.mark.slow
def test_trained_export_card(exported, trained, small_data):
    # Rule: the card records streaming settings, a calibrated threshold that meets the target on the val stream,
    # provenance (checkpoint manifest hash, source) and the val figures at that threshold.
    out, card = exported
    assert CARD_KEYS <= set(card)
    assert card["checkpoint_manifest_sha256"] == hashlib.sha256((trained / "manifest.json").read_bytes()).hexdigest()
    assert (card["sample_rate"], card["window_samples"], card["hop_samples"]) == (SAMPLE_RATE, N_SAMPLES, 1600)
    assert card["labels"] == ["not_wakeword", "hey nova"] and card["wakeword"] == "hey nova"
    assert card["source"] == str(trained) and card["kd_tune_version"] == __version__
    assert 0 <= card["validation"]["frr"] <= 1 and card["latency_ms"] > 0
    # With minutes of val negatives one false accept is already over the target: the threshold must clear every window.
    stream = detect.Detector(out).probabilities(small_data.val_stream.numpy())
    assert card["validation"]["fa_per_hour"] == 0 and card["threshold"] > stream.max()


@pytest.mark.slow
def test_int8_model_runs_and_reports_deltas(exported, small_data):
    # Rule: --int8 writes a quantized model that runs with its own card (re-calibrated threshold) and reports its
    # size, parity and the change in accuracy, FRR and FA/h against float.
    out, card = exported
    int8_path = out.with_name("model.int8.onnx")
    q = card["int8"]
    assert q["onnx_file"] == "model.int8.onnx" and q["onnx_bytes"] == int8_path.stat().st_size
    assert set(q["delta_vs_float"]) == {"accuracy", "frr", "fa_per_hour"}
    accuracy_change = q["validation"]["accuracy"] - card["validation"]["accuracy"]
    assert q["delta_vs_float"]["accuracy"] == pytest.approx(accuracy_change)
    # Parity is reported, not held to 1e-4: one borderline clip may move by 0.2 under int8. A broken model (constant or
    # scrambled outputs) would move the accuracy, which must stay within 0.1 of float's.
    assert q["parity_max_abs_diff"] < 0.5 and abs(q["delta_vs_float"]["accuracy"]) <= 0.1
    int8_card = json.loads(out.with_name("model.int8.json").read_text())
    assert int8_card["threshold"] == q["threshold"] and int8_card["quantization"]["float_model"] == "model.onnx"
    ops = {node.op_type for node in onnx.load(int8_path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    probabilities = detect.Detector(int8_path).probabilities(small_data.val.audio[0].numpy())
    assert probabilities.shape == (1,) and 0 <= probabilities[0] <= 1


@pytest.mark.slow
def test_export_refuses_a_tampered_checkpoint(trained, tmp_path, capsys):
    # Rule: export verifies the checkpoint first: one flipped byte in model.safetensors stops it with one line
    # naming the file and exit code 2 (a bad input file).
    tampered = tmp_path / "student"
    shutil.copytree(trained, tampered)
    weights = tampered / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    out = tmp_path / "model.onnx"
    assert main(["export", str(tampered), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and len(err.splitlines()) == 1
    assert not out.exists()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        locate_source(str(tampered), load_config(None, check_paths=False)).load()


@pytest.fixture
def no_signing_env(monkeypatch):
    for name in (ENV_SIGNING_KEY, ENV_SIGNING_KEY_FILE, ENV_REQUIRE_SIGNATURE):
        monkeypatch.delenv(name, raising=False)


def single_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kd-tune: "), err[-2000:]
    return lines[0]


def test_cli_export_refuses_a_checkpoint_whose_signature_was_stripped(small_dataset, tmp_path, monkeypatch, capsys,
                                                                      no_signing_env):
    # Rule: with a key set (KD_TUNE_REQUIRE_SIGNATURE unset) `kd-tune export` of a checkpoint whose weights were
    # swapped, hashes recomputed and signature deleted stops with one line naming its manifest, exit 2, and writes
    # nothing.
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    checkpoint = random_checkpoint(tmp_path / "run", "ds_cnn", small_dataset, width=0.25)
    weights = bytearray((checkpoint / "model.safetensors").read_bytes())
    weights[-1] ^= 0x01  # another valid safetensors file: the last byte is tensor data
    (checkpoint / "model.safetensors").write_bytes(bytes(weights))
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["model.safetensors"]["sha256"] = hashlib.sha256(weights).hexdigest()
    del manifest["signature"]
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out" / "model.onnx"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 2
    line = single_line(capsys.readouterr().err)
    assert f"{checkpoint}: manifest.json: unsigned, but a signature is required (a signing key is set)" in line
    assert not out.parent.exists()


@pytest.mark.parametrize("env, needle", [
    ({ENV_REQUIRE_SIGNATURE: "yes"}, f"kd-tune: {ENV_REQUIRE_SIGNATURE}='yes': not a setting; allowed: 1"),
    ({ENV_SIGNING_KEY: KEY, ENV_SIGNING_KEY_FILE: "key"},
     f"kd-tune: {ENV_SIGNING_KEY} and {ENV_SIGNING_KEY_FILE}: both are set; allowed: at most one"),
    ({ENV_SIGNING_KEY: ""}, f"kd-tune: {ENV_SIGNING_KEY}: set but empty"),
    ({ENV_SIGNING_KEY_FILE: "missing/key"}, f"kd-tune: {ENV_SIGNING_KEY_FILE}='MISSING': cannot read the key file"),
], ids=["require-yes", "both-keys", "empty-key", "missing-key-file"])
def test_cli_export_refuses_bad_signing_settings_in_one_line(small_dataset, tmp_path, monkeypatch, capsys, env,
                                                             needle, no_signing_env):
    # Rule: KD_TUNE_REQUIRE_SIGNATURE=yes, both key variables, an empty key or a missing key file: each is one line
    # naming the variable (and the file), exit 2, never a traceback or a silently unsigned run.
    checkpoint = random_checkpoint(tmp_path / "run", "ds_cnn", small_dataset, width=0.25)
    for name, value in env.items():
        monkeypatch.setenv(name, value.replace("missing/key", str(tmp_path / "missing" / "key")))
    out = tmp_path / "out" / "model.onnx"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 2
    assert single_line(capsys.readouterr().err).startswith(needle.replace("MISSING", str(tmp_path / "missing/key")))
    assert not out.exists()


def write_experiment(root: Path, trials: dict[str, Path]) -> Path:
    """An experiment directory as `kd-tune sweep` leaves it: checkpoints under trial dirs, leaderboard best first."""
    experiment = root / "sweep"
    rows = []
    for trial, source in trials.items():
        path = copy_checkpoint(source, root, f"sweep/trial_{trial}_cnn_linear/train/checkpoint_000001")
        rows.append({"trial": trial, "status": "OK", "frr_at_target_fa": 0.1 * len(rows), "checkpoint": path})
    storage.write_json(root, "sweep/leaderboard.json", rows)
    return experiment


def trial_checkpoint(tmp_path: Path, data_root, trial: str, frr: float, *overrides: str) -> Path:
    """A trial's student whose signed manifest reports `frr` as its frr_at_target_fa, the sweep's tune.metric."""
    return random_checkpoint(tmp_path / trial, "ds_cnn", data_root, width=0.25, run=trial,
                             metrics={"epoch": 1, "frr_at_target_fa": frr},
                             overrides=("tune.metric=frr_at_target_fa", *overrides))


@pytest.mark.slow
def test_cli_exports_the_best_trial_of_an_experiment(small_dataset, tmp_path, capsys):
    # Rule: an experiment source exports its best leaderboard row's checkpoint and records experiment and trial;
    # the command prints size, parameters, parity, threshold and latency.
    best = random_checkpoint(tmp_path / "a", "tc_resnet", small_dataset, width=0.25, run="best",
                             metrics={"frr_at_target_fa": 0.1}, overrides=("tune.metric=frr_at_target_fa",))
    other = random_checkpoint(tmp_path / "b", "ds_cnn", small_dataset, width=0.25, run="other",
                              metrics={"frr_at_target_fa": 0.2}, overrides=("tune.metric=frr_at_target_fa",))
    experiment = write_experiment(tmp_path / "runs", {"best": best, "other": other})
    out = tmp_path / "export" / "model.onnx"
    assert main(["export", str(experiment), "--out", str(out), "--data", str(small_dataset)]) == 0
    printed = capsys.readouterr().out
    for words in ("KB", "parameters", "parity with PyTorch", "threshold", "ms per 1 s window"):
        assert words in printed
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["student"]["name"] == "tc_resnet"
    assert card["source"]["experiment"] == str(experiment) and card["source"]["trial"] == "best"


def test_leaderboard_checkpoint_outside_the_experiment_is_refused(small_dataset, tmp_path):
    # Rule: a leaderboard is data; a row whose checkpoint lies outside the experiment directory (here another
    # experiment's student, signed with the same key) is refused, wherever the row stands.
    experiment = write_experiment(tmp_path / "runs", {"t": trial_checkpoint(tmp_path, small_dataset, "t", 0.5)})
    elsewhere = copy_checkpoint(trial_checkpoint(tmp_path, small_dataset, "u", 0.0), tmp_path / "runs",
                                "other/trial_u/train/checkpoint_000001")
    rows = json.loads((experiment / "leaderboard.json").read_text())
    for board in ([{"trial": "u", "checkpoint": elsewhere}, *rows], [*rows, {"trial": "u", "checkpoint": elsewhere}]):
        storage.write_json(experiment.parent, "sweep/leaderboard.json", board)
        with pytest.raises(storage.PathEscapeError, match="other/trial_u.* lies outside the experiment directory"):
            locate_source(str(experiment), load_config(None, check_paths=False))


def test_the_verified_manifests_choose_the_best_trial_not_the_leaderboard(small_dataset, tmp_path, monkeypatch,
                                                                          caplog):
    # Rule: export ranks the experiment's trials by the metric their signed manifests hold; reordering the unsigned
    # leaderboard's rows changes nothing but a warning.
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    trials = {t: trial_checkpoint(tmp_path, small_dataset, t, frr) for t, frr in (("aa", 0.4), ("bb", 0.1),
                                                                                  ("cc", 0.7))}
    experiment = write_experiment(tmp_path / "runs", trials)
    config = load_config(None, check_paths=False)
    assert locate_source(str(experiment), config).trial == "bb"
    rows = json.loads((experiment / "leaderboard.json").read_text())
    storage.write_json(experiment.parent, "sweep/leaderboard.json", sorted(rows, key=lambda r: r["trial"] != "cc"))
    located = locate_source(str(experiment), config)
    assert located.trial == "bb" and located.rel_dir.startswith("sweep/trial_bb_")
    assert "names" in caplog.text and "trial_cc" in caplog.text


def test_a_tie_goes_to_the_leaderboards_pick_and_rays_own_files_are_not_checkpoints(small_dataset, tmp_path, caplog):
    # Rule: among trials tied on the metric the leaderboard's order decides, silently (it cannot promote a worse one);
    # Ray's checkpoint_manager_snapshot.json beside the checkpoints is not a checkpoint, so no warning names it.
    trials = {t: trial_checkpoint(tmp_path, small_dataset, t, 0.3) for t in ("aa", "bb")}
    experiment = write_experiment(tmp_path / "runs", trials)
    for trial in trials:
        (next(experiment.glob(f"trial_{trial}*")) / "train" / "checkpoint_manager_snapshot.json").write_text("{}")
    rows = json.loads((experiment / "leaderboard.json").read_text())
    for first in ("aa", "bb"):
        storage.write_json(experiment.parent, "sweep/leaderboard.json", sorted(rows, key=lambda r: r["trial"] != first))
        assert locate_source(str(experiment), load_config(None, check_paths=False)).trial == first
    assert "names" not in caplog.text and "snapshot" not in caplog.text


def test_a_trial_of_another_experiment_copied_in_is_refused(small_dataset, tmp_path, monkeypatch):
    # Rule: a signed student of another sweep (another wake word) copied into this experiment's trials, however good
    # its figures, is refused: every trial of one sweep shares its data, features and tune settings.
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    ours = trial_checkpoint(tmp_path, small_dataset, "aa", 0.3)
    theirs = trial_checkpoint(tmp_path, small_dataset, "zz", 0.0, "data.wakeword=hey jarvis")
    experiment = write_experiment(tmp_path / "runs", {"aa": ours, "zz": theirs})
    with pytest.raises(InputError, match="trial_zz.* was trained with other data settings"):
        locate_source(str(experiment), load_config(None, check_paths=False))


def test_a_checkpoint_in_another_trials_folder_is_skipped(small_dataset, tmp_path, monkeypatch, caplog):
    # Rule: a checkpoint verifies only as the student of the trial whose folder holds it: trial bb's best student
    # renamed into trial aa's folder does not count for either.
    monkeypatch.setenv(ENV_SIGNING_KEY, KEY)
    experiment = write_experiment(tmp_path / "runs", {"aa": trial_checkpoint(tmp_path, small_dataset, "aa", 0.5)})
    copy_checkpoint(trial_checkpoint(tmp_path, small_dataset, "bb", 0.0), experiment.parent,
                    "sweep/trial_aa_cnn_linear/train/checkpoint_000002")
    assert locate_source(str(experiment), load_config(None, check_paths=False)).rel_dir.endswith("_000001")
    assert "named 'bb', expected 'student' checkpoint named 'aa'" in caplog.text


def test_locate_source_reads_checkpoints_and_experiments_on_s3(small_dataset, tmp_path, s3_bucket, moto_s3):
    # Rule: s3:// sources go through the same Storage API: a checkpoint directory and an experiment's best trial.
    local = trial_checkpoint(tmp_path, small_dataset, "x", 0.2)
    store = storage.Storage.from_uri(f"s3://{s3_bucket}/runs", endpoint_override=moto_s3)
    copy_checkpoint(local, store, "checkpoint")
    path = copy_checkpoint(local, store, "sweep/trial_x/train/checkpoint_000001")
    storage.write_json(store, "sweep/leaderboard.json", [{"trial": "x", "checkpoint": path}])
    config = load_config(None, overrides=[f"storage.endpoint_override={moto_s3}"], check_paths=False)
    expected = load_checkpoint(local.parent, local.name).manifest
    assert locate_source(f"s3://{s3_bucket}/runs/checkpoint", config).load().manifest == expected
    located = locate_source(f"s3://{s3_bucket}/runs/sweep", config)
    assert located.trial == "x" and located.load().manifest == expected
    storage.write_json(store, "sweep/leaderboard.json", [{"trial": "y", "checkpoint": path}])
    assert locate_source(f"s3://{s3_bucket}/runs/sweep", config).trial == "x"  # its folder names it, no row


# ---------------------------------------------------------------- detection


@pytest.mark.slow
def test_detect_finds_each_wake_word_in_a_stream(detector, wake_stream):
    # Rule: streaming detection fires once per wake word, within 0.5 s of its centre.
    audio, centres = wake_stream
    times = detector.detect(audio)
    assert len(times) == len(centres), (times, centres)
    for time_s, centre in zip(times, centres, strict=True):
        assert abs(time_s - centre) <= TOLERANCE_S, (times, centres)


@pytest.mark.slow
def test_detect_fires_nothing_on_negative_audio(exported, detector, small_data):
    # Rule: audio without the wake word gives no detection: the val negatives at the card's own threshold (calibrated
    # there for the target FA/h, i.e. none in a few minutes), and background audio at the fixed threshold.
    assert detect.Detector(exported[0]).detect(small_data.val_stream.numpy()) == []
    assert detector.detect(np.concatenate(clips_of(small_data.train, "background"))) == []


@pytest.mark.slow
def test_cli_detect_reads_any_rate_and_channels(exported, wake_stream, small_data, tmp_path, capsys):
    # Rule: `kd-tune detect` downmixes and resamples any file to the model's rate and prints one line per file.
    audio, centres = wake_stream
    stereo = AF.resample(torch.from_numpy(audio), SAMPLE_RATE, 48000).numpy()  # an independent resampler
    wake_file, quiet_file = tmp_path / "wake.wav", tmp_path / "quiet.flac"
    sf.write(wake_file, np.stack([stereo * 0.8, stereo * 1.2], axis=1), 48000)
    sf.write(quiet_file, np.concatenate(clips_of(small_data.train, "background")), SAMPLE_RATE)
    model = str(exported[0])
    assert main(["detect", model, str(wake_file), str(quiet_file), "--threshold", str(DETECT_THRESHOLD)]) == 0
    wake_line, quiet_line = capsys.readouterr().out.splitlines()
    assert quiet_line == f"{quiet_file}: no wake word"
    prefix = f"{wake_file}: wake word at "
    assert wake_line.startswith(prefix)
    times = [float(t.removesuffix(" s")) for t in wake_line.removeprefix(prefix).split(", ")]
    assert len(times) == len(centres) and all(abs(t - c) <= TOLERANCE_S for t, c in zip(times, centres, strict=True))


@pytest.mark.slow
def test_detector_imports_and_runs_without_torch(exported, tmp_path):
    # Rule: detection needs only onnxruntime, numpy and soundfile: it works where torch cannot be imported.
    wav = tmp_path / "silence.wav"
    sf.write(wav, np.zeros(SAMPLE_RATE * 2, np.float32), SAMPLE_RATE)
    code = ("import sys; sys.modules['torch'] = None  # any `import torch` now raises\n"
            "from kd_tune.deploy.detect import Detector\n"
            "detector = Detector(sys.argv[1])\n"
            "print(detector.detect(detector.read(sys.argv[2])))\n")
    result = subprocess.run([sys.executable, "-c", code, str(exported[0]), str(wav)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_streaming_form_is_exported_checked_and_used_by_the_detector(exported, wake_stream, tmp_path, caplog):
    # Rule: --streaming writes model.stream.onnx, named and hashed in the signed card once its probabilities over the
    # whole val stream equal the windowed model's within 1e-5; Detector uses it, with the windowed model's answers.
    # The int8 card names no streaming form (its threshold belongs to the int8 model), and a streaming file changed
    # after export is refused like the model itself.
    out, card = exported
    entry = card["streaming"]
    stream_path = out.with_name("model.stream.onnx")
    assert entry["onnx_file"] == stream_path.name and entry["hop_samples"] == card["hop_samples"]
    assert entry["onnx_sha256"] == hashlib.sha256(stream_path.read_bytes()).hexdigest()
    assert entry["parity_max_abs_diff"] <= export.STREAM_PARITY_TOLERANCE and entry["parity_windows"] > 0
    streaming, windowed = detect.Detector(out), detect.Detector(out, streaming=False)
    assert streaming.stream_session is not None and windowed.stream_session is None
    audio, _ = wake_stream
    np.testing.assert_allclose(streaming.probabilities(audio), windowed.probabilities(audio), rtol=0, atol=1e-5)
    assert "streaming" not in json.loads(out.with_name("model.int8.json").read_text())
    for name in ("model.onnx", "model.json", "model.stream.onnx"):
        shutil.copy(out.with_name(name), tmp_path / name)
    with open(tmp_path / "model.stream.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(detect.DetectError, match="model.stream.onnx: does not match streaming.onnx_sha256"):
        detect.Detector(tmp_path / "model.onnx")
    assert detect.Detector(tmp_path / "model.onnx", streaming=False).stream_session is None
    # Left behind, the streaming form costs speed, not answers: a warning, then window by window.
    (tmp_path / "model.stream.onnx").unlink()
    with caplog.at_level(logging.WARNING, logger="kd_tune.deploy.detect"):
        assert detect.Detector(tmp_path / "model.onnx").stream_session is None
    assert "model.stream.onnx named in its card is missing" in caplog.text


@pytest.mark.slow
def test_detector_refuses_a_model_changed_after_export(exported, tmp_path):
    # Rule: the card's threshold belongs to one file: a modified model is refused, naming the mismatch; so is a
    # threshold that is not a probability (exit 2 from the command line for both, as for any invalid input).
    out, _ = exported
    for name in ("model.onnx", "model.json"):
        shutil.copy(out.with_name(name), tmp_path / name)
    with open(tmp_path / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(detect.DetectError, match="onnx_sha256"):
        detect.Detector(tmp_path / "model.onnx")
    with pytest.raises(detect.DetectError, match="threshold: got 1.5; allowed: a probability"):
        detect.Detector(out, threshold=1.5)
    assert main(["detect", str(tmp_path / "model.onnx"), str(out)]) == 2
    assert main(["detect", str(out), str(out), "--threshold", "1.5"]) == 2  # the card's own check, one line
