"""Wake-word data sets: scanning folders, file checks, loading, deterministic splits and long recordings.

Two layouts are read (see `scan`): a folder with manifest.jsonl (what kd_tune.datasets.synth writes), or a folder with
positive/ and negative/ (optionally hard_negative/ and background/) holding WAV or FLAC files at 8-192 kHz and up to
32 channels. Each file's header is checked before it is decoded, so a tiny file that claims a huge rate or length
costs nothing; an unusable file is skipped and counted, never the end of a run.

Long negative recordings, `<root>/long/<split>/*.wav` (README, "Data"): val's and test's count false activations
per hour; train's become negative windows and the straddle windows the teacher labels (`straddle_windows`). A split
without them falls back to its negative and background clips joined end to end, never its hard negatives: "hey"
then "nova" would join into the wake word.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_tune.audio.features import N_SAMPLES, SAMPLE_RATE
from kd_tune.audio.io import AUDIO_SUFFIXES, MAX_STREAM_HOURS, UNUSABLE, AudioFile, files_under, read_recording
from kd_tune.audio.samples import resample
from kd_tune.config import DataConfig
from kd_tune.errors import DataError, KdTuneError, shown
from kd_tune.signing import read_regular

FORMAT_VERSION = 5  # of manifest.jsonl + dataset.json; bump when the same parameters would give other audio or splits
KINDS = ("positive", "hard_negative", "negative", "background")
LABEL_OF_KIND = {"positive": 1, "hard_negative": 0, "negative": 0, "background": 0}
WINDOW_KIND = "long"  # a window of the training split's long recordings, a negative
STRADDLE_KIND = "straddle"  # a window that cuts a training positive inside long audio: only a teacher labels it
UNLABELLED = -1  # the label of a straddle window: it adds to the distillation term, never to the cross-entropy
# How far a straddle window is shifted off its positive clip, as a fraction of a window: from most of the wake word in
# it to a sliver of it.
STRADDLE_SHIFT = (0.1, 0.7)
STRADDLE_SEED = 0
SPLITS = ("train", "val", "test")
REQUIRED_FOLDERS = ("positive", "negative")
EXPECTED_LAYOUT = ("a folder with manifest.jsonl, or with positive/ and negative/ (optionally hard_negative/ and "
                   "background/) holding .wav or .flac files")
LOAD_THREADS = 4
MAX_MANIFEST_BYTES = 64 * 2**20  # ~400k clip lines; read whole, so capped
CLASS_NAMES = {1: "positive", 0: "negative"}
LONG_FOLDER = "long"


class MissingDataError(KdTuneError, FileNotFoundError):
    """A data set folder, or one of its required class folders, does not exist."""

    exit_code = 2


def split_for(key: str, *, val_fraction: float = 0.15, test_fraction: float = 0.15) -> str:
    """The split of a group key (speaker, voice + text, file path): a hash, so it never changes between runs."""
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction!r} and test_fraction {test_fraction!r} must be >= 0 and sum "
                         "to less than 1")
    position = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64  # uniform in [0, 1)
    if position < test_fraction:
        return "test"
    return "val" if position < test_fraction + val_fraction else "train"


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


def split_of_file(path: Path, root: Path) -> str:
    """The split of a file in root's class folders: a hash of its speaker id (so a speaker never straddles splits),
    else of its path relative to root. `scan` and `kd-tune data add` split by this one rule."""
    return split_for(speaker_of(path.name) or path.relative_to(root).as_posix())


def folder_files(root: Path, kind: str) -> list[Path]:
    """Every non-hidden entry but folders under root/kind, sorted: a FIFO or device named like a clip is listed, so
    that reading it counts it as unreadable (kd_tune.audio.io.AudioFile) instead of its leaving no trace."""
    return files_under(root / kind) if (root / kind).is_dir() else []


def read_manifest(root: Path) -> list[ClipInfo]:
    manifest = root / "manifest.jsonl"
    lines = read_text_within(manifest, MAX_MANIFEST_BYTES).splitlines()
    real_root = os.path.realpath(root)
    return [manifest_entry(root, line, where=f"{manifest}:{number}", real_root=real_root)
            for number, line in enumerate(lines, start=1) if line.strip()]


def read_text_within(path: Path, max_bytes: int) -> str:
    """A UTF-8 file's text, refused (DataError) past max_bytes or when unreadable."""
    try:
        data = read_regular(path, max_bytes)
        if data is None:
            raise DataError(f"{path}: larger than {max_bytes} bytes; allowed: up to that size")
        return data.decode("utf-8")
    except OSError as error:
        raise DataError(f"{path}: cannot read it ({error.strerror or error}); allowed: a readable file") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 (byte offset {error.start}); allowed: UTF-8 JSON lines") from None


