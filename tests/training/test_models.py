import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from kd_tune.audio.features import N_FRAMES, N_MELS, N_SAMPLES, LogMel
from kd_tune.training.models import STUDENTS, TEACHERS, TeacherSourceError, build_student, build_teacher, \
    count_parameters, teacher_input_kind

STUDENT_BUDGET = 100_000  # parameters at width 1.0
FEATURE_TEACHERS = {"cnn"}


def log_mels(batch: int, seed: int = 0, n_mels: int = N_MELS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n_mels, N_FRAMES, generator=generator) - 5.0  # [B, n_mels, T], log-mel-like offset


def clips(batch: int, seed: int = 0) -> torch.Tensor:
    return 0.1 * torch.randn(batch, N_SAMPLES, generator=torch.Generator().manual_seed(seed))  # [B, N]


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path) -> onnxruntime.InferenceSession:
    torch.onnx.export(model, (example,), path, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_student_contract(name, tmp_path):
    # Rule: every registered student maps log-mels [B, n_mels, T] to finite logits [B, 2], fits the parameter budget,
    # trains (gradients reach every parameter) and exports to ONNX (legacy, dynamic batch) matching torch to 1e-4.
    model = build_student(name)
    assert model.input_kind == "features" and teacher_input_kind(model) == "features"
    assert 20_000 <= count_parameters(model) <= STUDENT_BUDGET
    logits = model(log_mels(4))
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    model.eval()
    session = export_onnx(model, log_mels(2), tmp_path / f"{name}.onnx")
    for batch in (1, 3):
        x = log_mels(batch, seed=batch)
        (got,) = session.run(None, {"x": x.numpy()})
        np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_student_width_and_n_mels_knobs(name):
    # Rule: width scales the student's size; n_mels sets its input bands.
    sizes = [count_parameters(build_student(name, width=w)) for w in (0.5, 1.0, 2.0)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    assert build_student(name, n_mels=64)(log_mels(2, n_mels=64)).shape == (2, 2)


def test_unknown_names_list_the_known_ones():
    # Rule: registries are plain dicts; an unknown name is an error that lists the known names.
    with pytest.raises(ValueError, match="unknown student 'nope'.*bc_resnet, ds_cnn, tc_resnet"):
        build_student("nope")
    with pytest.raises(ValueError, match="unknown teacher 'nope'.*cnn, data2vec_audio, hubert, wav2vec2"):
        build_teacher("nope")
    with pytest.raises(ValueError, match="width must be > 0, got 0"):
        build_student("ds_cnn", width=0)


@pytest.mark.parametrize("arch", sorted(TEACHERS))
def test_teacher_contract(arch):
    # Rule: every registered teacher builds offline from source "tiny" and maps 2 x 1 s to finite logits [2, 2]
    # from the input its input_kind names (whisper included: 1 s, no 30 s padding).
    teacher = build_teacher(arch, source="tiny").eval()
    kind = "features" if arch in FEATURE_TEACHERS else "waveform"
    assert teacher_input_kind(teacher) == kind
    x = LogMel()(clips(2)) if kind == "features" else clips(2)
    with torch.no_grad():
        logits = teacher(x)
    assert type(logits) is torch.Tensor and logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_cnn_teacher_sizes():
    # Rule: the local CNN teacher is a few million parameters at "base" and ~200k at "tiny"; other sources are errors.
    assert 2_000_000 <= count_parameters(build_teacher("cnn")) <= 5_000_000
    assert 100_000 <= count_parameters(build_teacher("cnn", source="tiny")) <= 300_000
    with pytest.raises(ValueError, match="'huge'.*base, tiny"):
        build_teacher("cnn", source="huge")


def test_freeze_feature_encoder():
    # Rule: HF teachers can freeze their conv feature encoder (the default for fine-tuning); whisper has none.
    teacher = build_teacher("wav2vec2", source="tiny")
    teacher.freeze_feature_encoder()
    frozen = [p.requires_grad for p in teacher.model.wav2vec2.feature_extractor.parameters()]
    assert frozen and not any(frozen)
    assert any(p.requires_grad for p in teacher.parameters())
    build_teacher("whisper", source="tiny").freeze_feature_encoder()


def test_local_directory_round_trip(tmp_path):
    # Rule: a directory written by save_pretrained loads through from_pretrained (the path users take for real weights).
    teacher = build_teacher("wav2vec2", source="tiny").eval()
    teacher.model.save_pretrained(tmp_path)
    loaded = build_teacher("wav2vec2", source=str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(clips(2)), teacher(clips(2)))


def test_whisper_checkpoint_positions_are_cut_to_one_second(tmp_path):
    # Rule: a pretrained 30 s whisper checkpoint loads with its position embeddings sliced to the first 50 rows.
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=8,
                           pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1,
                           max_target_positions=8)
    full = WhisperForConditionalGeneration(config)
    full.save_pretrained(tmp_path)
    teacher = build_teacher("whisper", source=str(tmp_path))
    positions = teacher.model.encoder.embed_positions.weight
    torch.testing.assert_close(positions, full.model.encoder.embed_positions.weight[:50])
    assert teacher(clips(2)).shape == (2, 2)


def test_whisper_front_end_matches_its_feature_extractor():
    # Rule: the whisper teacher computes Whisper's own log-mel features (80 slaney mels, log10, peak-8 floor) on 1 s.
    from transformers import WhisperFeatureExtractor

    teacher, wave = build_teacher("whisper", source="tiny"), clips(1)[0]
    seen = {}
    teacher.model.register_forward_pre_hook(lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True)
    teacher(wave[None])
    reference = WhisperFeatureExtractor()(wave.numpy(), sampling_rate=16000, padding="longest", return_tensors="pt")
    torch.testing.assert_close(seen["input_features"], reference.input_features, rtol=1e-4, atol=1e-4)


def test_missing_local_directory_is_a_clear_error(tmp_path):
    # Rule: a source that is neither a size nor loadable fails with a message naming it.
    with pytest.raises(TeacherSourceError, match="could not load teacher source '.*missing': no such directory"):
        build_teacher("hubert", source=str(tmp_path / "missing"))


@pytest.mark.slow
def test_hub_id_offline_is_a_clear_error():
    # Rule: with HF_HUB_OFFLINE=1 a hub id fails with a message saying what to do (transformers reads it at import,
    # so this runs in a fresh interpreter).
    code = ("from kd_tune.training.models import build_teacher; "
            "build_teacher('wav2vec2', source='facebook/wav2vec2-base')")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "could not load teacher source 'facebook/wav2vec2-base'" in result.stderr
    assert "offline? point source at a local directory" in result.stderr


@pytest.mark.parametrize("arch", ["wav2vec2", "whisper"])
def test_half_precision_teacher_takes_float32_audio(arch):
    # Rule: a teacher cast to a low-precision dtype (distillation.teacher_dtype) still takes float32 waveforms.
    teacher = build_teacher(arch, source="tiny").eval().to(torch.bfloat16)
    with torch.no_grad():
        logits = teacher(clips(2))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
