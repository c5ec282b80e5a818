"""Wake-word data sets: scanning folders, file checks, loading, and deterministic splits.

Two layouts are read (see `scan`): a folder with manifest.jsonl (what kd_tune.synth writes), or a folder with
positive/ and negative/ (optionally hard_negative/ and background/) holding WAV or FLAC files at any sample rate and
channel count.
"""

from __future__ import annotations


import hashlib
import io
import json
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torch import Tensor

from kd_tune.features import N_SAMPLES, SAMPLE_RATE

FORMAT_VERSION = 1  # of manifest.jsonl + dataset.json; bump when the same parameters would give different audio
KINDS = ("positive", "hard_negative", "negative", "background")
LABEL_OF_KIND = {"positive": 1, "hard_negative": 0, "negative": 0, "background": 0}
SPLITS = ("train", "val", "test")
REQUIRED_FOLDERS = ("positive", "negative")
AUDIO_SUFFIXES = (".wav", ".flac")
EXPECTED_LAYOUT = ("a folder with manifest.jsonl, or with positive/ and negative/ (optionally hard_negative/ and "
                   "background/) holding .wav or .flac files")
LOAD_THREADS = 4

# `check` thresholds; files with an UNUSABLE problem are skipped by `load_dataset`, the others only reported
SILENT_PEAK = 1e-4
CLIPPED_LEVEL = 0.999
CLIPPED_FRACTION = 0.01
MIN_SECONDS = 0.3
MAX_SECONDS = 10.0
UNUSABLE = frozenset({"unreadable", "not audio", "empty", "non-finite", "silent", "too long"})


def split_for(key: str, *, val_fraction: float = 0.15, test_fraction: float = 0.15) -> str:
    """The split of a group key (speaker, voice + text, file path): a hash, so it never changes between runs."""
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction!r} and test_fraction {test_fraction!r} must be >= 0 and sum "
                         "to less than 1")
    position = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64  # uniform in [0, 1)
    if position < test_fraction:
        return "test"
    return "val" if position < test_fraction + val_fraction else "train"


# --------------------------------------------------------------------------------------------------- text


# --------------------------------------------------------------------------------------------------- synthesis


# --------------------------------------------------------------------------------------------------- user data


@dataclass(frozen=True)
class ClipInfo:
    path: Path
    label: int
    kind: str
    split: str
    text: str | None = None
    voice: str = ""


def speaker_of(file_name: str) -> str | None:
    """The speaker id of a `<speaker>_<anything>` file name."""
    stem = Path(file_name).stem
    return (stem.split("_", 1)[0] or None) if "_" in stem else None


def folder_files(root: Path, kind: str) -> list[Path]:
    """Every non-hidden file under root/kind, sorted."""
    folder = root / kind
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def read_manifest(root: Path) -> list[ClipInfo]:
    manifest = root / "manifest.jsonl"
    clips = []
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            relative, kind, split, label = PurePosixPath(entry["path"]), entry["kind"], entry["split"], entry["label"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{manifest}:{number}: not a clip entry ({error}); expected a JSON object with path, "
                             "label, kind, split") from error
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"{manifest}:{number}: path {str(relative)!r} leaves the data set (allowed: a path "
                             "relative to the manifest's folder)")
        if kind not in KINDS or split not in SPLITS or label != LABEL_OF_KIND[kind]:
            raise ValueError(f"{manifest}:{number}: kind {kind!r}, split {split!r}, label {label!r} (allowed: kind "
                             f"in {KINDS}, split in {SPLITS}, label {LABEL_OF_KIND})")
        clips.append(ClipInfo(root / relative, label, kind, split, entry.get("text"), entry.get("voice", "")))
    return clips