def manifest_entry(root: Path, line: str, *, where: str, real_root: str | None = None) -> ClipInfo:
    """One manifest line as a clip; `where` (`manifest.jsonl:N`) starts every refusal. real_root: root with every
    link resolved, when the caller has it already."""
    expected = "allowed: a JSON object with path, label, kind, split (and optional text, voice)"
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError) as error:  # RecursionError: JSON nested thousands deep
        raise DataError(f"{where}: not JSON ({str(error)[:100]}); {expected}") from None
    if not isinstance(entry, dict) or not {"path", "label", "kind", "split"} <= entry.keys():
        raise DataError(f"{where}: not a clip entry (got {shown(entry)}); {expected}")
    path, kind, split, label = entry["path"], entry["kind"], entry["split"], entry["label"]
    text, voice = entry.get("text"), entry.get("voice", "")
    if not (isinstance(path, str) and isinstance(voice, str) and (text is None or isinstance(text, str))):
        raise DataError(f"{where}: path {shown(path)}, text {shown(text)}, voice {shown(voice)}; allowed: path and "
                        "voice strings, text a string or null")
    relative = PurePosixPath(path)
    # realpath resolves every link on the way, so a folder linked out of the set is caught like `..`
    if (not path or "\0" in path or relative.is_absolute() or ".." in relative.parts
            or not Path(os.path.realpath(root / relative)).is_relative_to(real_root or os.path.realpath(root))):
        raise DataError(f"{where}: path {shown(path)} leaves the data set; allowed: a path relative to the "
                        "manifest's folder that stays inside it (no `..`, no link out of it)")
    if kind not in KINDS or split not in SPLITS or type(label) is not int or label != LABEL_OF_KIND[kind]:
        raise DataError(f"{where}: kind {shown(kind)}, split {shown(split)}, label {shown(label)}; allowed: kind in "
                        f"{KINDS}, split in {SPLITS}, label {LABEL_OF_KIND}")
    return ClipInfo(root / relative, label, kind, split, text, voice)


