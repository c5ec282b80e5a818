"""Student and teacher registries: plain dicts of short names -> builder functions.

Students map log-mels [B, n_mels, T] to logits [B, 2] and stay small enough for a microcontroller. Teachers map
either raw audio [B, N_SAMPLES] (input_kind "waveform") or log-mels (input_kind "features") to logits [B, 2]: a local
wide CNN that needs no download, or a transformers speech encoder with a pooled classification head.
"""

from collections.abc import Callable
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_tune.audio.features import N_FRAMES, N_MELS, LogMel
from kd_tune.errors import InputError

if TYPE_CHECKING:  # for the annotations only: transformers is slow to import, and only teachers need it
    from transformers import PreTrainedModel, WhisperForAudioClassification

N_CLASSES = 2  # 0 = not the wake word, 1 = the wake word
INPUT_KINDS = ("waveform", "features")
RANDOM_INIT_SOURCES = ("tiny", "base")


class TeacherSourceError(InputError):
    """A teacher's `source` that loads nothing: no such directory, no network for a hub id, broken files."""


def scaled(channels: float, width: float) -> int:
    return max(1, round(channels * width))


def conv_bn(c_in: int, c_out: int, kernel, *, stride=1, padding=0, dilation=1, groups=1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups, bias=False), nn.BatchNorm2d(c_out)]


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (a strided 1x1 conv when the shape changes), then ReLU; 1-D or 2-D."""

    def __init__(self, c_in: int, c_out: int, *, kernel: int, stride: int = 1, dims: int = 2):
        super().__init__()
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.body = nn.Sequential(
            conv(c_in, c_out, kernel, stride, kernel // 2, bias=False), norm(c_out), nn.ReLU(),
            conv(c_out, c_out, kernel, 1, kernel // 2, bias=False), norm(c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if c_in != c_out or stride != 1:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride, bias=False), norm(c_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


# Every model starts with a per-band BatchNorm: log-mels are not standardised upstream, and a learned per-band affine
# exports to ONNX as a constant.

class DSCNN(nn.Module):
    """DS-CNN-S of Hello Edge (Zhang et al. 2017): a strided 10x4 conv, 4 depthwise-separable blocks, average pool."""

    input_kind, arch = "features", "ds_cnn"

    def __init__(self, *, width: float = 1.0, n_mels: int = N_MELS, channels: int = 64, n_blocks: int = 4):
        super().__init__()
        c = scaled(channels, width)
        self.norm = nn.BatchNorm1d(n_mels)
        # Hello Edge's 10 (time) x 4 (frequency) kernel with stride 2, in our [frequency, time] layout.
        self.stem = nn.Sequential(*conv_bn(1, c, (4, 10), stride=2, padding=(1, 4)), nn.ReLU())
        self.blocks = nn.Sequential(*[
            nn.Sequential(*conv_bn(c, c, 3, padding=1, groups=c), nn.ReLU(), *conv_bn(c, c, 1), nn.ReLU())
            for _ in range(n_blocks)
        ])
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(c, N_CLASSES))

    def forward(self, x: Tensor) -> Tensor:  # x: [B, n_mels, T]
        x = self.stem(self.norm(x).unsqueeze(1))  # [B, C, n_mels / 2, T / 2]
        return self.head(self.blocks(x).mean(dim=(2, 3)))  # [B, 2]


class TCResNet(nn.Module):
    """TC-ResNet8 (Choi et al. 2019): 1-D temporal convs with mel bands as channels, three strided residual blocks."""

    input_kind, arch = "features", "tc_resnet"

    def __init__(self, *, width: float = 1.0, n_mels: int = N_MELS, channels: tuple[int, ...] = (16, 24, 32, 48)):
        super().__init__()
        stem, *stages = [scaled(c, width) for c in channels]
        self.norm = nn.BatchNorm1d(n_mels)
        self.stem = nn.Conv1d(n_mels, stem, 3, padding=1, bias=False)
        c_ins = [stem, *stages[:-1]]
        self.blocks = nn.Sequential(*[ResidualBlock(a, b, kernel=9, stride=2, dims=1)
                                      for a, b in zip(c_ins, stages, strict=True)])
        self.head = nn.Linear(stages[-1], N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, n_mels, T]
        x = self.blocks(self.stem(self.norm(x)))  # [B, C, T / 8]
        return self.head(x.mean(dim=-1))  # [B, 2]


class BCResBlock(nn.Module):
    """Broadcasted residual block: a frequency-wise depthwise conv (2-D part f2), averaged over frequency, a temporal
    depthwise conv (1-D part f1), broadcast back over frequency and added.

    The paper normalises f2 with SubSpectralNorm; plain BatchNorm stands in for it here (fewer parameters, one op).
    """

    def __init__(self, c_in: int, c_out: int, *, freq_stride: int, dilation: int):
        super().__init__()
        self.transition = c_in != c_out
        project = [*conv_bn(c_in, c_out, 1), nn.ReLU()] if self.transition else []
        self.f2 = nn.Sequential(*project, *conv_bn(c_out, c_out, (3, 1), stride=(freq_stride, 1), padding=(1, 0),
                                                   groups=c_out))
        self.f1 = nn.Sequential(
            *conv_bn(c_out, c_out, (1, 3), padding=(0, dilation), dilation=(1, dilation), groups=c_out), nn.SiLU(),
            nn.Conv2d(c_out, c_out, 1, bias=False), nn.Dropout2d(0.1),
        )

    def forward(self, x: Tensor) -> Tensor:  # x: [B, C_in, F, T]
        local = self.f2(x)  # [B, C, F', T]
        out = self.f1(local.mean(dim=2, keepdim=True)) + local  # [B, C, 1, T] broadcast over F'
        return F.relu(out if self.transition else out + x)


class BCResNet(nn.Module):
    """BC-ResNet (Kim et al. 2021); width 1.0 is BC-ResNet-3 (base channels 24), stages of 2, 2, 4, 4 blocks."""

    input_kind, arch = "features", "bc_resnet"

    def __init__(self, *, width: float = 1.0, n_mels: int = N_MELS, base_channels: int = 24):
        super().__init__()
        c = [scaled(base_channels * k, width) for k in (2, 1, 1.5, 2, 2.5, 4)]
        self.norm = nn.BatchNorm1d(n_mels)
        self.stem = nn.Sequential(*conv_bn(1, c[0], 5, stride=(2, 1), padding=2), nn.ReLU())
        blocks = []
        for stage, n_blocks in enumerate((2, 2, 4, 4)):
            c_in, c_out = c[stage], c[stage + 1]
            freq_stride = 2 if stage in (1, 2) else 1
            blocks.append(BCResBlock(c_in, c_out, freq_stride=freq_stride, dilation=2 ** stage))
            blocks += [BCResBlock(c_out, c_out, freq_stride=1, dilation=2 ** stage) for _ in range(n_blocks - 1)]
        self.blocks = nn.Sequential(*blocks)
        # The paper's 5x5 depthwise conv has no frequency padding (it expects exactly 5 bands left); padding it keeps
        # any n_mels working.
        self.head = nn.Sequential(
            nn.Conv2d(c[4], c[4], 5, padding=2, groups=c[4], bias=False),
            *conv_bn(c[4], c[5], 1), nn.ReLU(),
        )
        self.classifier = nn.Linear(c[5], N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, n_mels, T]
        x = self.stem(self.norm(x).unsqueeze(1))  # [B, C0, n_mels / 2, T]
        x = self.head(self.blocks(x))  # [B, C5, n_mels / 8, T]
        return self.classifier(x.mean(dim=(2, 3)))  # [B, 2]


STUDENTS = {"ds_cnn": DSCNN, "tc_resnet": TCResNet, "bc_resnet": BCResNet}


def known(name: str, registry: dict, what: str) -> str:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r} (allowed: {', '.join(sorted(registry))})")
    return name


def build_student(name: str, *, width: float = 1.0, n_mels: int = N_MELS) -> nn.Module:
    """A student from STUDENTS; width multiplies every channel count."""
    if not width > 0:
        raise ValueError(f"student width must be > 0, got {width!r}")
    return STUDENTS[known(name, STUDENTS, "student")](width=width, n_mels=n_mels)


class CNNTeacher(nn.Module):
    """A wide temporal CNN on log-mels (residual 1-D convs over time, mel bands as channels): a teacher that trains
    from scratch, offline, in minutes. A 2-D ResNet of the same budget learned several times slower on this task."""

    input_kind, arch = "features", "cnn"

    def __init__(self, *, widths: tuple[int, ...] = (128, 192, 256, 320), n_mels: int = N_MELS, dropout: float = 0.3):
        super().__init__()
        self.norm = nn.BatchNorm1d(n_mels)
        self.stem = nn.Sequential(nn.Conv1d(n_mels, widths[0], 3, padding=1, bias=False), nn.BatchNorm1d(widths[0]),
                                  nn.ReLU())
        self.blocks = nn.Sequential(*[ResidualBlock(a, b, kernel=9, stride=2, dims=1)
                                      for a, b in pairwise(widths)])
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(widths[-1], N_CLASSES))

    def forward(self, x: Tensor) -> Tensor:  # x: [B, n_mels, T]
        x = self.blocks(self.stem(self.norm(x)))  # [B, C, T / 8]
        return self.head(x.mean(dim=-1))  # [B, 2]


CNN_WIDTHS = {"base": (128, 192, 256, 320), "tiny": (32, 48, 64, 80)}  # ~3.4M and ~0.2M parameters


def build_cnn_teacher(*, source: str, n_mels: int) -> CNNTeacher:
    if source not in CNN_WIDTHS:
        raise ValueError(f"teacher 'cnn' source {source!r} is not a size (allowed: {', '.join(CNN_WIDTHS)})")
    return CNNTeacher(widths=CNN_WIDTHS[source], n_mels=n_mels)


class HFTeacher(nn.Module):
    """A transformers audio classifier behind the teacher interface: raw audio [B, N_SAMPLES] -> logits [B, 2]."""

    input_kind = "waveform"

    def __init__(self, arch: str, model: "PreTrainedModel"):
        super().__init__()
        self.arch, self.model = arch, model

    def forward(self, wave: Tensor) -> Tensor:  # wave: [B, N]
        # Per-utterance zero mean, unit variance, as Wav2Vec2FeatureExtractor(do_normalize=True) does.
        wave = wave.float()  # normalise in float32, then run in the model's dtype (teachers may be cast to half)
        mean, var = wave.mean(-1, keepdim=True), wave.var(-1, unbiased=False, keepdim=True)
        normalised = (wave - mean) / torch.sqrt(var + 1e-7)
        return self.model(input_values=normalised.to(self.model.dtype)).logits  # [B, 2]

    def freeze_feature_encoder(self) -> None:
        """Freeze the conv feature encoder (the usual fine-tuning setup); Whisper has none, so it is left as is."""
        if (freeze := getattr(self.model, "freeze_feature_encoder", None)) is not None:
            freeze()


WHISPER_N_MELS = 80
WHISPER_POSITIONS = N_FRAMES // 2  # 100 mel frames (Whisper drops the last STFT frame) / conv stride 2 = 50


class WhisperTeacher(HFTeacher):
    """Whisper's encoder + pooled head on 1 s of audio, with Whisper's own log-mel front end.

    Whisper pads every input to 30 s (1500 positions); a 1 s clip needs 50, ~50x less work, so the position
    embeddings are cut to the first 50 rows (the sinusoids/pretrained rows of the first second).
    """

    def __init__(self, arch: str, model: "WhisperForAudioClassification"):
        super().__init__(arch, model)
        self.front_end = LogMel(n_mels=WHISPER_N_MELS, mel_scale="slaney")
        truncate_positions(model, WHISPER_POSITIONS)

    def forward(self, wave: Tensor) -> Tensor:  # wave: [B, N]
        mel = self.front_end.power(wave)[..., :-1]  # [B, 80, 100]
        # WhisperFeatureExtractor's normalisation: log10, a floor 8 decades under the clip's peak, then scaling.
        log_mel = torch.log10(mel.clamp_min(1e-10))
        log_mel = torch.maximum(log_mel, log_mel.amax(dim=(1, 2), keepdim=True) - 8.0)
        return self.model(input_features=((log_mel + 4.0) / 4.0).to(self.model.dtype)).logits  # [B, 2]


def truncate_positions(model: "WhisperForAudioClassification", n_positions: int) -> None:
    """Keep the first n_positions rows of a Whisper encoder's position embeddings (no-op when already that short)."""
    encoder = model.encoder
    old = encoder.embed_positions
    if old.num_embeddings == n_positions:
        return
    if old.num_embeddings < n_positions:
        raise ValueError(f"whisper encoder has {old.num_embeddings} positions, fewer than the {n_positions} "
                         "a 1 s clip needs")
    encoder.embed_positions = nn.Embedding.from_pretrained(old.weight[:n_positions].detach().clone(), freeze=True)
    encoder.max_source_positions = model.config.max_source_positions = n_positions


