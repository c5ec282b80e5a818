"""Negative audio: general speech from a built-in vocabulary, non-speech sounds, and the long negative streams
`long/<split>/NNN.wav`: those of the validation and test splits are what false accepts per hour are counted on, the
training split's is cut into windows the detector trains on as negatives (kd_tune.datasets.data).

A stream is pure negative: it never holds a word of the wake word, so no two pieces can join into it.
"""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from kd_tune.audio.features import SAMPLE_RATE
from kd_tune.datasets.data import DataError
from kd_tune.datasets.userdata import USER_PREFIX
from kd_tune.datasets.voices import Utterance, VoiceFile, draw_utterance, one_torch_thread, speak_all, speech_16k
from kd_tune.errors import shown
from kd_tune.progress import progress_bar

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
# Common words chosen to cover English phonemes (th, sh, ch, j, zh, ng, r/l/w/y, every vowel and diphthong).
WORDS = {
    "name": "anna ben carlos daisy emma frank george julia kevin laura mohammed olivia peter rachel samuel thomas "
            "victor william zoe isabel yusuf chloe",
    "subject": "i you we they he she everyone nobody",
    "person": "friend teacher neighbour sister brother father mother doctor driver farmer baker nurse uncle cousin "
              "boss pilot",
    "noun": "apple bag ball bank basket bed bicycle bird boat book bottle box bread bridge brush bus button cake "
            "camera candle car chair cheese chicken city clock cloud coat computer cup cushion desk dinner dog door "
            "dress egg engine face farm feather fence field film fish flower forest fork garden gate gift giraffe "
            "glass guitar hammer hat hill horse house island jacket jar juice jungle key kitchen knife lamp leaf "
            "letter library lunch map market milk mirror money moon mountain mouse needle newspaper ocean orange "
            "oyster page paper park pencil phone piano picture pillow plate pocket potato question radio river road "
            "roof room rope salad school shirt shoe shop shoulder shower sky snow soap sock song soup spoon square "
            "star station stone story street sugar table television tent thread thumb ticket tiger toast tomato "
            "tooth towel tower toy train treasure tree truck umbrella village violin voice wall wallet water wheel "
            "window winter wood yard yogurt zipper zoo church judge chimney",
    "adjective": "big small old new red blue green yellow white black bright dark quiet loud warm cold hot cool soft "
                 "hard heavy light clean dirty empty full fresh strange simple busy happy sad tired hungry funny "
                 "lovely lucky early late rough smooth sharp thick thin wooden golden purple broken careful friendly "
                 "famous pleasant usual huge tiny",
    "verb": "bring:brought buy:bought carry:carried catch:caught choose:chose clean:cleaned cook:cooked cut:cut "
            "draw:drew drink:drank drive:drove eat:ate fix:fixed find:found follow:followed forget:forgot give:gave "
            "hear:heard hold:held join:joined keep:kept leave:left lift:lifted like:liked measure:measured "
            "miss:missed move:moved need:needed open:opened order:ordered paint:painted pick:picked push:pushed "
            "remember:remembered sell:sold send:sent share:shared show:showed take:took teach:taught throw:threw "
            "touch:touched wash:washed watch:watched wear:wore borrow:borrowed check:checked enjoy:enjoyed "
            "visit:visited use:used build:built break:broke change:changed",
    "preposition": "in on under behind beside near with from into across through over above below around inside "
                   "outside past toward by",
    "time": "today tomorrow yesterday tonight later again soon now this_morning last_night next_week every_day "
            "after_lunch on_sunday on_thursday in_the_evening at_noon before_school right_now once_more for_a_while "
            "at_seven at_eight_thirty at_six_fifteen in_june in_august",
    "modal": "will can should might must could would want_to need_to have_to tried_to forgot_to",
    "question": "what where why when how",
    "number": "two three four five six nine ten eleven twelve twenty forty hundred",
}
WORD_LISTS = {slot: tuple(w.replace("_", " ") for w in words.split()) for slot, words in WORDS.items()}
VERB_FORMS = tuple(tuple(pair.split(":")) for pair in WORDS["verb"].split())
IRREGULAR_PLURALS = {"knife": "knives", "leaf": "leaves", "mouse": "mice", "tooth": "teeth", "fish": "fish"}
# [...] is optional (kept with probability 1/2); {slot} draws a word; {verb} is the base form, {past} the past tense,
# {plural} a noun's plural.
TEMPLATES = (
    "{subject} {past} the [{adjective}] {noun} [{preposition} the {noun}] [{time}]",
    "{subject} {modal} {verb} the [{adjective}] {noun} [{preposition} the {noun}]",
    "did you {verb} the {noun} [{time}]",
    "{question} did the {person} {verb} [the {noun}]",
    "please {verb} the [{adjective}] {noun} [{preposition} the {noun}]",
    "the {adjective} {noun} is {preposition} the {noun}",
    "there is a [{adjective}] {noun} {preposition} the {noun} [{time}]",
    "i think the {noun} is [very] {adjective}",
    "{name} and {name} {past} a {noun} [{time}]",
    "[{time}] my {person} {past} a [{adjective}] {noun}",
    "{name} {past} {number} {plural} [{preposition} the {noun}]",
    "is the {noun} {adjective} or {adjective}",
    "the {person} said the {noun} was [too] {adjective}",
    "{question} is the {adjective} {noun} [{time}]",
    "we {modal} {verb} it {time}",
    "{name}, {verb} the {noun} [and the {noun}] [{time}]",
)
MIN_WORDS, MAX_WORDS = 3, 12
EVERYDAY_SHARE = 0.25  # of general speech; the rest is generated sentences
MAX_TEXT_DRAWS = 200  # a wake word made of common words ("the") could make every draw fail: refused, not looped