def scan(root: str | Path) -> list[ClipInfo]:
    """Every clip of a data set folder (manifest.jsonl or class folders), with its label, kind and split (in class
    folders, split_of_file's)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingDataError(f"{root}: no such data directory; allowed: {EXPECTED_LAYOUT}")
    if os.path.lexists(root / "manifest.jsonl"):  # a FIFO or folder there is refused, not taken for no manifest
        return read_manifest(root)
    missing = [f"{root / name}/" for name in REQUIRED_FOLDERS if not (root / name).is_dir()]
    if missing:
        raise MissingDataError(f"{', '.join(missing)}: missing; allowed: {EXPECTED_LAYOUT}")
    clips = []
    for kind in KINDS:
        for path in folder_files(root, kind):
            if path.suffix.lower() in AUDIO_SUFFIXES:
                clips.append(ClipInfo(path, LABEL_OF_KIND[kind], kind, split_of_file(path, root),
                                      voice=speaker_of(path.name) or ""))
    return clips


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
    gaps: str = ""  # e.g. "no usable positive clips in the val split": loading refuses such a set

    @property
    def ok(self) -> bool:
        return not self.problems and not self.gaps

    def format(self) -> str:
        lines = [f"{p.path}: {p.problem} ({p.detail}){', skipped when loading' if p.skipped else ''}"
                 for p in self.problems]
        lines += [f"{self.root}: {self.gaps}; loading refuses this data set"] if self.gaps else []
        kinds = ", ".join(f"{kind} {self.clips_per_kind.get(kind, 0)}" for kind in KINDS)
        lines.append(f"{self.root}: {sum(self.clips_per_kind.values())} clips ({kinds})")
        by_problem = Counter(p.problem for p in self.problems)
        lines.append("problems: " + (", ".join(f"{name} {n}" for name, n in sorted(by_problem.items())) or "none"))
        return "\n".join(lines)


def check(root: str | Path) -> CheckReport:
    """Every file of a data set with a problem (unreadable, bad header, empty, silent, clipped, non-finite, too short or
    too long), and the splits that lack usable positives or negatives."""
    root = Path(root)
    clips = scan(root)
    files = read_all([c.path for c in clips])
    problems = [Problem(f.path, name, detail, name in UNUSABLE) for f in files for name, detail in f.problems]
    if not (root / "manifest.jsonl").is_file():
        problems += [Problem(path, "not audio", f"not a {' or '.join(AUDIO_SUFFIXES)} file, ignored", True)
                     for kind in KINDS for path in folder_files(root, kind)
                     if path.suffix.lower() not in AUDIO_SUFFIXES]
    gaps = describe_gaps(missing_classes(clips, files))
    return CheckReport(root, dict(Counter(c.kind for c in clips)), problems, gaps)


# --------------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Split:
    audio: Tensor  # [N, N_SAMPLES] float32
    labels: Tensor  # [N] int64
    kinds: list[str]

    def of_kind(self, kind: str) -> Tensor:
        """The clips of one kind [N_kind, N_SAMPLES], e.g. "background" for the noise bank."""
        return self.audio[[k == kind for k in self.kinds]]

    def labelled(self) -> Split:
        """The split without its straddle windows: what a model trains on with hard labels alone."""
        keep = self.labels != UNLABELLED  # [N]
        kinds = [k for k, kept in zip(self.kinds, keep.tolist(), strict=True) if kept]
        return Split(self.audio[keep], self.labels[keep], kinds)


@dataclass(frozen=True)
class WakewordData:
    train: Split
    val: Split
    test: Split
    skipped: int  # unusable files left out
    root: Path
    manifest_sha256: str  # of the clip list and every file's bytes: a cache key for anything derived from the data
    labelled_sha256: str  # the same without the straddle windows: what a teacher is fine-tuned on
    val_stream: Tensor  # [T] the val split's negative audio (negative_stream), so that no worker reads data.root


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
    assert file.audio is not None  # load_dataset windows only usable files
    mono = resample(file.audio.mean(axis=1), file.sample_rate, sample_rate)  # [T]
    return fit_length(torch.from_numpy(mono), n_samples)


def make_split(clips: list[ClipInfo], windows: list[Tensor], n_samples: int) -> Split:
    audio = torch.stack(windows) if windows else torch.zeros(0, n_samples)
    return Split(audio.float(), torch.tensor([c.label for c in clips], dtype=torch.int64), [c.kind for c in clips])


def manifest_sha256(root: Path, clips: list[ClipInfo], files: list[AudioFile]) -> str:
    lines = sorted(f"{c.path.relative_to(root).as_posix()}\t{c.label}\t{c.kind}\t{c.split}\t{f.sha256}\n"
                   for c, f in zip(clips, files, strict=True))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def missing_classes(clips: list[ClipInfo], files: list[AudioFile]) -> list[tuple[str, int]]:
    """(split, label) pairs with no usable clip: every split needs both classes for its metrics."""
    present = {(c.split, c.label) for c, f in zip(clips, files, strict=True) if f.usable}
    return [(split, label) for label in CLASS_NAMES for split in SPLITS if (split, label) not in present]


def require_both_classes(root: Path, clips: list[ClipInfo], files: list[AudioFile]) -> None:
    """Refuse, before any clip is prepared, a split without usable positives or negatives (see missing_classes)."""
    missing = missing_classes(clips, files)
    if not missing:
        return
    name = CLASS_NAMES[missing[0][1]]
    where = root / "manifest.jsonl" if (root / "manifest.jsonl").is_file() else root / name
    listed = Counter(c.split for c in clips if c.label == missing[0][1])
    raise DataError(f"{where}: {describe_gaps(missing)} ({name} clips listed per split: "
                    f"{', '.join(f'{s} {listed[s]}' for s in SPLITS)}); allowed: usable positive and negative clips "
                    "in each of train, val and test: splits come from a hash of the speaker id or file path, so add "
                    f"files from more speakers; `kd-tune data check {root}` lists unusable files")


def describe_gaps(missing: list[tuple[str, int]]) -> str:
    """[("val", 1), ("test", 1)] as "no usable positive clips in the val and test splits"."""
    parts = []
    for label, name in CLASS_NAMES.items():
        splits = [split for split, missing_label in missing if missing_label == label]
        if splits:
            listed = " and ".join([", ".join(splits[:-1]), splits[-1]] if len(splits) > 1 else splits)
            parts.append(f"no usable {name} clips in the {listed} split{'s' * (len(splits) > 1)}")
    return "; ".join(parts)


def load_data(data: DataConfig) -> WakewordData:
    """The configured data set, with its configured straddle windows."""
    return load_dataset(data.root, straddles_per_positive=data.straddles_per_positive,
                        exclude_engines=data.exclude_engines)


def engine_of(voice: str) -> str:
    """The engine of a manifest voice: `espeak:en+m1` -> espeak; a class-folder clip's speaker id -> user."""
    engine, sep, _ = voice.partition(":")
    return engine if sep else "user"