# Tiny encoders: 49 frames per second like the base conv stack (stride 320), hidden 32, 2 layers.
TINY_ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    conv_dim=(32, 32, 32), conv_stride=(5, 8, 8), conv_kernel=(10, 8, 8), num_conv_pos_embeddings=16,
                    num_conv_pos_embedding_groups=4, classifier_proj_size=32)
WHISPER_SIZES = {
    "tiny": dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, classifier_proj_size=32),
    "base": dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048),
}
# arch -> (config class, model class, {size: config overrides}); base = the config defaults
HF_TEACHERS: dict[str, tuple[str, str, dict[str, dict[str, Any]]]] = {
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", {"tiny": TINY_ENCODER, "base": {}}),
    "hubert": ("HubertConfig", "HubertForSequenceClassification", {"tiny": TINY_ENCODER, "base": {}}),
    "wavlm": ("WavLMConfig", "WavLMForSequenceClassification", {"tiny": TINY_ENCODER, "base": {}}),
    # data2vec-audio stacks num_conv_pos_embeddings conv layers of conv_pos_kernel_size instead of one wide conv.
    "data2vec_audio": ("Data2VecAudioConfig", "Data2VecAudioForSequenceClassification",
                       {"tiny": TINY_ENCODER | dict(num_conv_pos_embeddings=2, conv_pos_kernel_size=5), "base": {}}),
    "whisper": ("WhisperConfig", "WhisperForAudioClassification", WHISPER_SIZES),
}