# Sounds
NOISE_EXPONENTS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1 / f^exponent
NOTES_PER_S = (1.0, 4.0)
NOTE_S = (0.15, 1.2)
MIDI_NOTES = (45, 86)  # A2 to C#6
CHORD_STEPS = (0, 3, 4, 7, 12)  # semitones above the root
N_HARMONICS = 8
TRANSIENTS_PER_S = (1.0, 4.0)

# Streams
STREAM_SPLITS = ("train", "val", "test")  # train and val: voices not held out; test: held-out families only
STREAM_S = {"small": 120.0, "default": 3600.0, "large": 3 * 3600.0}  # of each evaluation split
# The training stream; small: sized for the tests. 3 h beats 1 h over three seeds at the default size, but makes the
# demo about twice as long (README, "Quality outside the studio"): data.synth_train_hours sets it.
TRAIN_STREAM_S = {"small": 10.0, "default": 3600.0, "large": 3 * 3600.0}
# One distinct utterance per this much stream (about one part's length), so an utterance is rarely heard twice: a
# repeated one that fires would count as several false activations.
STREAM_S_PER_UTTERANCE = 4.0
STREAM_FILE_S = 600.0  # the most one file holds
RENDER_THREADS = 2  # files render independently, mostly in numpy FFTs, which release the GIL
GAP_S = (0.2, 3.0)
SOUND_PROBABILITY = 0.1  # of the parts of a stream; the rest is speech
SOUND_S = (1.0, 6.0)
STREAM_SOUNDS = ("music", "transient", "hum", "white", "pink")
PLANNED_WORD_S = 0.2  # a lower bound on a word's length: plans always hold more than a file's length
STREAM_SPEECH_DB = (-38.0, -20.0)  # rms dBFS of a file's speech ...
PART_LEVEL_DB = 6.0  # ... each part within +- this of it
STREAM_SNR_DB = (5.0, 30.0)  # of the noise bed below the speech, per block
NOISE_BLOCK_S = (10.0, 60.0)
HUM_PROBABILITY = 0.2  # of noise-bed blocks
STREAM_PEAK = 0.9
STREAM_SEED_SALT = 7919  # keeps the streams' generators apart from the clips'