def load_dataset(root: str | Path, *, sample_rate: int = SAMPLE_RATE, straddles_per_positive: int = 0,
                 exclude_engines: tuple[str, ...] = ()) -> WakewordData:
    """Read every clip as mono at sample_rate, fitted (centred) to one clip length, grouped by split.

    Clips of exclude_engines are left out. Unusable files (see UNUSABLE) are skipped and counted. A split without
    usable positives or negatives is refused (DataError) before any clip is resampled. With long training recordings,
    the training split ends with their windows (negatives), then straddles_per_positive straddle windows per positive.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0 Hz, got {sample_rate!r}")
    root = Path(root)
    clips = [c for c in scan(root) if engine_of(c.voice) not in exclude_engines]
    n_samples = N_SAMPLES * sample_rate // SAMPLE_RATE
    files = read_all([c.path for c in clips])
    require_both_classes(root, clips, files)
    skipped = sum(not f.usable for f in files)
    if skipped:
        warnings.warn(f"skipped {skipped} unusable audio files under {root}; `kd-tune data check {root}` lists them",
                      stacklevel=2)
    splits = {}
    for split in SPLITS:
        kept = [(c, f) for c, f in zip(clips, files, strict=True) if c.split == split and f.usable]
        splits[split] = make_split([c for c, _ in kept], [to_window(f, sample_rate, n_samples) for _, f in kept],
                                   n_samples)
    digest = manifest_sha256(root, clips, files)
    windows = long_windows(root, "train", sample_rate=sample_rate, n_samples=n_samples)  # [W, n_samples]
    if len(windows):
        splits["train"] = appended(splits["train"], windows, kind=WINDOW_KIND, label=0)
        digest = fold_in(digest, windows)
    labelled = digest
    if straddles_per_positive and len(windows):
        straddles = straddle_windows(splits["train"].audio[splits["train"].labels == 1], windows,
                                     per_positive=straddles_per_positive)  # [min(P * per_positive, W), n_samples]
        splits["train"] = appended(splits["train"], straddles, kind=STRADDLE_KIND, label=UNLABELLED)
        digest = fold_in(digest, straddles)
    return WakewordData(**splits, skipped=skipped, root=root, manifest_sha256=digest, labelled_sha256=labelled,
                        val_stream=negative_stream(root, splits["val"], "val"))


def fold_in(digest: str, audio: Tensor) -> str:
    """digest extended by audio's samples, hashed from the tensor's memory rather than a bytes copy of it."""
    heard = hashlib.sha256(audio.contiguous().numpy().data).hexdigest()  # .data: numpy types no array as a Buffer
    return hashlib.sha256(f"{digest}\t{heard}".encode()).hexdigest()


def appended(split: Split, windows: Tensor, *, kind: str, label: int) -> Split:
    """The split with windows [W, N] appended, all of one kind and label."""
    labels = torch.cat([split.labels, torch.full((len(windows),), label, dtype=torch.int64)])
    return Split(torch.cat([split.audio, windows]), labels, split.kinds + [kind] * len(windows))


def straddle_windows(positives: Tensor, context: Tensor, *, per_positive: int, seed: int = STRADDLE_SEED) -> Tensor:
    """Windows [min(P * per_positive, W), N] that cut the positive clips [P, N] as a streaming detector hears them.

    Each window is shifted off its clip by a random STRADDLE_SHIFT fraction of a window, to either side, and the gap
    is filled with a random window of context [W >= 1, N] (long audio): part of the wake word is in it, and no hard
    label says whether that is enough. The teacher's soft target is the label. At most W windows, a seeded choice:
    a few seconds of long audio would otherwise fill every gap with the same sounds.
    """
    n_positives, n = positives.shape
    if len(context) < 1 or context.shape[1] != n:
        raise ValueError(f"context must be [W >= 1, {n}] windows of long audio, got shape {tuple(context.shape)}")
    g = torch.Generator().manual_seed(seed)
    count = n_positives * per_positive
    heard = torch.randint(0, len(context), (count,), generator=g)  # [M] the context window that fills the gap
    low, high = STRADDLE_SHIFT
    shift = ((low + (high - low) * torch.rand(count, generator=g)) * n).long()  # [M] samples, in [low, high) * n
    shift = torch.where(torch.rand(count, generator=g) < 0.5, -shift, shift)  # [M] < 0: the window starts early
    # drawn last, so the cap never changes the other draws; with count <= W it keeps every window, in order
    kept = torch.randperm(count, generator=g)[:len(context)].sort().values.tolist()  # [min(M, W)]
    out = torch.empty(len(kept), n)
    for row, m in enumerate(kept):
        clip, gap, s = positives[m // per_positive], context[heard[m]], int(shift[m])
        out[row] = torch.cat([gap[n + s:], clip[:n + s]] if s < 0 else [clip[s:], gap[:s]])
    return out


# ---------------------------------------------------------------------------------------- long recordings


def recording_paths(root: Path, split: str) -> list[Path]:
    """The long recordings of a split, in name order."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    folder = Path(root) / LONG_FOLDER / split
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES) if folder.is_dir() else []


