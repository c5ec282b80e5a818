import hashlib
import io
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import kd_tune.audio.io as audio_module
import kd_tune.datasets.data as data_module
import kd_tune.datasets.synth as synth
from kd_tune.audio.features import N_SAMPLES, SAMPLE_RATE
from kd_tune.audio.samples import resample
from kd_tune.datasets.data import KINDS, LABEL_OF_KIND, LONG_FOLDER, SPLITS, DataError, Split, check, \
    STRADDLE_KIND, UNLABELLED, load_dataset, negative_stream, sample_weights, scan, split_for, straddle_windows
from kd_tune.datasets.synth import confusables, synthesize
from kd_tune.signing import SpecialFileError

TONE_HZ = 440.0


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def manifest_of(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def tone(seconds: float, sample_rate: int, *, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)


def peak_hz(audio: torch.Tensor) -> float:
    spectrum = torch.fft.rfft(audio).abs()
    return float(torch.argmax(spectrum)) * SAMPLE_RATE / len(audio)


def speakers_in(split: str, count: int) -> list[str]:
    """Speaker ids whose files land in the given split."""
    names = (f"spk{i}" for i in range(10_000))
    return [name for name in names if split_for(name) == split][:count]


def clean_folder(root: Path) -> Path:
    """One positive and one negative 16 kHz clip from one speaker in the val and the test split (train: none)."""
    for name in ("positive", "negative"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for speaker in (speakers_in("val", 1)[0], speakers_in("test", 1)[0]):
        sf.write(root / "positive" / f"{speaker}_good.wav", tone(0.8, 16000, amplitude=0.5), 16000)
        sf.write(root / "negative" / f"{speaker}_good.wav", tone(0.8, 16000, amplitude=0.4), 16000)
    return root


def complete_folder(root: Path) -> Path:
    """clean_folder with a positive and a negative clip of a train speaker too: every split has both classes."""
    clean_folder(root)
    speaker = speakers_in("train", 1)[0]
    for kind in ("positive", "negative"):
        sf.write(root / kind / f"{speaker}_a.wav", tone(0.8, 16000), 16000)
    return root


def user_folder(root: Path) -> Path:
    """Good train clips of both classes in several formats, good val and test clips, and one file per problem."""
    speaker_a, speaker_b = speakers_in("train", 2)
    clean_folder(root)
    left, right = tone(0.8, 44100, amplitude=0.6), tone(0.8, 44100, amplitude=0.2)
    sf.write(root / "positive" / f"{speaker_a}_stereo.flac", np.stack([left, right], axis=1), 44100)
    sf.write(root / "positive" / f"{speaker_b}_low.wav", tone(0.5, 8000, amplitude=0.8), 8000, subtype="PCM_16")
    sf.write(root / "negative" / f"{speaker_a}_other.wav", tone(1.5, 16000, amplitude=0.3), 16000)
    sf.write(root / "negative" / f"{speaker_b}_other.wav", tone(0.7, 22050, amplitude=0.3), 22050)
    bad = root / "negative"
    sf.write(bad / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(bad / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(bad / "clipped.wav", np.sign(tone(1.0, 16000)), 16000, subtype="FLOAT")
    nan = tone(1.0, 16000)
    nan[100] = np.nan
    sf.write(bad / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(bad / "short.wav", tone(0.1, 16000), 16000)
    sf.write(bad / "long.wav", tone(11.0, 8000), 8000)
    (bad / "junk.wav").write_text("not a wave file")
    (bad / "notes.txt").write_text("recorded in the kitchen")
    return root


EXPECTED_PROBLEMS = {("empty.wav", "empty"), ("silent.wav", "silent"), ("clipped.wav", "clipped"),
                     ("nan.wav", "non-finite"), ("short.wav", "too short"), ("long.wav", "too long"),
                     ("junk.wav", "unreadable"), ("notes.txt", "not audio")}


# ------------------------------------------------------------------------------------------------ synthesis


@pytest.mark.slow
def test_synthesis_is_deterministic_per_seed(small_dataset, tmp_path):
    # Rule: same seed, same data set (manifest and audio bytes), even within one process; another seed differs.
    again = tmp_path / "again"
    synthesize(again, size="small", seed=0, progress=False)
    assert tree_digest(again) == tree_digest(small_dataset)
    other = tmp_path / "other"
    synthesize(other, size="small", seed=1, progress=False)
    assert (other / "manifest.jsonl").read_bytes() != (small_dataset / "manifest.jsonl").read_bytes()
    differing = [e["path"] for e in manifest_of(other)
                 if (other / e["path"]).read_bytes() != (small_dataset / e["path"]).read_bytes()]
    assert len(differing) > 0.9 * len(manifest_of(other))


def test_manifest_has_every_kind_label_and_split(small_dataset):
    # Rule: the manifest lists every kind with its label (1 only for positives) and all three splits.
    entries = manifest_of(small_dataset)
    assert Counter(e["kind"] for e in entries) == synth.SYNTH_SIZES["small"]
    assert all(e["label"] == LABEL_OF_KIND[e["kind"]] for e in entries)
    assert {e["split"] for e in entries if e["kind"] == "positive"} == set(SPLITS)
    assert {e["split"] for e in entries if e["label"] == 0} == set(SPLITS)
    assert all((e["text"] is None) == (e["kind"] == "background") for e in entries)


def test_speech_comes_from_many_voices(small_dataset):
    # Rule: speech is spoken by piper in several accents and by many espeak-ng voices, for positives too.
    voices = [e["voice"] for e in manifest_of(small_dataset) if e["kind"] == "positive"]
    assert len({v for v in voices if v.startswith("piper:")}) >= 3
    assert len({v for v in voices if v.startswith("espeak:")}) >= 15


def test_splits_group_renderings_of_one_voice_and_text(small_dataset):
    # Rule: the split comes from a hash of voice + text (+ variant), so one espeak voice saying one text never
    # straddles splits.
    splits_of: dict[tuple, set] = {}
    for e in manifest_of(small_dataset):
        if e["voice"].startswith("espeak:"):
            splits_of.setdefault((e["voice"], e["text"]), set()).add(e["split"])
    assert splits_of and all(len(splits) == 1 for splits in splits_of.values())


def test_clips_are_one_second_16k_mono_pcm16(small_dataset):
    # Rule: every clip is a 16-bit PCM WAV, 16 kHz mono, exactly N_SAMPLES long, under <kind>/.
    for e in manifest_of(small_dataset):
        info = sf.info(small_dataset / e["path"])
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (SAMPLE_RATE, 1, N_SAMPLES, "PCM_16")
        assert e["path"].startswith(e["kind"] + "/")


def test_positives_are_whole_speech(small_dataset):
    # Rule: positives carry speech energy over a word's length and are never cut at the window's edges.
    edge = SAMPLE_RATE // 200  # 5 ms
    for e in manifest_of(small_dataset):
        if e["kind"] != "positive":
            continue
        audio, _ = sf.read(small_dataset / e["path"], dtype="float32")
        frames_rms = np.sqrt((audio.reshape(100, -1) ** 2).mean(axis=1))  # [100] 10 ms frames
        assert (frames_rms > 0.05 * frames_rms.max()).sum() >= 25, e  # >= 0.25 s of speech
        peak = np.abs(audio).max()
        assert peak > 0.05, e
        assert max(np.abs(audio[:edge]).max(), np.abs(audio[-edge:]).max()) < 0.1 * peak, e


def test_rerun_with_same_parameters_is_a_no_op(small_dataset):
    # Rule: a complete data set with the same parameters is reused untouched; different parameters are refused.
    before = {p: p.stat().st_mtime_ns for p in small_dataset.rglob("*.wav")}
    assert synthesize(small_dataset, size="small", seed=0, progress=False) == small_dataset / "manifest.jsonl"
    assert {p: p.stat().st_mtime_ns for p in small_dataset.rglob("*.wav")} == before
    with pytest.raises(DataError, match="seed"):
        synthesize(small_dataset, size="small", seed=3, progress=False)


def test_an_interrupted_run_never_looks_complete(tmp_path, monkeypatch):
    # Rule: dataset.json (the completeness marker) and the manifest are written only after every clip.
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "render", killed)
    with pytest.raises(KeyboardInterrupt):
        synthesize(tmp_path, size="small", progress=False)
    assert not (tmp_path / "dataset.json").exists() and not (tmp_path / "manifest.jsonl").exists()


def test_bad_synthesis_arguments_are_named(tmp_path):
    # Rule: bad arguments fail with the bad value and the allowed values.
    with pytest.raises(ValueError, match="'huge'.*default.*small"):
        synthesize(tmp_path, size="huge")
    with pytest.raises(ValueError, match="seed.*-1"):
        synthesize(tmp_path, seed=-1)


def test_import_needs_no_piper():
    # Rule: piper (GPL, optional) is imported only inside the synthesis code.
    code = ("import sys; sys.modules['piper'] = None; import kd_tune.datasets.synth; "
            "assert 'onnxruntime' not in sys.modules")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ------------------------------------------------------------------------------------------------ text and splits


def test_confusables_are_near_misses_never_the_wake_word():
    # Rule: confusables(wakeword) derives near-misses by rules (dropped word, other opener, sound-alike last word)
    # and never returns the wake word itself.
    phrases = confusables("Hey, Nova!")
    assert {"hey nora", "nova", "hey", "hi nova", "hey noa", "hey ova", "nova hey"} <= set(phrases)
    assert "hey nova" not in phrases and "hay nova" not in phrases
    assert len(phrases) == len(set(phrases)) and phrases == confusables("hey nova")
    assert "alexa" not in confusables("alexa") and confusables("alexa")


def test_confusables_reject_an_empty_wake_word():
    # Rule: errors name the bad value.
    with pytest.raises(ValueError, match="'!!'"):
        confusables("!!")


def test_split_for_is_a_stable_hash_with_the_given_fractions():
    # Rule: splits come from sha256 of the key, never reshuffled, in roughly the requested proportions.
    keys = [f"speaker{i}" for i in range(6000)]
    counts = Counter(split_for(k) for k in keys)
    assert [split_for(k) for k in keys[:50]] == [split_for(k) for k in keys[:50]]
    assert math.isclose(counts["val"] / len(keys), 0.15, abs_tol=0.02)
    assert math.isclose(counts["test"] / len(keys), 0.15, abs_tol=0.02)
    assert Counter(split_for(k, val_fraction=0.5, test_fraction=0.0) for k in keys)["test"] == 0
    with pytest.raises(ValueError, match="0.7"):
        split_for("x", val_fraction=0.7, test_fraction=0.3)


# ------------------------------------------------------------------------------------------------ user folders


def test_scan_reads_folders_and_keeps_a_speaker_in_one_split(tmp_path):
    # Rule: class folders give labels and kinds; the split is hashed from the `<speaker>_` prefix when present.
    root = user_folder(tmp_path)
    clips = {c.path.name: c for c in scan(root)}
    speaker_a = speakers_in("train", 1)[0]
    assert clips[f"{speaker_a}_stereo.flac"].label == 1 and clips[f"{speaker_a}_other.wav"].label == 0
    assert clips[f"{speaker_a}_stereo.flac"].split == clips[f"{speaker_a}_other.wav"].split == "train"
    assert clips["silent.wav"].split == split_for("negative/silent.wav")
    assert "notes.txt" not in clips


def test_missing_root_or_class_folder_is_named(tmp_path):
    # Rule: a missing root or required class folder is an error naming the path and the expected layout.
    with pytest.raises(FileNotFoundError, match="nowhere.*positive/ and negative/"):
        scan(tmp_path / "nowhere")
    (tmp_path / "positive").mkdir()
    with pytest.raises(FileNotFoundError, match=r"negative/: missing.*manifest\.jsonl"):
        load_dataset(tmp_path)


def test_check_reports_every_bad_file_with_a_reason(tmp_path):
    # Rule: check lists each empty, silent, clipped, non-finite, too short, too long, unreadable or non-audio file
    # with its path and reason, plus counts per kind and per problem.
    root = user_folder(tmp_path)
    report = check(root)
    assert {(p.path.name, p.problem) for p in report.problems} == EXPECTED_PROBLEMS
    assert not report.ok
    text = report.format()
    for name, problem in EXPECTED_PROBLEMS:
        assert f"{root / 'negative' / name}: {problem}" in text
    assert "positive 4, hard_negative 0, negative 11, background 0" in text
    assert "clipped 1" in text


def test_check_of_a_clean_folder_is_ok(tmp_path):
    # Rule: .ok is True when no file has a problem.
    root = complete_folder(tmp_path / "clean")
    assert check(root).ok and "problems: none" in check(root).format()


def test_load_resamples_downmixes_and_centres(tmp_path):
    # Rule: clips load mono (channel mean), resampled to 16 kHz, centred in exactly N_SAMPLES.
    root = user_folder(tmp_path)
    with pytest.warns(UserWarning):
        train = load_dataset(root).train
    assert train.audio.shape[1:] == (N_SAMPLES,) and train.audio.dtype == torch.float32
    positives = train.audio[train.labels == 1]  # the 44.1 kHz stereo FLAC and the 8 kHz WAV
    assert len(positives) == 2 and "hard_negative" not in train.kinds
    for audio in positives:
        assert abs(peak_hz(audio) - TONE_HZ) < 2
    stereo, low = sorted(positives, key=lambda audio: float(audio.abs().max()))
    assert math.isclose(float(stereo.abs().max()), 0.4, abs_tol=0.02)  # mean of 0.6 and 0.2
    quarter = N_SAMPLES // 4
    assert low[:quarter - 100].abs().max() == 0 and low[-quarter + 100:].abs().max() == 0  # 0.5 s, centred


def test_load_skips_and_counts_unusable_files(tmp_path):
    # Rule: unreadable, empty, non-finite, silent and too-long files are skipped and counted with one warning;
    # clipped and short files still load.
    root = user_folder(tmp_path)
    with pytest.warns(UserWarning) as caught:
        loaded = load_dataset(root)
    assert [str(w.message) for w in caught if "skipped" in str(w.message)] == [
        f"skipped 5 unusable audio files under {root}; `kd-tune data check {root}` lists them"]
    assert loaded.skipped == 5
    total = sum(len(getattr(loaded, s).kinds) for s in SPLITS)
    assert total == 4 + 4 + 2  # the good train, val and test files plus clipped.wav and short.wav
    assert all(torch.isfinite(getattr(loaded, s).audio).all() for s in SPLITS)


def test_no_usable_positives_is_an_error_naming_the_folder(tmp_path):
    # Rule: a whole unusable class in the train split stops the run with a clear error naming the folder.
    root = user_folder(tmp_path)
    for path in (root / "positive").iterdir():
        sf.write(path, np.zeros(16000, np.float32), 16000, format=path.suffix[1:].upper())
    folder = re.escape(str(root / "positive"))
    with pytest.raises(DataError, match=f"^{folder}: no usable positive clips in the train, val and test splits"):
        load_dataset(root)


def test_manifest_sha256_follows_file_content(tmp_path):
    # Rule: the data hash is content-based: same bytes, same hash; one changed file changes it.
    root = user_folder(tmp_path)
    with pytest.warns(UserWarning):
        first, second = load_dataset(root).manifest_sha256, load_dataset(root).manifest_sha256
    assert first == second
    speaker_b = speakers_in("train", 2)[1]
    sf.write(root / "negative" / f"{speaker_b}_other.wav", tone(0.7, 22050, amplitude=0.25), 22050)
    with pytest.warns(UserWarning):
        assert load_dataset(root).manifest_sha256 != first


def test_manifest_paths_cannot_leave_the_data_set(tmp_path):
    # Rule: manifest paths are confined to the data set folder.
    entry = {"path": "../outside.wav", "label": 1, "kind": "positive", "split": "train"}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(entry) + "\n")
    with pytest.raises(ValueError, match=r"manifest\.jsonl:1: path '\.\./outside\.wav'"):
        scan(tmp_path)


def test_load_synthetic_set_by_split(small_dataset):
    # Rule: load_dataset reads the manifest layout into per-split tensors that match the manifest; the training split
    # then holds the 10 s training stream as 10 negative windows.
    entries = manifest_of(small_dataset)
    loaded = load_dataset(small_dataset)
    assert loaded.skipped == 0 and loaded.root == small_dataset and check(small_dataset).ok
    for split in SPLITS:
        part = getattr(loaded, split)
        expected = [e for e in entries if e["split"] == split] + [{"kind": "long", "label": 0}] * 10 * (
            split == "train")
        assert part.audio.shape == (len(expected), N_SAMPLES)
        assert part.kinds == [e["kind"] for e in expected]
        assert part.labels.tolist() == [e["label"] for e in expected]
    assert set(loaded.train.kinds) == {*KINDS, "long"}


def test_sample_weights_weight_hard_negatives():
    # Rule: hard negatives get hard_negative_weight, every other clip 1; the weight must be positive.
    weights = sample_weights(["positive", "hard_negative", "negative", "background"], hard_negative_weight=3.0)
    assert weights.tolist() == [1.0, 3.0, 1.0, 1.0] and weights.dtype == torch.float32
    with pytest.raises(ValueError, match="-1"):
        sample_weights(["positive"], hard_negative_weight=-1)


# ------------------------------------------------------------------------------------------------ bounded inputs

HUGE_RATE_HZ = 10_000_019
# torch alone is ~400 MB and the load ~550 MB here, but 1537 and 3204 MB in two fresh-clone runs beside a CPU hog
# (the decoding threads overlap, each with its own resampling kernel); a 10 MHz resampling kernel alone would take
# tens of GB, so 8 GB still tells bounded from unbounded.
PEAK_RSS_LIMIT_MB = 8000


def wav_claiming_rate(path: Path, sample_rate: int) -> Path:
    """A 444-byte 16-bit WAV (200 samples) whose header claims sample_rate: the bytes of the issue's file."""
    buffer = io.BytesIO()
    sf.write(buffer, tone(0.0125, 16000), 16000, format="WAV", subtype="PCM_16")
    data = bytearray(buffer.getvalue())
    struct.pack_into("<II", data, 24, sample_rate, sample_rate * 2)  # fmt chunk: sample rate, byte rate
    path.write_bytes(bytes(data))
    return path


def strange_folder(root: Path) -> dict[str, str]:
    """A usable set plus one file per header or sample problem; {file name: expected problem}."""
    user_folder(root)
    bad = root / "negative"
    wav_claiming_rate(bad / "huge_rate.wav", HUGE_RATE_HZ)
    sf.write(bad / "low_rate.wav", tone(0.8, 4000), 4000)
    sf.write(bad / "many_channels.wav", np.tile(tone(0.5, 16000)[:, None], (1, 33)), 16000)
    sf.write(bad / "huge_values.wav", tone(0.5, 16000) * 1e30, 16000, subtype="FLOAT")
    return {"huge_rate.wav": "bad sample rate", "low_rate.wav": "bad sample rate",
            "many_channels.wav": "bad channel count", "huge_values.wav": "out of range"}


def test_header_checks_name_the_real_reason(tmp_path):
    # Rule: a file's header is checked before it is decoded: a rate outside 8-192 kHz, more than 32 channels, or
    # samples past |x| = 1e3 are each reported with the file and the real reason (the 444-byte 10 MHz WAV
    # is a "bad sample rate", not "too short"), and marked as skipped when loading.
    expected = strange_folder(tmp_path)
    assert (tmp_path / "negative" / "huge_rate.wav").stat().st_size == 444
    report = check(tmp_path)
    found = {p.path.name: p for p in report.problems if p.path.name in expected}
    assert {name: p.problem for name, p in found.items()} == expected
    assert all(p.skipped for p in found.values())
    text = report.format()
    huge_rate = tmp_path / "negative" / "huge_rate.wav"
    assert f"{huge_rate}: bad sample rate ({HUGE_RATE_HZ} Hz; allowed: 8000 to 192000 Hz)" in text
    assert "BytesIO" not in text and "too short" not in text.split("huge_rate.wav")[1].split("\n")[0]


def test_strange_files_are_skipped_and_counted_in_bounded_memory(tmp_path):
    # Rule: load_dataset skips and counts every unusable file (README: "a bad file is skipped ... never the end of a
    # run"), without allocating for what a header claims: peak RSS of the loading process stays bounded.
    strange_folder(tmp_path)
    code = ("import json, resource, warnings; warnings.simplefilter('ignore'); "
            "from kd_tune.datasets.data import load_dataset; "
            f"d = load_dataset({str(tmp_path)!r}); "
            "print(json.dumps([d.skipped, len(d.train.kinds) + len(d.val.kinds) + len(d.test.kinds), "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    skipped, loaded, peak_mb = json.loads(out.stdout)
    assert skipped == 5 + 4 and loaded == 4 + 4 + 2  # user_folder's 5 unusable files, the 4 strange ones
    assert peak_mb < PEAK_RSS_LIMIT_MB


def test_a_split_without_one_class_is_refused_up_front(tmp_path):
    # Rule: a split with no usable clips of one class (here: no positives in val) is refused by load_dataset before
    # any clip is prepared, with one line naming the class folder, the split and the class; `check` reports it too.
    root = user_folder(tmp_path)
    for path in (root / "positive").glob(f"{speakers_in('val', 1)[0]}_*"):
        path.unlink()
    with pytest.raises(DataError) as caught:
        load_dataset(root)
    message = str(caught.value)
    assert message.startswith(f"{root / 'positive'}: no usable positive clips in the val split (")
    assert "\n" not in message and "allowed:" in message
    report = check(root)
    assert not report.ok and f"{root}: no usable positive clips in the val split; loading refuses" in report.format()


def write_manifest(root: Path, lines: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


GOOD_ENTRY = json.dumps({"path": "positive/a.wav", "label": 1, "kind": "positive", "split": "train"})


def test_a_fifo_listed_in_a_manifest_is_unreadable_not_a_hang(tmp_path):
    # Rule: nothing waits forever: a named pipe listed as a clip is refused without opening it for a blocking read.
    write_manifest(tmp_path, [GOOD_ENTRY])
    (tmp_path / "positive").mkdir()
    os.mkfifo(tmp_path / "positive" / "a.wav")
    [problem] = check(tmp_path).problems
    assert (problem.path.name, problem.problem, problem.skipped) == ("a.wav", "unreadable", True)
    assert "not a regular file" in problem.detail


@pytest.mark.parametrize("line,needle", [
    ('{"path": "positive/b.wav", "label": 1', "not JSON"),
    ("[" * 100_000 + "]" * 100_000, "not JSON"),
    ('["positive/b.wav", 1]', "not a clip entry"),
    ('{"path": 5, "label": 1, "kind": "positive", "split": "train"}', "path 5"),
    ('{"path": "positive/b.wav", "label": "1", "kind": "positive", "split": "train"}', "label '1'"),
    ('{"path": "positive/b.wav", "label": 1, "kind": "positive", "split": "train", "text": [1]}', "text [1]"),
    ('{"path": "../outside.wav", "label": 1, "kind": "positive", "split": "train"}', "leaves the data set"),
    ('{"path": "/etc/passwd", "label": 1, "kind": "positive", "split": "train"}', "leaves the data set"),
    ('{"path": "positive/a\\u0000.wav", "label": 1, "kind": "positive", "split": "train"}', "leaves the data set"),
    ('{"path": "positive/b.wav", "label": 1, "kind": "' + "x" * 100_000 + '", "split": "train"}', "kind 'xxx"),
])
def test_a_bad_manifest_line_is_one_error_naming_the_line(tmp_path, line, needle):
    # Rule: a bad manifest.jsonl line (broken or deeply nested JSON, wrong types, a path that leaves the folder) is a
    # DataError naming manifest.jsonl and the line number, on one short line.
    manifest = write_manifest(tmp_path, [GOOD_ENTRY, line])
    with pytest.raises(DataError) as caught:
        check(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{manifest}:2: ") and needle in message, message
    assert "\n" not in message and len(message) < 400 and "allowed" in message


def test_an_oversized_or_non_utf8_manifest_is_refused(tmp_path, monkeypatch):
    # Rule: manifest.jsonl is read whole, so its size is capped; bytes that are not UTF-8 are a one-line error too.
    manifest = write_manifest(tmp_path, [GOOD_ENTRY] * 20)
    monkeypatch.setattr(data_module, "MAX_MANIFEST_BYTES", 1024)
    with pytest.raises(DataError, match=f"^{re.escape(str(manifest))}: larger than"):
        scan(tmp_path)
    monkeypatch.undo()
    manifest.write_bytes(GOOD_ENTRY.encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=f"^{re.escape(str(manifest))}: not UTF-8"):
        scan(tmp_path)


def test_a_file_past_the_size_cap_is_skipped_unread(tmp_path, monkeypatch):
    # Rule: a clip is read whole (its bytes are hashed, then decoded), so files past MAX_FILE_BYTES are refused
    # before reading, as "too large" and skipped.
    root = clean_folder(tmp_path)
    monkeypatch.setattr(audio_module, "MAX_FILE_BYTES", 30_000)  # the 0.8 s clips are 25.6 kB
    sf.write(root / "negative" / "big.wav", tone(1.0, 16000), 16000)  # 32 kB of PCM_16
    found = {(p.path.name, p.problem, p.skipped) for p in check(root).problems}
    assert found == {("big.wav", "too large", True)}


@pytest.mark.parametrize("size", ["small", "default"])
def test_test_split_holds_out_whole_voice_families(size):
    # Rule: the test split is made of held-out voice families (an accent under both engines, a set of espeak-ng
    # voices): no voice of the test split is heard in training or validation, both engines are in it, and every
    # speech kind is; so test figures measure generalization to new voices, not memory of them.
    clips = synth.plan_dataset("hey nova", seed=0, size=size)
    speech = [c for c in clips if c.utterance is not None]
    test = [c for c in speech if c.split == "test"]
    assert all(c.utterance.held_out for c in test) and not any(c.utterance.held_out for c in speech if c not in test)
    assert {c.voice for c in test}.isdisjoint(c.voice for c in speech if c.split != "test")
    assert {c.utterance.engine for c in test} == {"piper", "espeak"}
    assert {c.kind for c in test} == {"positive", "hard_negative", "negative"}


def test_a_set_made_by_an_older_format_is_rendered_again(small_dataset, tmp_path):
    # Rule: a synthetic set whose dataset.json differs only in format_version (made by an older kd_tune, other audio
    # or splits) is rendered again in place; a set made with other arguments is refused, naming the folder.
    # (A copy of the session's set, seed 0, stands for the older one: one synthesis instead of two.)
    older = shutil.copytree(small_dataset, tmp_path / "older")
    meta = json.loads((older / "dataset.json").read_text())
    (older / "dataset.json").write_text(json.dumps({**meta, "format_version": meta["format_version"] - 1}))
    (older / "manifest.jsonl").write_text("")
    synth.synthesize(older, size="small", seed=0, progress=False)
    assert json.loads((older / "dataset.json").read_text()) == meta
    assert (older / "manifest.jsonl").read_bytes() == (small_dataset / "manifest.jsonl").read_bytes()
    with pytest.raises(DataError, match=str(older)):
        synth.synthesize(older, size="small", seed=4, progress=False)


# ------------------------------------------------------------------------------------------ long recordings


def noise(seconds: float, rate: int, *, channels: int = 1, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((round(seconds * rate), channels))).astype(np.float32)


def one_per_kind() -> Split:
    """A split of one clip per kind, each clip filled with its index."""
    audio = torch.arange(len(KINDS), dtype=torch.float32)[:, None].expand(-1, N_SAMPLES).clone()
    return Split(audio, torch.tensor([1, 0, 0, 0]), list(KINDS))


def test_long_recordings_are_the_stream_in_name_order_at_16_khz(tmp_path):
    # Rule: a split's long recordings, read in name order, mixed to mono and resampled to 16 kHz, are its stream,
    # and each split reads only its own folder.
    folder = tmp_path / LONG_FOLDER / "val"
    folder.mkdir(parents=True)
    stereo, mono = noise(3, 48_000, channels=2, seed=1), noise(2, SAMPLE_RATE, seed=2)
    sf.write(folder / "b.wav", stereo, 48_000, subtype="FLOAT")
    sf.write(folder / "a.wav", mono, SAMPLE_RATE, subtype="FLOAT")
    stream = negative_stream(tmp_path, one_per_kind(), "val")
    expected_b = torch.from_numpy(resample(stereo.mean(axis=1), 48_000, SAMPLE_RATE))  # the one resampler
    assert torch.equal(stream[:len(mono)], torch.from_numpy(mono[:, 0]))
    assert len(stream) == len(mono) + len(expected_b)
    assert torch.allclose(stream[len(mono):], expected_b, atol=1e-6)
    assert len(negative_stream(tmp_path, one_per_kind(), "test")) == 2 * N_SAMPLES  # no long/test: the fallback


def test_without_recordings_the_stream_never_joins_hard_negatives(tmp_path):
    # Rule: the fallback stream is the split's negative and background clips end to end; hard negatives ("hey",
    # "nova") stay out, as two of them in a row could say the wake word.
    stream = negative_stream(tmp_path, one_per_kind(), "val")
    assert torch.equal(stream, torch.cat([torch.full((N_SAMPLES,), 2.0), torch.full((N_SAMPLES,), 3.0)]))
    with pytest.raises(ValueError, match="'dev'"):
        negative_stream(tmp_path, one_per_kind(), "dev")


def test_long_train_recordings_are_trained_on_as_negative_windows(tmp_path):
    # Rule: long/train/ recordings are cut into consecutive whole windows appended to the training split as
    # negatives (the short tail dropped), val and test keep their clips, and the data hash follows the recordings'
    # audio, so a teacher cache of the set without them is never reused.
    root = clean_folder(tmp_path)
    for name in ("positive", "negative"):
        sf.write(root / name / f"{speakers_in('train', 1)[0]}_good.wav", tone(0.8, 16000, amplitude=0.3), 16000)
    before = load_dataset(root)
    (root / LONG_FOLDER / "train").mkdir(parents=True)
    recording = noise(3.5, 22_050, seed=3)
    sf.write(root / LONG_FOLDER / "train" / "000.wav", recording, 22_050, subtype="FLOAT")
    after = load_dataset(root)
    windows = after.train.audio[len(before.train.audio):]
    expected = torch.from_numpy(resample(recording[:, 0], 22_050, SAMPLE_RATE))[:3 * N_SAMPLES]
    assert windows.shape == (3, N_SAMPLES) and torch.allclose(windows.reshape(-1), expected, atol=1e-6)
    assert after.train.labels[len(before.train.audio):].tolist() == [0, 0, 0]
    assert after.train.kinds == before.train.kinds + ["long"] * 3
    assert torch.equal(after.val.audio, before.val.audio) and torch.equal(after.test.audio, before.test.audio)
    assert after.manifest_sha256 != before.manifest_sha256
    sf.write(root / LONG_FOLDER / "train" / "000.wav", noise(3.5, 22_050, seed=4), 22_050, subtype="FLOAT")
    assert load_dataset(root).manifest_sha256 not in (before.manifest_sha256, after.manifest_sha256)


def test_straddle_windows_cut_each_positive_with_long_audio_on_one_side():
    # Rule: a straddle window is its positive clip shifted by 10-70% of a window to either side, the gap filled by
    # one window of long audio; per_positive windows per clip, in clip order, and the same windows for the same seed
    # (the teacher cache is keyed on them); never more windows than the long audio holds, and one is enough.
    n = 1000
    positives = torch.arange(1, 4, dtype=torch.float32)[:, None].expand(-1, n).clone()  # clip p holds p
    context = -torch.arange(1, 13, dtype=torch.float32)[:, None].expand(-1, n).clone()  # long window w holds -(w + 1)
    windows = straddle_windows(positives, context, per_positive=4, seed=5)
    assert windows.shape == (12, n)
    low, high = data_module.STRADDLE_SHIFT
    sides = set()
    for m, window in enumerate(windows):
        from_clip = window == m // 4 + 1  # [n]
        assert low * n <= n - int(from_clip.sum()) <= high * n
        clip_first = bool(from_clip[0])
        sides.add(clip_first)
        heard = window[~from_clip]
        assert heard.unique().numel() == 1 and heard[0] < 0  # one long window fills the gap
        # the clip is one run at one end: what comes before it ends with it, what comes after starts with it
        assert torch.equal(from_clip, torch.arange(n) < from_clip.sum() if clip_first else
                           torch.arange(n) >= n - from_clip.sum())
    assert sides == {True, False}
    assert torch.equal(straddle_windows(positives, context, per_positive=4, seed=5), windows)
    assert not torch.equal(straddle_windows(positives, context, per_positive=4, seed=6), windows)
    capped = straddle_windows(positives, context[:5], per_positive=4)
    assert capped.shape == (5, n) and capped.lt(0).any(dim=1).all() and capped.gt(0).any(dim=1).all()
    assert straddle_windows(positives, context[:1], per_positive=1).shape == (1, n)
    with pytest.raises(ValueError, match=r"\[W >= 1"):
        straddle_windows(positives, context[:0], per_positive=1)


def test_straddle_windows_join_training_unlabelled_and_leave_the_teachers_hash_alone(tmp_path):
    # Rule: with long/train/ audio, straddles_per_positive windows per training positive follow the long windows,
    # labelled UNLABELLED; they change the data hash (the teacher cache holds their logits) but not labelled_sha256
    # (a teacher is fine-tuned without them); Split.labelled() drops them; none without long audio.
    root = clean_folder(tmp_path)
    speaker = speakers_in("train", 1)[0]
    for name, clips in (("positive", 2), ("negative", 1)):
        for i in range(clips):
            sf.write(root / name / f"{speaker}_{i}.wav", tone(0.8, 16000, amplitude=0.3 + 0.1 * i), 16000)
    assert load_dataset(root, straddles_per_positive=2).train.kinds.count(STRADDLE_KIND) == 0
    (root / LONG_FOLDER / "train").mkdir(parents=True)
    sf.write(root / LONG_FOLDER / "train" / "000.wav", noise(5.0, 16000, seed=3), 16000)  # room for 4 windows
    plain, straddled = load_dataset(root), load_dataset(root, straddles_per_positive=2)
    positives = int((plain.train.labels == 1).sum())
    assert positives == 2
    assert straddled.train.kinds == plain.train.kinds + [STRADDLE_KIND] * 2 * positives
    assert straddled.train.labels[len(plain.train.labels):].eq(UNLABELLED).all()
    assert torch.equal(straddled.train.audio[:len(plain.train.labels)], plain.train.audio)
    assert straddled.manifest_sha256 != plain.manifest_sha256
    assert straddled.labelled_sha256 == plain.labelled_sha256 == plain.manifest_sha256
    labelled = straddled.train.labelled()
    assert torch.equal(labelled.audio, plain.train.audio) and torch.equal(labelled.labels, plain.train.labels)
    assert labelled.kinds == plain.train.kinds


def test_a_manifest_path_through_a_folder_linked_out_of_the_set_is_refused(tmp_path):
    # Rule: manifest paths are confined like `..` after every link is resolved: `outdir/tone.wav` with outdir a link
    # to a folder outside the data set is refused; a link that stays inside the set is followed.
    outside = tmp_path / "outside"
    outside.mkdir()
    sf.write(outside / "tone.wav", tone(0.8, 16000), 16000)
    root = tmp_path / "set"
    write_manifest(root, [json.dumps({"path": "outdir/tone.wav", "label": 1, "kind": "positive", "split": "train"})])
    (root / "outdir").symlink_to(outside)
    with pytest.raises(DataError, match="manifest.jsonl:1: path 'outdir/tone.wav' leaves the data set"):
        scan(root)
    (root / "inside").mkdir()
    sf.write(root / "inside" / "tone.wav", tone(0.8, 16000), 16000)
    (root / "outdir").unlink()
    (root / "outdir").symlink_to(root / "inside")
    assert [c.path for c in scan(root)] == [root / "outdir" / "tone.wav"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["FIFO", "directory"])
def test_a_manifest_that_is_no_file_is_refused_without_blocking(tmp_path, kind):
    # Rule: a manifest.jsonl (read by `data check`, `eval`, training) that is a FIFO or a folder is refused by a
    # stat before any open, in one line, not waited on nor taken for a set without a manifest.
    os.mkfifo(tmp_path / "manifest.jsonl") if kind == "FIFO" else (tmp_path / "manifest.jsonl").mkdir()
    for read in (check, scan, lambda root: data_module.read_text_within(root / "manifest.jsonl", 100)):
        with pytest.raises(SpecialFileError, match=f"manifest.jsonl: not a regular file \\(a {kind}\\); allowed"):
            read(tmp_path)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("content", ["FIFO", "{", "[" * 100_000, "x" * (synth.MAX_DATASET_JSON_BYTES + 1)])
def test_a_dataset_json_that_is_no_marker_is_refused_in_one_line(tmp_path, content):
    # Rule: `kd-tune data synth` reads an existing dataset.json within bounds: a FIFO is refused without blocking,
    # broken, deep or huge JSON is one DataError naming the file, never a traceback or a hang.
    marker = tmp_path / "dataset.json"
    os.mkfifo(marker) if content == "FIFO" else marker.write_text(content)
    with pytest.raises((DataError, SpecialFileError), match="dataset.json: (not a regular file|not valid JSON|larger)"):
        synthesize(tmp_path, size="small", progress=False)


@pytest.mark.slow
def test_an_excluded_engine_leaves_every_split(small_dataset):
    # Rule: data.exclude_engines drops that engine's clips from every split (leave-one-engine-out training), and
    # nothing else; the data hash changes, so no teacher of the full set is taken for current.
    from kd_tune.datasets.data import engine_of

    full, without = load_dataset(small_dataset), load_dataset(small_dataset, exclude_engines=("espeak",))
    entries = manifest_of(small_dataset)
    for split in SPLITS:
        kept = [e for e in entries if e["split"] == split and engine_of(e["voice"]) != "espeak"]
        assert getattr(without, split).kinds[:len(kept)] == [e["kind"] for e in kept]
    assert len(without.train.labels) < len(full.train.labels)
    assert without.manifest_sha256 != full.manifest_sha256
    assert engine_of("espeak:en+m1") == "espeak" and engine_of("noise:pink") == "noise" and engine_of("s01") == "user"


# ------------------------------------------------------------------------------------ a user's recordings added


def manifest_set(root: Path) -> Path:
    """A data set with a manifest: one 16 kHz positive and negative tone per split."""
    lines = []
    for split in SPLITS:
        for kind, amplitude in (("positive", 0.5), ("negative", 0.3)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            sf.write(root / kind / f"{split}.wav", tone(0.9, 16000, amplitude=amplitude), 16000)
            lines.append(json.dumps({"path": f"{kind}/{split}.wav", "label": LABEL_OF_KIND[kind], "kind": kind,
                                     "text": None, "voice": "piper:joe/en-us", "split": split}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def recordings(root: Path) -> dict[str, str]:
    """A user's folder: clips at other rates (one stereo FLAC, one in a subfolder, one without a speaker id), a note,
    and long recordings for train and val; {path under root: the split kd_tune.datasets.data would give it}."""
    train, val, test = speakers_in("train", 1)[0], speakers_in("val", 1)[0], speakers_in("test", 1)[0]
    files = {f"positive/{train}_1.wav": (44_100, 1), f"positive/{val}_1.wav": (8_000, 1),
             f"positive/{test}_1.flac": (22_050, 2), f"negative/{train}_2.wav": (48_000, 1),
             "negative/nospeaker.wav": (16_000, 1), "background/hum.wav": (32_000, 1),
             f"hard_negative/kitchen/{train}_3.wav": (11_025, 1)}
    for name, (rate, channels) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        audio = tone(0.8, rate, amplitude=0.4)
        sf.write(root / name, np.stack([audio] * channels, axis=1) if channels > 1 else audio, rate)
    (root / "positive/notes.txt").write_text("recorded in the kitchen")
    for split, seconds, rate in (("train", 3.5, 22_050), ("val", 2.0, 48_000)):
        (root / LONG_FOLDER / split).mkdir(parents=True)
        sf.write(root / LONG_FOLDER / split / "room.wav", noise(seconds, rate, seed=5), rate, subtype="FLOAT")
    return {name: split_for(data_module.speaker_of(name) or name) for name in files}


def test_data_add_copies_a_users_recordings_into_their_splits(tmp_path, capsys):
    # Rule: `kd-tune data add SOURCE --to DATASET` copies clips (any rate, any channels) byte for byte to
    # DATASET/user/<kind>/, lists them in manifest.jsonl with the split a folder data set would give them (speaker id
    # prefix, else the path) and voice user:<speaker>; long recordings go to long/<split>/user_<name>; loading then
    # holds every added clip in its split, trains on the long/train windows, counts false activations on long/val,
    # and the data hash changes.
    from kd_tune.cli import main
    from kd_tune.config import DataConfig
    from kd_tune.datasets.data import load_data

    dataset, source = manifest_set(tmp_path / "set"), tmp_path / "mine"
    splits = recordings(source)
    before = load_dataset(dataset)
    assert main(["data", "add", str(source), "--to", str(dataset)]) == 0
    out = capsys.readouterr().out
    assert f"added 7 clips to {dataset / 'manifest.jsonl'} under user/: positive 3 (" in out
    assert f"added a long recording: {dataset / 'long/train/user_room.wav'} (3.5 s)" in out
    assert "ignored: 1 files that are not .wav or .flac" in out
    added = {e["path"]: e for e in manifest_of(dataset)[len(SPLITS) * 2:]}
    assert set(added) == {f"user/{name}" for name in splits}
    for name, split in splits.items():
        entry = added[f"user/{name}"]
        assert (entry["split"], entry["kind"]) == (split, name.split("/")[0])
        assert entry["voice"] == ("user" if name.startswith(("negative/nospeaker", "background")) else
                                  f"user:{data_module.speaker_of(name)}")
        assert (dataset / "user" / name).read_bytes() == (source / name).read_bytes()
    after = load_data(DataConfig(root=str(dataset), straddles_per_positive=0))
    for split in SPLITS:
        part, was = getattr(after, split), getattr(before, split)
        clips = [k for k in part.kinds if k != "long"]
        assert len(clips) == len(was.kinds) + sum(s == split for s in splits.values())
        assert int((part.labels == 1).sum()) == int((was.labels == 1).sum()) + sum(
            s == split for n, s in splits.items() if n.startswith("positive"))
    assert after.train.kinds.count("long") == 3 and before.train.kinds.count("long") == 0
    assert len(after.val_stream) == 2 * SAMPLE_RATE  # loaded once: workers never read data.root
    assert after.manifest_sha256 != before.manifest_sha256


def test_data_add_refuses_unusable_files_and_overwrites_nothing(tmp_path, capsys):
    # Rule: an unusable file (as `kd-tune data check` calls it) refuses the whole addition in one line and nothing is
    # copied or listed; a target holding other bytes is never overwritten; adding the same folder again adds
    # nothing, and a clip copied by a run stopped before its manifest is listed then; a data set without a
    # manifest is refused.
    from kd_tune.cli import main

    dataset, source = manifest_set(tmp_path / "set"), tmp_path / "mine"
    listed = (dataset / "manifest.jsonl").read_bytes()
    (source / "positive").mkdir(parents=True)
    sf.write(source / "positive/s1_good.wav", tone(0.8, 44_100), 44_100)
    sf.write(source / "positive/s1_silent.wav", np.zeros(16_000, np.float32), 16_000)
    assert main(["data", "add", str(source), "--to", str(dataset)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kd-tune: {source / 'positive/s1_silent.wav'}: silent (") and err.count("\n") == 1
    assert "nothing was added" in err
    assert (dataset / "manifest.jsonl").read_bytes() == listed and not (dataset / "user").exists()
    (source / "positive/s1_silent.wav").unlink()
    assert main(["data", "add", str(source), "--to", str(dataset)]) == 0
    grown = (dataset / "manifest.jsonl").read_bytes()
    assert main(["data", "add", str(source), "--to", str(dataset)]) == 0
    assert "already in the data set, left as they are: 1 files" in capsys.readouterr().out
    assert (dataset / "manifest.jsonl").read_bytes() == grown
    (dataset / "manifest.jsonl").write_bytes(listed)  # as if the first run had stopped before its manifest
    assert main(["data", "add", str(source), "--to", str(dataset)]) == 0
    assert (dataset / "manifest.jsonl").read_bytes() == grown
    copied = (dataset / "user/positive/s1_good.wav").read_bytes()
    sf.write(source / "positive/s1_good.wav", tone(0.8, 44_100, amplitude=0.2), 44_100)
    with pytest.raises(DataError, match=r"s1_good.wav: holds another file than .* \(never overwritten\)"):
        main(["--debug", "data", "add", str(source), "--to", str(dataset)])
    assert (dataset / "user/positive/s1_good.wav").read_bytes() == copied
    with pytest.raises(DataError, match="no manifest.jsonl; allowed"):
        main(["--debug", "data", "add", str(source), "--to", str(clean_folder(tmp_path / "folder_set"))])