def words_of(text: str) -> list[str]:
    """Lower-case words without punctuation."""
    return "".join(c if c.isalnum() or c == "'" else " " for c in text.lower()).split()


def sentence(rng: np.random.Generator, *, max_words: int = MAX_WORDS) -> str:
    """A random sentence of MIN_WORDS-max_words words from TEMPLATES and the built-in vocabulary."""
    for _ in range(MAX_TEXT_DRAWS):  # most draws fit the length
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        text = re.sub(r"\[([^]]*)]", lambda m: m.group(1) if rng.random() < 0.5 else "", template)
        text = re.sub(r"{(\w+)}", lambda m: draw_word(rng, m.group(1)), text)
        text = re.sub(r"\ba (?=[aeiou])", "an ", " ".join(text.split()))
        if MIN_WORDS <= len(text.split()) <= max_words:
            return text
    raise ValueError(f"no sentence of {MIN_WORDS}-{max_words} words in {MAX_TEXT_DRAWS} draws")


def draw_word(rng: np.random.Generator, slot: str) -> str:
    if slot in ("verb", "past"):
        return VERB_FORMS[rng.integers(len(VERB_FORMS))][slot == "past"]
    if slot == "plural":
        return plural(draw_word(rng, "noun"))
    return WORD_LISTS[slot][rng.integers(len(WORD_LISTS[slot]))]


def plural(noun: str) -> str:
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    return noun[:-1] + "ies" if noun.endswith("y") and noun[-2] not in "aeiou" else noun + "s"


def general_text(rng: np.random.Generator, wakeword: str, *, max_words: int = MAX_WORDS) -> str:
    """Everyday phrase or generated sentence holding no word of the wake word."""
    banned = set(words_of(wakeword))
    for _ in range(MAX_TEXT_DRAWS):
        if rng.random() < EVERYDAY_SHARE:
            text = EVERYDAY_PHRASES[rng.integers(len(EVERYDAY_PHRASES))]
        else:
            text = sentence(rng, max_words=max_words)
        if banned.isdisjoint(words_of(text)):
            return text
    raise DataError(f"wakeword {shown(wakeword)}: its words are in nearly every sentence, so no general speech is "
                    "left to be a negative; allowed: a wake word of less common words")


# --------------------------------------------------------------------------------------------------------- sounds


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