def build_hf_teacher(arch: str, *, source: str, n_mels: int, hf_config: dict | None = None) -> HFTeacher:
    """source "tiny"/"base": random init from a config; anything else: a Hugging Face id or local directory.
    hf_config (a saved model's config.to_dict()) rebuilds that architecture offline, for weights loaded next.

    n_mels is unused: these teachers bring their own front ends.
    """
    import transformers  # slow to import; only teachers need it

    config_name, model_name, sizes = HF_TEACHERS[arch]
    model_class = getattr(transformers, model_name)
    if hf_config is not None:
        model = model_class(getattr(transformers, config_name).from_dict(hf_config))
    elif source in RANDOM_INIT_SOURCES:
        whisper = dict(num_mel_bins=WHISPER_N_MELS, max_source_positions=WHISPER_POSITIONS) if arch == "whisper" else {}
        config = getattr(transformers, config_name)(num_labels=N_CLASSES, **sizes[source], **whisper)
        model = model_class(config)
    else:
        model = from_pretrained(model_class, source)
    return (WhisperTeacher if arch == "whisper" else HFTeacher)(arch, model)


def from_pretrained(model_class, source: str) -> "PreTrainedModel":
    """Load weights with a fresh 2-class head (a head trained for other labels is re-initialised)."""
    if source.startswith(("/", ".")) and not Path(source).is_dir():  # else it reads as a malformed hub id
        raise TeacherSourceError(f"could not load teacher source {source!r}: no such directory; allowed: tiny, base, "
                                 "a Hugging Face id or a directory written by save_pretrained")
    try:
        return model_class.from_pretrained(source, num_labels=N_CLASSES, ignore_mismatched_sizes=True,
                                           dtype=torch.float32)
    except (OSError, ValueError) as error:  # missing files, no network, malformed ids (HFValidationError)
        raise TeacherSourceError(f"could not load teacher source {source!r}: {error}; allowed: a source that loads "
                                 "(offline? point source at a local directory)") from error