def negative_stream(root: Path, part: Split, split: str) -> Tensor:
    """A split's negative audio [T] at 16 kHz: its long recordings end to end, or else its negative and background
    clips (`part`) end to end."""
    if recording_paths(root, split):
        return long_audio(root, split)
    joined = part.audio[[k in ("negative", "background") for k in part.kinds]]
    return (joined if len(joined) else part.audio[part.labels == 0]).reshape(-1)


def long_audio(root: Path, split: str) -> Tensor:
    """A split's long recordings end to end [T] at 16 kHz (empty without any), at most MAX_STREAM_HOURS."""
    budget, streams = MAX_STREAM_HOURS * 3600 * SAMPLE_RATE, [torch.zeros(0)]
    for path in recording_paths(root, split):
        streams.append(read_recording(path, max_samples=budget))
        budget -= len(streams[-1])
    return torch.cat(streams)


def long_windows(root: Path, split: str, *, sample_rate: int, n_samples: int) -> Tensor:
    """A split's long recordings cut into consecutive windows [W, n_samples] at sample_rate; the tail too short for a
    window is dropped."""
    audio = long_audio(root, split)
    if sample_rate != SAMPLE_RATE and len(audio):
        audio = torch.from_numpy(resample(audio.numpy(), SAMPLE_RATE, sample_rate))
    return audio[:len(audio) // n_samples * n_samples].reshape(-1, n_samples)


def sample_weights(kinds: list[str], *, hard_negative_weight: float) -> Tensor:
    """Per-clip loss weights [N]: hard negatives get hard_negative_weight, every other clip 1."""
    if not hard_negative_weight > 0:
        raise ValueError(f"hard_negative_weight must be > 0, got {hard_negative_weight!r}")
    return torch.tensor([hard_negative_weight if k == "hard_negative" else 1.0 for k in kinds], dtype=torch.float32)