def music(rng: np.random.Generator, n_samples: int) -> np.ndarray:
    """Notes and chords of a few harmonics, each with a fast attack and an exponential decay [n_samples]."""
    out = 0.001 * coloured_noise(rng, n_samples, 1.0)
    brightness = rng.uniform(0.7, 2.0)  # harmonic k has amplitude ~ k^-brightness
    for _ in range(max(1, round(n_samples / SAMPLE_RATE * rng.uniform(*NOTES_PER_S)))):
        start = int(rng.integers(0, max(1, n_samples - SAMPLE_RATE // 10)))
        length = min(n_samples - start, int(rng.uniform(*NOTE_S) * SAMPLE_RATE))
        t_s = np.arange(length) / SAMPLE_RATE
        envelope = np.minimum(t_s / rng.uniform(0.003, 0.05), 1) * np.exp(-t_s / rng.uniform(0.1, 0.8))
        root = int(rng.integers(*MIDI_NOTES))
        for step in rng.choice(CHORD_STEPS, size=int(rng.integers(1, 4)), replace=False):
            out[start:start + length] += rng.uniform(0.3, 1) * envelope * note(rng, root + step, t_s, brightness)
    return out


def note(rng: np.random.Generator, midi: int, t_s: np.ndarray, brightness: float) -> np.ndarray:
    """A harmonic tone [len(t_s)] at a MIDI pitch, harmonics above Nyquist left out."""
    f0_hz = 440 * 2 ** ((midi - 69) / 12)
    harmonics = np.arange(1, N_HARMONICS + 1)
    harmonics = harmonics[harmonics * f0_hz < SAMPLE_RATE / 2]
    amplitudes = harmonics ** -brightness * rng.uniform(0.5, 1, len(harmonics))
    phases = rng.uniform(0, 2 * np.pi, len(harmonics))
    return amplitudes @ np.sin(2 * np.pi * f0_hz * harmonics[:, None] * t_s + phases[:, None])


def transients(rng: np.random.Generator, n_samples: int) -> np.ndarray:
    """Knocks, door-slam-like bursts and clicks at random times over faint room noise [n_samples]; the first event,
    the loudest, is a knock or a slam, so that a window is never only a click."""
    out = 0.002 * coloured_noise(rng, n_samples, 1.0)
    for i in range(max(1, round(n_samples / SAMPLE_RATE * rng.uniform(*TRANSIENTS_PER_S)))):
        start = int(rng.integers(0, n_samples))
        event = (knock, slam, clicks)[rng.integers(2 if i == 0 else 3)](rng)[:n_samples - start]
        out[start:start + len(event)] += (1 if i == 0 else rng.uniform(0.2, 0.7)) * event
    return out


def decaying(rng: np.random.Generator, tau_s: tuple[float, float]) -> np.ndarray:
    """An exponential decay over 5 time constants, the time constant drawn in tau_s."""
    tau = rng.uniform(*tau_s)
    return np.exp(-np.arange(round(5 * tau * SAMPLE_RATE)) / (tau * SAMPLE_RATE))


def click(rng: np.random.Generator) -> np.ndarray:
    envelope = decaying(rng, (0.0003, 0.002))
    return np.diff(rng.standard_normal(len(envelope) + 1)) * envelope / 4  # differenced: a bright click


def clicks(rng: np.random.Generator) -> np.ndarray:
    """1-4 clicks a few tens of milliseconds apart (a switch, a pen, typing)."""
    starts = np.cumsum(rng.uniform(0.02, 0.2, int(rng.integers(1, 5))) * SAMPLE_RATE).astype(int)
    out = np.zeros(starts[-1] + SAMPLE_RATE // 20)
    for start in starts - starts[0]:
        event = click(rng)
        out[start:start + len(event)] += event[:len(out) - start]
    return out


def knock(rng: np.random.Generator) -> np.ndarray:
    envelope = decaying(rng, (0.008, 0.04))
    t_s = np.arange(len(envelope)) / SAMPLE_RATE
    body = np.sin(2 * np.pi * rng.uniform(80, 400) * t_s) * envelope
    return body + 0.5 * rng.standard_normal(len(envelope)) * envelope ** 8  # the hit: a short noise burst


def slam(rng: np.random.Generator) -> np.ndarray:
    envelope = decaying(rng, (0.06, 0.3))
    t_s = np.arange(len(envelope)) / SAMPLE_RATE
    thud = np.sin(2 * np.pi * rng.uniform(40, 90) * t_s) * envelope ** 0.7
    burst = coloured_noise(rng, len(envelope), 2.0) * envelope  # the rumble of the door and the wall
    impact = click(rng)[:len(envelope)]
    burst[:len(impact)] += 2 * impact
    return thud + 0.5 * burst


def make_sound(kind: str, rng: np.random.Generator, n_samples: int) -> np.ndarray:
    """Non-speech audio [n_samples] of a kind: music, transient, hum or a noise colour (unlevelled)."""
    if kind == "music":
        return music(rng, n_samples)
    if kind == "transient":
        return transients(rng, n_samples)
    if kind == "hum":
        return mains_hum(rng, n_samples)
    return coloured_noise(rng, n_samples, NOISE_EXPONENTS[kind])


# -------------------------------------------------------------------------------------------------------- streams


@dataclass(frozen=True)
class StreamPart:
    """One stretch of a stream after a gap of noise bed: a pool utterance, or a non-speech sound."""

    gap_s: float
    utterance: int | None = None  # index into StreamPlan.pool
    sound: str | None = None  # one of STREAM_SOUNDS
    sound_s: float = 0.0


@dataclass(frozen=True)
class StreamPlan:
    """A split's long negative stream: distinct utterances (rendered once, heard several times) and the parts of each
    file in order; a file ends where its next part would not fit, so plans hold more parts than fit."""

    split: str
    pool: tuple[Utterance, ...]
    files: tuple[tuple[StreamPart, ...], ...]
    file_s: tuple[float, ...]

    def path(self, index: int) -> str:
        return f"long/{self.split}/{index:03d}.wav"


def plan_streams(wakeword: str, *, seed: int, size: str, voices: tuple[VoiceFile, ...] = (),
                 train_s: float | None = None) -> list[StreamPlan]:
    """The training, validation and test streams of a synthetic set: voices not held out (the user's voice files
    among them) for the first two, held-out families only for the test stream. train_s: the training stream's
    length, if not the size's."""
    return [plan_stream(wakeword, split, seed=seed, size=size, voices=voices,
                        seconds=train_s if split == "train" else None) for split in STREAM_SPLITS]


def plan_stream(wakeword: str, split: str, *, seed: int, size: str, voices: tuple[VoiceFile, ...] = (),
                seconds: float | None = None) -> StreamPlan:
    rng = np.random.default_rng([seed, STREAM_SEED_SALT, STREAM_SPLITS.index(split)])
    total_s = seconds or (TRAIN_STREAM_S if split == "train" else STREAM_S)[size]
    pool = tuple(draw_utterance(rng, general_text(rng, wakeword), held_out=split == "test", files=voices)
                 for _ in range(math.ceil(total_s / STREAM_S_PER_UTTERANCE)))
    whole_files, rest_s = divmod(total_s, STREAM_FILE_S)
    file_s = (STREAM_FILE_S,) * int(whole_files) + ((rest_s,) if rest_s else ())
    files = tuple(plan_parts(rng, pool, seconds) for seconds in file_s)
    return StreamPlan(split, pool, files, file_s)


def plan_parts(rng: np.random.Generator, pool: tuple[Utterance, ...], seconds: float) -> tuple[StreamPart, ...]:
    """Parts whose least possible length (PLANNED_WORD_S a word) passes `seconds`."""
    parts, planned_s = [], 0.0
    while planned_s < seconds:
        gap_s = float(rng.uniform(*GAP_S))
        if rng.random() < SOUND_PROBABILITY:
            part = StreamPart(gap_s, sound=STREAM_SOUNDS[rng.integers(len(STREAM_SOUNDS))],
                              sound_s=round(float(rng.uniform(*SOUND_S)), 3))
            planned_s += gap_s + part.sound_s
        else:
            utterance = int(rng.integers(len(pool)))
            part = StreamPart(gap_s, utterance=utterance)
            planned_s += gap_s + PLANNED_WORD_S * len(pool[utterance].text.split())
        parts.append(part)
    return tuple(parts)


def render_stream_file(plan: StreamPlan, index: int, voices: list[np.ndarray], *, seed: int) -> np.ndarray:
    """One file [n] float32 of a stream: its parts one after the other over a noise bed, until the next would not fit.

    The test stream keeps its held-out voices as they are; the others make new speakers as the training clips do.
    """
    rng = np.random.default_rng([seed, STREAM_SEED_SALT, STREAM_SPLITS.index(plan.split), index])
    n_samples = round(plan.file_s[index] * SAMPLE_RATE)
    speech_db = rng.uniform(*STREAM_SPEECH_DB)
    out = noise_bed(rng, n_samples, speech_db)
    position = 0
    for part in plan.files[index]:
        position += round(part.gap_s * SAMPLE_RATE)
        if part.sound is not None:
            audio = make_sound(part.sound, rng, round(part.sound_s * SAMPLE_RATE))
        else:
            assert part.utterance is not None  # a part is a sound or an utterance
            audio = speech_16k(voices[part.utterance], rng, speakers=plan.split != "test")
        if position + len(audio) > n_samples:
            break
        out[position:position + len(audio)] += at_rms(audio, speech_db + rng.uniform(-PART_LEVEL_DB, PART_LEVEL_DB))
        position += len(audio)
    return np.clip(out, -1, 1).astype(np.float32)


def at_rms(audio: np.ndarray, rms_db: float) -> np.ndarray:
    """Audio scaled to an rms level in dBFS, its peak held below STREAM_PEAK."""
    rms, peak = np.sqrt(np.mean(np.square(audio))), np.abs(audio).max(initial=0)
    if peak == 0:
        return audio
    return audio * min(10 ** (rms_db / 20) / rms, STREAM_PEAK / peak)


def noise_bed(rng: np.random.Generator, n_samples: int, speech_db: float) -> np.ndarray:
    """Coloured noise [n_samples] (sometimes with hum) in blocks of their own colour and SNR below speech_db."""
    out = np.empty(n_samples, np.float32)
    position = 0
    while position < n_samples:
        length = min(n_samples - position, round(rng.uniform(*NOISE_BLOCK_S) * SAMPLE_RATE))
        colour = list(NOISE_EXPONENTS)[rng.integers(len(NOISE_EXPONENTS))]
        block = coloured_noise(rng, length, NOISE_EXPONENTS[colour])
        if rng.random() < HUM_PROBABILITY:
            block = block + rng.uniform(0.3, 3) * mains_hum(rng, length)
        level = 10 ** ((speech_db - rng.uniform(*STREAM_SNR_DB)) / 20)
        out[position:position + length] = block * (level / block.std())
        position += length
    return out


def write_streams(out_dir: Path, plans: list[StreamPlan], *, seed: int, progress: bool) -> None:
    """Render every plan's files to out_dir/long/<split>/NNN.wav (16 kHz PCM_16), each written atomically."""
    utterances = [u for plan in plans for u in plan.pool]
    voices: list[np.ndarray] = [np.zeros(0, np.float32)] * len(utterances)
    n_files = sum(len(plan.files) for plan in plans)
    with one_torch_thread(), progress_bar(len(utterances) + n_files, "long streams", "part", enabled=progress) as bar:
        def keep(i: int, raw: np.ndarray) -> None:
            voices[i] = raw
            bar.update()

        speak_all(utterances, seed=seed, each=keep)
        jobs: list[tuple[StreamPlan, int, list[np.ndarray]]] = []  # (plan, file index, the plan's voices)
        first = 0
        for plan in plans:
            remove_unplanned(out_dir, plan)
            plan_voices = voices[first:first + len(plan.pool)]
            jobs += [(plan, index, plan_voices) for index in range(len(plan.files))]
            first += len(plan.pool)
        pool = ThreadPoolExecutor(max_workers=RENDER_THREADS)
        try:  # each file from its own seed, written in order
            for (plan, index, _), audio in zip(jobs, pool.map(lambda job: render_stream_file(*job, seed=seed), jobs),
                                               strict=True):
                write_wav_atomically(out_dir / plan.path(index), audio)
                bar.update()
        finally:  # after an error or Ctrl-C, the files not started are not rendered
            pool.shutdown(cancel_futures=True)


def remove_unplanned(out_dir: Path, plan: StreamPlan) -> None:
    """Delete what the plan will not write in its split's folder: files of a set of another size rendered here before,
    partial files of an interrupted run; never the recordings `kd-tune data add` put there."""
    folder = out_dir / "long" / plan.split
    folder.mkdir(parents=True, exist_ok=True)
    planned = {out_dir / plan.path(i) for i in range(len(plan.files))}
    ours = {p for p in {*folder.glob("*.wav"), *folder.glob("*.partial")} if not p.name.startswith(USER_PREFIX)}
    for path in ours - planned:
        path.unlink()


def write_wav_atomically(path: Path, audio: np.ndarray) -> None:
    partial = path.with_name(path.name + ".partial")
    sf.write(partial, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(partial, path)