TEACHERS: dict[str, Callable[..., nn.Module]] = {
    "cnn": build_cnn_teacher, **{arch: partial(build_hf_teacher, arch) for arch in HF_TEACHERS}}


def build_teacher(arch: str, *, source: str = "base", n_mels: int = N_MELS, hf_config: dict | None = None) -> nn.Module:
    """A teacher from TEACHERS. source: "tiny" or "base" (random init), or for transformers teachers a Hugging Face
    id or a local save_pretrained directory; hf_config: see build_hf_teacher."""
    builder = TEACHERS[known(arch, TEACHERS, "teacher")]
    return builder(source=source, n_mels=n_mels, **({"hf_config": hf_config} if hf_config is not None else {}))


def hf_config(model: nn.Module) -> dict | None:
    """The transformers config of an HF teacher (stored with its weights so it reloads offline); None otherwise."""
    return model.model.config.to_dict() if isinstance(model, HFTeacher) else None


def teacher_input_kind(model: nn.Module) -> str:
    """"waveform" or "features": what the model's forward takes."""
    kind = getattr(model, "input_kind", None)
    if kind not in INPUT_KINDS:
        raise TypeError(f"{type(model).__name__} has input_kind {kind!r} (allowed: {', '.join(INPUT_KINDS)})")
    return kind


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