def scan(root: str | Path) -> list[ClipInfo]:
    """Every clip of a data set folder (manifest.jsonl or class folders), with its label, kind and split.

    In class folders the split comes from a hash of the speaker id when file names look like
    `<speaker>_<anything>` (so a speaker never straddles splits), else of the file's path relative to root.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist (expected {EXPECTED_LAYOUT})")
    if (root / "manifest.jsonl").is_file():
        return read_manifest(root)
    missing = [f"{root / name}/" for name in REQUIRED_FOLDERS if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing: expected {EXPECTED_LAYOUT}")
    clips = []
    for kind in KINDS:
        for path in folder_files(root, kind):
            if path.suffix.lower() in AUDIO_SUFFIXES:
                speaker = speaker_of(path.name)
                key = speaker or path.relative_to(root).as_posix()
                clips.append(ClipInfo(path, LABEL_OF_KIND[kind], kind, split_for(key), voice=speaker or ""))
    return clips


def find_problems(audio: np.ndarray, sample_rate: int) -> list[tuple[str, str]]:
    """(problem, detail) pairs of decoded audio [T, C]; see the thresholds at the top of the module."""
    if audio.size == 0:
        return [("empty", "no samples")]
    if not np.isfinite(audio).all():
        return [("non-finite", "NaN or infinite samples")]
    problems = []
    magnitude = np.abs(audio)
    if magnitude.max() < SILENT_PEAK:
        problems.append(("silent", f"peak {magnitude.max():.1e} < {SILENT_PEAK:.0e}"))
    clipped = float(np.mean(magnitude >= CLIPPED_LEVEL))
    if clipped >= CLIPPED_FRACTION:
        problems.append(("clipped", f"{clipped:.1%} of samples at |x| >= {CLIPPED_LEVEL}"))
    seconds = audio.shape[0] / sample_rate
    if seconds < MIN_SECONDS:
        problems.append(("too short", f"{seconds:.2f} s < {MIN_SECONDS} s"))
    if seconds > MAX_SECONDS:
        problems.append(("too long", f"{seconds:.1f} s > {MAX_SECONDS} s"))
    return problems


@dataclass(frozen=True)
class AudioFile:
    """One decoded audio file: samples [T, C] (None when unreadable), its problems and the sha256 of its bytes."""

    path: Path
    audio: np.ndarray | None
    sample_rate: int
    problems: list[tuple[str, str]]
    sha256: str

    @staticmethod
    def read(path: Path) -> "AudioFile":
        try:
            data = path.read_bytes()
        except OSError as error:
            return AudioFile(path, None, 0, [("unreadable", str(error))], "unreadable")
        digest = hashlib.sha256(data).hexdigest()
        try:
            audio, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except sf.SoundFileError as error:
            return AudioFile(path, None, 0, [("unreadable", str(error).strip() or type(error).__name__)], digest)
        return AudioFile(path, audio, sample_rate, find_problems(audio, sample_rate), digest)

    @property
    def usable(self) -> bool:
        return self.audio is not None and not any(problem in UNUSABLE for problem, _ in self.problems)


@dataclass(frozen=True)
class Problem:
    path: Path
    problem: str  # "unreadable", "empty", "silent", ...
    detail: str
    skipped: bool  # whether load_dataset skips the file


@dataclass(frozen=True)
class CheckReport:
    root: Path
    clips_per_kind: dict[str, int]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"{p.path}: {p.problem} ({p.detail}){', skipped when loading' if p.skipped else ''}"
                 for p in self.problems]
        kinds = ", ".join(f"{kind} {self.clips_per_kind.get(kind, 0)}" for kind in KINDS)
        lines.append(f"{self.root}: {sum(self.clips_per_kind.values())} clips ({kinds})")
        by_problem = Counter(p.problem for p in self.problems)
        lines.append("problems: " + (", ".join(f"{name} {n}" for name, n in sorted(by_problem.items())) or "none"))
        return "\n".join(lines)


def check(root: str | Path) -> CheckReport:
    """Every unreadable, empty, silent, clipped, non-finite, too short or too long file of a data set."""
    root = Path(root)
    clips = scan(root)
    problems = [Problem(f.path, name, detail, name in UNUSABLE)
                for f in read_all([c.path for c in clips]) for name, detail in f.problems]
    if not (root / "manifest.jsonl").is_file():
        problems += [Problem(path, "not audio", f"not a {' or '.join(AUDIO_SUFFIXES)} file, ignored", True)
                     for kind in KINDS for path in folder_files(root, kind)
                     if path.suffix.lower() not in AUDIO_SUFFIXES]
    return CheckReport(root, dict(Counter(c.kind for c in clips)), problems)


# --------------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Split:
    audio: Tensor  # [N, N_SAMPLES] float32
    labels: Tensor  # [N] int64
    kinds: list[str]

    def of_kind(self, kind: str) -> Tensor:
        """The clips of one kind [N_kind, N_SAMPLES], e.g. "background" for the noise bank."""
        return self.audio[[k == kind for k in self.kinds]]


@dataclass(frozen=True)
class WakewordData:
    train: Split
    val: Split
    test: Split
    skipped: int  # unusable files left out
    root: Path
    manifest_sha256: str  # of the clip list and every file's bytes: a cache key for anything derived from the data

    def negative_stream(self, split: str = "val") -> Tensor:
        """Every label-0 clip of a split end to end [N_neg * N_SAMPLES]: long audio for false accepts per hour."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        part = getattr(self, split)
        return part.audio[part.labels == 0].reshape(-1)


