"""A user's own recordings added to a data set with a manifest (`kd-tune data add SOURCE --to DATASET`).

SOURCE is laid out like a folder data set: positive/, negative/, hard_negative/, background/ (any of them) and
long/<split>/ recordings. Clips are copied to DATASET/user/<kind>/ and listed in its manifest.jsonl, split by the hash
of their speaker (`<speaker>_` file-name prefix) or path as datasets.data splits a folder; long recordings are copied
to DATASET/long/<split>/user_<name>, where loading reads them beside the synthetic streams. Everything is checked
before anything is copied: an unusable file, or a different file already at a target, refuses the whole addition.
Nothing is overwritten; a file already added (same bytes) is left as it is, so adding a folder again is harmless.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

from kd_tune.audio.features import SAMPLE_RATE
from kd_tune.audio.io import AUDIO_SUFFIXES, MAX_STREAM_HOURS, UNUSABLE, read_recording
from kd_tune.datasets.data import KINDS, LABEL_OF_KIND, LONG_FOLDER, MAX_MANIFEST_BYTES, SPLITS, DataError, \
    folder_files, \
    read_all, read_text_within, recording_paths, speaker_of, split_of_file
from kd_tune.signing import SpecialFileError, open_regular
from kd_tune.store.storage import write_text

USER_FOLDER = "user"  # clips go to DATASET/user/<kind>/
USER_PREFIX = "user_"  # long recordings go to DATASET/long/<split>/user_<name>; synthesis never deletes them
COPY_BLOCK_BYTES = 2**20
SOURCE_LAYOUT = ("a folder with positive/, negative/, hard_negative/ or background/ holding .wav or .flac files, "
                 "and optionally long/train/, long/val/, long/test/")


@dataclass(frozen=True)
class Copy:
    """One file to add: where it comes from, where it goes (relative to the data set) and the bytes it must hold."""

    source: Path
    target: str
    sha256: str
    entry: dict | None = None  # its manifest line; None for a long recording
    seconds: float = 0.0


@dataclass
class Addition:
    """What `add_recordings` did."""

    dataset: Path
    added: list[Copy] = field(default_factory=list)
    present: int = 0  # files already in the set with the same bytes
    ignored: int = 0  # files that are not .wav or .flac
    warnings: Counter = field(default_factory=Counter)  # problems `kd-tune data check` reports but loading accepts

    def format(self) -> str:
        clips = [c.entry for c in self.added if c.entry is not None]
        per_kind = [f"{kind} {n} ({', '.join(f'{split} {m}' for split, m in per_split(clips, kind).items())})"
                    for kind, n in Counter(e["kind"] for e in clips).items()]
        lines = [f"added {len(clips)} clips to {self.dataset / 'manifest.jsonl'} under {USER_FOLDER}/"
                 + (f": {', '.join(per_kind)}" if per_kind else "")]
        lines += [f"added a long recording: {self.dataset / c.target} ({c.seconds:.1f} s)"
                  for c in self.added if c.entry is None]
        if self.present:
            lines.append(f"already in the data set, left as they are: {self.present} files")
        if self.ignored:
            lines.append(f"ignored: {self.ignored} files that are not {' or '.join(AUDIO_SUFFIXES)}")
        if self.warnings:
            lines.append("added as they are (see `kd-tune data check`): " + ", ".join(
                f"{name} {n}" for name, n in sorted(self.warnings.items())))
        if self.added:
            lines.append("the data hash changed: teachers and the teacher cache are rebuilt on their next run")
        return "\n".join(lines)


def per_split(entries: list[dict], kind: str) -> dict[str, int]:
    return {split: sum(e["kind"] == kind and e["split"] == split for e in entries) for split in SPLITS}


def add_recordings(source: str | Path, dataset: str | Path) -> Addition:
    """Copy SOURCE's clips and long recordings into the data set and list the clips in its manifest (see module)."""
    source, dataset = Path(source), Path(dataset)
    listed = listed_paths(dataset)
    if not source.is_dir():
        raise DataError(f"{source}: no such folder; allowed: {SOURCE_LAYOUT}")
    addition = Addition(dataset)
    clips, refused = clip_copies(source, addition)
    longs, refused_long = long_copies(source, dataset)
    refused += refused_long
    if not clips and not longs and not refused:
        raise DataError(f"{source}: no audio to add; allowed: {SOURCE_LAYOUT}")
    copies, unlisted = sort_by_target(dataset, clips + longs, listed, addition, refused)
    if refused:
        more = f" (and {len(refused) - 1} more refused files)" if len(refused) > 1 else ""
        raise DataError(f"{refused[0]}{more}; allowed: usable audio (`kd-tune data check` passes it) to targets that "
                        "hold no other file; nothing was added")
    for copy in copies:
        copy_file(copy, dataset)
    addition.added = unlisted + copies
    append_to_manifest(dataset, [c.entry for c in addition.added if c.entry is not None])
    return addition


def sort_by_target(dataset: Path, copies: list[Copy], listed: set[str], addition: Addition,
                   refused: list[str]) -> tuple[list[Copy], list[Copy]]:
    """(copies whose target is free, clips already copied but not listed); a target holding other bytes is refused,
    one holding these bytes counted as present."""
    free, unlisted = [], []
    for copy in copies:
        problem = target_problem(dataset, copy)
        if problem == "present":
            addition.present += 1
            if copy.entry is not None and copy.target not in listed:  # a run stopped before it wrote the manifest
                unlisted.append(copy)
        elif problem:
            refused.append(problem)
        else:
            free.append(copy)
    return free, unlisted


def listed_paths(dataset: Path) -> set[str]:
    """The paths a data set's manifest.jsonl lists; a set without one is refused, as nothing could list the clips."""
    if not os.path.lexists(dataset / "manifest.jsonl"):
        raise DataError(f"{dataset}: no manifest.jsonl; allowed: a data set with one (`kd-tune data synth` makes "
                        "it); a folder data set takes your files in its positive/, negative/, ... folders as they are")
    text = read_text_within(dataset / "manifest.jsonl", MAX_MANIFEST_BYTES)
    entries = [json_or_none(line) for line in text.splitlines()]
    return {e["path"] for e in entries if isinstance(e, dict) and isinstance(e.get("path"), str)}


def json_or_none(line: str) -> object:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # a broken line is loading's to name, with its number
        return None


def clip_copies(source: Path, addition: Addition) -> tuple[list[Copy], list[str]]:
    """The clips of SOURCE's class folders as copies, and the unusable ones as refusals."""
    paths = [(kind, p) for kind in KINDS for p in folder_files(source, kind)]
    audio = [(kind, p) for kind, p in paths if p.suffix.lower() in AUDIO_SUFFIXES]
    addition.ignored += len(paths) - len(audio)
    copies, refused = [], []
    for (kind, path), file in zip(audio, read_all([p for _, p in audio]), strict=True):
        if not file.usable:
            name, detail = next((n, d) for n, d in file.problems if n in UNUSABLE)
            refused.append(f"{path}: {name} ({detail})")
            continue
        addition.warnings.update(name for name, _ in file.problems)
        speaker = speaker_of(path.name)
        target = f"{USER_FOLDER}/{kind}/{path.relative_to(source / kind).as_posix()}"
        entry = {"path": target, "label": LABEL_OF_KIND[kind], "kind": kind, "text": None,
                 "voice": f"user:{speaker}" if speaker else "user",
                 "split": split_of_file(path, source)}
        copies.append(Copy(path, target, file.sha256, entry))
    return copies, refused


def long_copies(source: Path, dataset: Path) -> tuple[list[Copy], list[str]]:
    """SOURCE's long recordings as copies, each read as loading reads it; a split past MAX_STREAM_HOURS with the data
    set's own recordings is refused."""
    budget = MAX_STREAM_HOURS * 3600 * SAMPLE_RATE
    copies, refused = [], []
    for split in SPLITS:
        left = budget - sum(map(samples_at_16k, recording_paths(dataset, split)))
        for path in recording_paths(source, split):
            try:
                n_samples = len(read_recording(path, max_samples=left))
            except DataError as error:
                refused.append(str(error).split("; allowed:")[0])
                continue
            left -= n_samples
            copies.append(Copy(path, f"{LONG_FOLDER}/{split}/{USER_PREFIX}{path.name}", file_sha256(path),
                               seconds=n_samples / SAMPLE_RATE))
    return copies, refused


def samples_at_16k(path: Path) -> int:
    """A recording's length at 16 kHz from its header; 0 when unreadable (loading names it)."""
    try:  # opened here, not by libsndfile: a FIFO is refused before an open that could block
        with open_regular(path) as raw, sf.SoundFile(raw) as f:
            return round(f.frames * SAMPLE_RATE / f.samplerate)
    except (SpecialFileError, sf.SoundFileError, RuntimeError, OSError, ZeroDivisionError):
        return 0


def target_problem(dataset: Path, copy: Copy) -> str | None:
    """None when the target is free, "present" when it holds these bytes already, else why it cannot be written."""
    target = dataset / copy.target
    if not os.path.lexists(target):
        return None
    if target.is_file() and not target.is_symlink() and file_sha256(target) == copy.sha256:
        return "present"
    return f"{target}: holds another file than {copy.source} (never overwritten)"


def copy_file(copy: Copy, dataset: Path) -> None:
    """The source's bytes to the target, which must not exist: written to a partial file, checked against the bytes
    that were checked, then linked into place (a link never replaces a file)."""
    target = dataset / copy.target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with open_regular(copy.source) as src, open(partial, "wb") as out:
        for block in iter(lambda: src.read(COPY_BLOCK_BYTES), b""):
            digest.update(block)
            out.write(block)
    try:
        if digest.hexdigest() != copy.sha256:
            raise DataError(f"{copy.source}: changed while it was being added; allowed: files nothing writes to "
                            "meanwhile (add it again)")
        os.link(partial, target)
    except FileExistsError:
        raise DataError(f"{target}: appeared while adding (never overwritten); allowed: one `kd-tune data add` at "
                        "a time") from None
    finally:
        partial.unlink()


def append_to_manifest(dataset: Path, entries: list[dict]) -> None:
    """The entries appended to manifest.jsonl by writing the whole new file beside it and renaming it over the old
    one: a reader sees the old list or the new one, never half of it."""
    if not entries:
        return
    manifest = dataset / "manifest.jsonl"
    text = read_text_within(manifest, MAX_MANIFEST_BYTES)
    text = (text if not text or text.endswith("\n") else text + "\n") + "".join(json.dumps(e) + "\n" for e in entries)
    if len(text.encode()) > MAX_MANIFEST_BYTES:
        raise DataError(f"{manifest}: would pass {MAX_MANIFEST_BYTES} bytes with {len(entries)} more clips; allowed: "
                        "a manifest within that size")
    write_text(manifest.parent, manifest.name, text)


def user_lines(dataset: Path) -> list[str]:
    """The lines of a data set's manifest that list clips `add_recordings` put there (none without a manifest)."""
    if not os.path.lexists(dataset / "manifest.jsonl"):
        return []
    text = read_text_within(dataset / "manifest.jsonl", MAX_MANIFEST_BYTES)
    return [line for line in text.splitlines() if is_user_entry(json_or_none(line))]


def is_user_entry(entry: object) -> bool:
    return isinstance(entry, dict) and str(entry.get("path", "")).startswith(f"{USER_FOLDER}/")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(COPY_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