def read_all(paths: list[Path]) -> list[AudioFile]:
    with ThreadPoolExecutor(max_workers=LOAD_THREADS) as pool:  # libsndfile and file reads release the GIL
        return list(pool.map(AudioFile.read, paths))


def fit_length(audio: Tensor, n_samples: int) -> Tensor:
    """Audio [T] cropped or zero-padded, centred, to [n_samples]."""
    if len(audio) >= n_samples:
        start = (len(audio) - n_samples) // 2
        return audio[start:start + n_samples]
    pad = n_samples - len(audio)
    return F.pad(audio, (pad // 2, pad - pad // 2))


def to_window(file: AudioFile, sample_rate: int, n_samples: int) -> Tensor:
    """Mono [n_samples] at sample_rate from a decoded file."""
    mono = torch.from_numpy(file.audio.mean(axis=1))  # [T]
    if file.sample_rate != sample_rate:
        mono = AF.resample(mono, file.sample_rate, sample_rate)
    return fit_length(mono, n_samples)


def make_split(clips: list[ClipInfo], windows: list[Tensor], n_samples: int) -> Split:
    audio = torch.stack(windows) if windows else torch.zeros(0, n_samples)
    return Split(audio.float(), torch.tensor([c.label for c in clips], dtype=torch.int64), [c.kind for c in clips])


def manifest_sha256(root: Path, clips: list[ClipInfo], files: list[AudioFile]) -> str:
    lines = sorted(f"{c.path.relative_to(root).as_posix()}\t{c.label}\t{c.kind}\t{c.split}\t{f.sha256}\n"
                   for c, f in zip(clips, files, strict=True))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def require_both_classes(root: Path, clips: list[ClipInfo], splits: dict[str, Split]) -> None:
    """Training needs usable positives and negatives; val/test without one class only warn."""
    for label, name in ((1, "positive"), (0, "negative")):
        listed = sum(c.label == label for c in clips)
        where = root / "manifest.jsonl" if (root / "manifest.jsonl").is_file() else root / name
        if not (splits["train"].labels == label).any():
            in_train = sum(c.label == label and c.split == "train" for c in clips)
            raise ValueError(f"no usable {name} clips for training in {where}: {listed} listed, {in_train} of them in "
                             f"the train split, none of those usable (run `kd-tune data check {root}`; splits come "
                             "from a hash of the speaker id or file path, so add files from more speakers)")
        for split in ("val", "test"):
            if not (splits[split].labels == label).any():
                warnings.warn(f"the {split} split of {root} has no usable {name} clips; its metrics will be partial",
                              stacklevel=3)


def load_dataset(root: str | Path, *, sample_rate: int = SAMPLE_RATE) -> WakewordData:
    """Read every clip as mono at sample_rate, fitted (centred) to one clip length, grouped by split.

    Unusable files (unreadable, empty, non-finite, silent, too long) are skipped and counted; clipped or short files
    load as they are. A train split without usable positives or negatives is an error.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0 Hz, got {sample_rate!r}")
    root = Path(root)
    clips = scan(root)
    n_samples = N_SAMPLES * sample_rate // SAMPLE_RATE
    files = read_all([c.path for c in clips])
    skipped = sum(not f.usable for f in files)
    if skipped:
        warnings.warn(f"skipped {skipped} unusable audio files under {root}; `kd-tune data check {root}` lists them",
                      stacklevel=2)
    splits = {}
    for split in SPLITS:
        kept = [(c, f) for c, f in zip(clips, files, strict=True) if c.split == split and f.usable]
        splits[split] = make_split([c for c, _ in kept], [to_window(f, sample_rate, n_samples) for _, f in kept],
                                   n_samples)
    require_both_classes(root, clips, splits)
    return WakewordData(**splits, skipped=skipped, root=root, manifest_sha256=manifest_sha256(root, clips, files))


def sample_weights(kinds: list[str], *, hard_negative_weight: float) -> Tensor:
    """Per-clip loss weights [N]: hard negatives get hard_negative_weight, every other clip 1."""
    if not hard_negative_weight > 0:
        raise ValueError(f"hard_negative_weight must be > 0, got {hard_negative_weight!r}")
    return torch.tensor([hard_negative_weight if k == "hard_negative" else 1.0 for k in kinds], dtype=torch.float32)
