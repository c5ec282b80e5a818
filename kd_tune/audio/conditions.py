"""Acoustic conditions a detector is measured under: noise at a given SNR, rooms, levels and microphones.

Deliberately independent of training's augmentation (audio.acoustics, torch): other methods and other sources, so
that a grid built here measures robustness, not memory of the training generator. Noise is IIR-filtered (pink,
brown), modal-synthesised (household transients), FM-synthesised (music) or made of other speakers (babble, from the
audio under test's own split); rooms are image-source simulations (pyroomacoustics) of a living room, calibrated to
their nominal RT60; microphones are scipy IIR filters. numpy and scipy only: no torch, so `kd-tune eval` stays as
light as detection. Every condition is seeded: the same condition and key give the same samples.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import signal

from kd_tune.errors import InputError

SAMPLE_RATE = 16000  # Hz
NOISE_TYPES = ("white", "pink", "brown", "babble", "music", "transients", "hum")
SNRS_DB = (20.0, 10.0, 5.0, 0.0)
ROOM_RT60_S = (0.3, 0.6, 0.9)
DISTANCES_M = {"near": 1.0, "far": 3.5}  # from the talker's mouth to the device


@dataclass(frozen=True)
class Room:
    """A shoebox room, a standing talker and the direction (on the floor plan) in which the device lies."""

    dims_m: tuple[float, float, float]
    source_m: tuple[float, float, float]
    direction: tuple[float, float]  # unit vector
    device_height_m: float
    # Image-source rooms overshoot Sabine's formula: these Sabine inputs give the nominal RT60s, measured on the
    # response as pyroomacoustics does (Schroeder's backward integral, extrapolated to -60 dB), within 6% at 1 m and
    # 3.5 m (tests/audio/test_conditions.py checks it).
    sabine_input_s: dict[float, float]


ROOMS = {
    "living": Room((6.0, 4.5, 2.8), (1.5, 2.2, 1.6), (0.848, 0.530), 1.1, {0.3: 0.2488, 0.6: 0.4306, 0.9: 0.6072}),
    # validation's own: another room, talker and device, so that selection never sees the grid's responses
    "bedroom": Room((4.0, 3.5, 2.6), (0.6, 3.0, 1.5), (0.8, -0.6), 1.0, {0.3: 0.2701, 0.6: 0.4863, 0.9: 0.7029}),
}
LEVELS_DBFS = (-45.0, -35.0, -25.0, -12.0, -3.0)  # peak
MICROPHONES = ("telephone", "mems")
NOISE_BUFFER_S = 30  # each noise type is rendered once this long and cropped per clip
MAX_NOISE_FOLDER_S = 600  # of a user's noise folder
BABBLE_TALKERS = (4, 7)
TINY = 1e-12
GRID_SEED = 20261206  # the evaluation grid's; validation uses its own (kd_tune.training.scoring)


class ConditionError(InputError):
    """A condition name, grid or noise folder that cannot be used."""


@dataclass(frozen=True)
class Condition:
    """One acoustic condition; `group` says which of the fields apply."""

    name: str
    group: str  # clean | noise | room | level | mic
    noise: str | None = None
    snr_db: float | None = None
    rt60_s: float | None = None
    distance: str | None = None
    room: str = "living"
    peak_dbfs: float | None = None
    microphone: str | None = None


CLEAN = Condition("clean", "clean")


def noise_condition(noise: str, snr_db: float) -> Condition:
    return Condition(f"{noise}_snr{snr_db:g}", "noise", noise=noise, snr_db=snr_db)


def default_grid(noise_types: tuple[str, ...] = NOISE_TYPES) -> list[Condition]:
    """clean; every noise type at every SNR; rooms near and far; levels; microphones."""
    return [CLEAN, *(noise_condition(n, snr) for n in noise_types for snr in SNRS_DB),
            *(Condition(f"room_rt{rt:g}_{where}", "room", rt60_s=rt, distance=where)
              for rt in ROOM_RT60_S for where in DISTANCES_M),
            *(Condition(f"level_{db:g}dBFS", "level", peak_dbfs=db) for db in LEVELS_DBFS),
            *(Condition(f"mic_{mic}", "mic", microphone=mic) for mic in MICROPHONES)]


GRIDS = {"default": default_grid, "clean": lambda noise_types=(): [CLEAN]}


# ---------------------------------------------------------------- noise sources


def coloured(rng: np.random.Generator, n: int, colour: str) -> np.ndarray:
    """White noise, or white through a pink (-3 dB/octave: J. O. Smith's four-pole fit) or brown (a leaky
    integrator) filter."""
    white = rng.standard_normal(n)
    if colour == "pink":
        return signal.lfilter([0.049922035, -0.095993537, 0.050612699, -0.004408786],
                              [1, -2.494956002, 2.017265875, -0.522189400], white)
    if colour == "brown":  # then a 20 Hz high-pass: drift below it is inaudible and would dominate the power
        return signal.sosfilt(signal.butter(2, 20, "highpass", fs=SAMPLE_RATE, output="sos"),
                              signal.lfilter([1.0], [1.0, -0.995], white))
    return white


def hum(rng: np.random.Generator, n: int) -> np.ndarray:
    """Mains hum, 50 or 60 Hz, with odd-heavy harmonics up to 1 kHz."""
    mains = 50.0 if rng.random() < 0.5 else 60.0
    t = np.arange(n) / SAMPLE_RATE
    harmonics = np.arange(1, int(1000 // mains) + 1)
    amplitude = np.where(harmonics % 2, 1.0, 0.3) / harmonics
    phases = rng.uniform(0, 2 * np.pi, len(harmonics))
    return np.sin(2 * np.pi * mains * harmonics[:, None] * t + phases[:, None]).T @ amplitude


def music(rng: np.random.Generator, n: int) -> np.ndarray:
    """Chords of FM-synthesised notes with a beat: bass, pads and a bright lead, changing every 0.4-1.2 s."""
    t = np.arange(n) / SAMPLE_RATE
    out, start = np.zeros(n), 0
    while start < n:
        length = int(rng.uniform(0.4, 1.2) * SAMPLE_RATE)
        root = rng.integers(36, 60)  # MIDI
        for step, gain in ((0, 1.0), (4 + rng.integers(0, 2), 0.6), (7, 0.6), (12 + rng.integers(0, 12), 0.4)):
            hz = 440.0 * 2 ** ((root + step - 69) / 12)
            span = t[start:start + length] - t[start]
            ratio, index = rng.choice([1.0, 2.0, 3.5]), rng.uniform(0.5, 3.0)
            carrier = np.sin(2 * np.pi * hz * span + index * np.exp(-3 * span) * np.sin(2 * np.pi * hz * ratio * span))
            out[start:start + length] += gain * carrier * np.exp(-span * rng.uniform(0.5, 4.0))
        start += length
    return out


def transients(rng: np.random.Generator, n: int) -> np.ndarray:
    """Household events by modal synthesis: dish clinks, knocks and footsteps, 1-3 a second, over silence."""
    out = np.zeros(n)
    for onset in np.cumsum(rng.exponential(SAMPLE_RATE / 2, size=max(1, int(n / SAMPLE_RATE * 4)))).astype(int):
        if onset >= n:
            break
        kind = rng.integers(3)
        low, high, decay_s = ((2000, 7000, 0.3), (150, 800, 0.05), (60, 250, 0.03))[kind]
        length = min(int(decay_s * 6 * SAMPLE_RATE), n - onset)
        span = np.arange(length) / SAMPLE_RATE
        modes = rng.uniform(low, high, 5)
        event = np.sin(2 * np.pi * modes[:, None] * span).T @ rng.uniform(0.2, 1.0, 5)
        out[onset:onset + length] += event * np.exp(-span / decay_s) * rng.uniform(0.1, 1.0)
    return out


def babble(rng: np.random.Generator, n: int, speech: list[np.ndarray]) -> np.ndarray:
    """4-7 overlapping talkers drawn from `speech` (clips of other talkers, of any length), each shifted."""
    if not speech or not any(len(clip) for clip in speech):
        raise ConditionError("babble: no speech to make babble from; allowed: audio with negative speech clips")
    out = np.zeros(n)
    for _ in range(int(rng.integers(*BABBLE_TALKERS, endpoint=True))):
        said, length = [], 0
        while length < n:
            said.append(speech[int(rng.integers(len(speech)))])
            length += len(said[-1])
        out += np.roll(np.concatenate(said)[:n], int(rng.integers(n))) * rng.uniform(0.5, 1.0)
    return out


def noise_buffer(noise: str, rng: np.random.Generator, n: int, *, speech: list[np.ndarray],
                 recordings: dict[str, list[np.ndarray]]) -> np.ndarray:
    """n samples of one noise type at unit RMS."""
    if noise in ("white", "pink", "brown"):
        audio = coloured(rng, n, noise)
    elif noise in recordings:  # a folder of the user's noise recordings, or the data set's background clips
        audio = np.resize(np.concatenate(recordings[noise]), n)
    else:
        audio = {"hum": lambda: hum(rng, n), "music": lambda: music(rng, n),
                 "transients": lambda: transients(rng, n), "babble": lambda: babble(rng, n, speech)}[noise]()
    return (audio / max(rms(audio), TINY)).astype(np.float32)


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if len(audio) else 0.0


def active_rms(audio: np.ndarray) -> float:
    """The RMS of the louder half of a recording's 100 ms frames: its level while someone talks (pauses left out,
    after the idea of ITU-T P.56's active speech level)."""
    frame = SAMPLE_RATE // 10
    frames = audio[:len(audio) // frame * frame].reshape(-1, frame) if len(audio) >= frame else audio[None]
    power = np.sort(np.mean(np.square(frames, dtype=np.float64), axis=1))
    return float(np.sqrt(np.mean(power[len(power) // 2:])))


# ---------------------------------------------------------------- rooms and microphones


@functools.cache
def room_response(rt60_s: float, distance: str, room: str = "living") -> np.ndarray:
    """The image-source impulse response [L] of a room of ROOMS at this RT60, mouth to device at `distance`."""
    import pyroomacoustics as pra  # ~0.5 s to import: only where a room is used

    r = ROOMS[room]
    absorption, max_order = pra.inverse_sabine(r.sabine_input_s[rt60_s], list(r.dims_m))
    shoebox = pra.ShoeBox(list(r.dims_m), fs=SAMPLE_RATE, materials=pra.Material(absorption), max_order=max_order)
    across = np.sqrt(DISTANCES_M[distance] ** 2 - (r.source_m[2] - r.device_height_m) ** 2)  # on the floor plan
    shoebox.add_source(list(r.source_m))
    shoebox.add_microphone([r.source_m[0] + across * r.direction[0], r.source_m[1] + across * r.direction[1],
                            r.device_height_m])
    shoebox.compute_rir()
    return np.asarray(shoebox.rir[0][0], np.float32)


@functools.cache
def microphone_filter(microphone: str) -> np.ndarray:
    """Second-order sections of a telephone band (300-3400 Hz) or a cheap MEMS microphone's response (a 200 Hz
    roll-off, a +5 dB presence peak at 4 kHz, a 7 kHz low-pass)."""
    if microphone == "telephone":
        return signal.butter(4, [300, 3400], "bandpass", fs=SAMPLE_RATE, output="sos")
    if microphone == "mems":
        b, a = peaking_eq(4000.0, gain_db=5.0, q=1.0)
        return np.vstack([signal.butter(2, 200, "highpass", fs=SAMPLE_RATE, output="sos"),
                          signal.tf2sos(b, a), signal.butter(4, 7000, "lowpass", fs=SAMPLE_RATE, output="sos")])
    raise ConditionError(f"microphone {microphone!r}; allowed: {', '.join(MICROPHONES)}")


def peaking_eq(hz: float, *, gain_db: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """The RBJ audio-EQ-cookbook peaking filter."""
    gain, omega = 10 ** (gain_db / 40), 2 * np.pi * hz / SAMPLE_RATE
    alpha = np.sin(omega) / (2 * q)
    b = np.array([1 + alpha * gain, -2 * np.cos(omega), 1 - alpha * gain])
    a = np.array([1 + alpha / gain, -2 * np.cos(omega), 1 - alpha / gain])
    return b / a[0], a / a[0]


MEMS_SELF_NOISE_DBFS = -65.0  # rms: a cheap MEMS capsule's self-noise at typical gain


# ---------------------------------------------------------------- applying a condition


class Conditioner:
    """Applies conditions to clips and to long recordings, deterministically per (condition, key).

    speech: clips of other talkers for babble (the negatives of the audio under test); recordings: extra noise types
    by name (a user's folders, the data set's background clips), each a list of mono clips at SAMPLE_RATE.
    """

    def __init__(self, *, speech: list[np.ndarray], recordings: dict[str, list[np.ndarray]] | None = None,
                 seed: int = GRID_SEED):
        self.speech, self.recordings, self.seed = speech, dict(recordings or {}), seed
        self.buffers: dict[str, np.ndarray] = {}

    @functools.cached_property
    def noise_types(self) -> tuple[str, ...]:
        return NOISE_TYPES + tuple(n for n in self.recordings if n not in NOISE_TYPES)

    def noise(self, name: str) -> np.ndarray:
        """NOISE_BUFFER_S seconds of one noise type at unit RMS, rendered once."""
        if name not in self.buffers:
            if name not in self.noise_types:
                raise ConditionError(f"noise {name!r}; allowed: {', '.join(self.noise_types)}")
            rng = np.random.default_rng([self.seed, *name.encode()])
            self.buffers[name] = noise_buffer(name, rng, NOISE_BUFFER_S * SAMPLE_RATE, speech=self.speech,
                                              recordings=self.recordings)
        return self.buffers[name]

    def clip(self, audio: np.ndarray, condition: Condition, key: int) -> np.ndarray:
        """One clip [N] under the condition; key picks the noise excerpt (a clip's index)."""
        if condition.group == "clean":
            return audio
        if condition.group == "noise":
            return self.add_noise(audio, condition, np.random.default_rng([self.seed, key, *condition.name.encode()]))
        if condition.group == "level":
            assert condition.peak_dbfs is not None  # every level condition has one
            return (audio * 10 ** (condition.peak_dbfs / 20) / max(float(np.abs(audio).max()), TINY)).astype(np.float32)
        return self.channel(audio, condition, key)

    def add_noise(self, audio: np.ndarray, condition: Condition, rng: np.random.Generator) -> np.ndarray:
        """audio + an excerpt of the noise at condition.snr_db: the clip's power over the noise's long-term power
        (the buffer's, 1), so a quiet stretch of a knock or a pause in the music stays quiet, as it would be."""
        assert condition.noise is not None and condition.snr_db is not None  # every noise condition has both
        buffer = self.noise(condition.noise)
        start = int(rng.integers(0, max(len(buffer) - len(audio), 0) + 1))
        noise = np.resize(buffer[start:], len(audio))
        return (audio + rms(audio) * 10 ** (-condition.snr_db / 20) * noise).astype(np.float32)

    def channel(self, audio: np.ndarray, condition: Condition, key: int) -> np.ndarray:
        """A room (RMS kept, so that a room is not also a level) or a microphone."""
        if condition.group == "room":
            response = room_response(condition.rt60_s, condition.distance, condition.room)
            wet = signal.oaconvolve(audio, response)[:len(audio)]
            return (wet * rms(audio) / max(rms(wet), TINY)).astype(np.float32)
        if condition.group == "mic":
            out = signal.sosfilt(microphone_filter(condition.microphone), audio)
            if condition.microphone == "mems":
                hiss = np.random.default_rng([self.seed, key]).standard_normal(len(out))
                out = out + 10 ** (MEMS_SELF_NOISE_DBFS / 20) * hiss
            return out.astype(np.float32)
        raise ConditionError(f"condition {condition.name!r} of group {condition.group!r}; allowed groups: clean, "
                             "noise, room, level, mic")

    def recording(self, audio: np.ndarray, condition: Condition, key: int) -> np.ndarray:
        """A long recording [T] under the condition. Noise plays on without a break (a fan does not stop when
        nobody talks), at condition.snr_db below the recording's active speech level; a level moves the whole
        recording's peak; rooms and microphones act on the whole."""
        if condition.group != "noise":
            return self.clip(audio, condition, key)
        assert condition.noise is not None and condition.snr_db is not None  # every noise condition has both
        rng = np.random.default_rng([self.seed, key, *condition.name.encode()])
        noise = noise_buffer(condition.noise, rng, len(audio), speech=self.speech, recordings=self.recordings)
        return (audio + active_rms(audio) * 10 ** (-condition.snr_db / 20) * noise).astype(np.float32)


def read_noise_folders(folders: dict[str, Path], read) -> dict[str, list[np.ndarray]]:
    """{name: clips} from the user's noise folders (each a folder of audio files; `read` decodes one to mono), at
    most MAX_NOISE_FOLDER_S of each: longer long audio loops it."""
    out: dict[str, list[np.ndarray]] = {}
    for name, folder in folders.items():
        files = sorted(p for p in Path(folder).glob("*") if p.suffix.lower() in (".wav", ".flac", ".ogg"))
        if not files:
            raise ConditionError(f"{folder}: no .wav, .flac or .ogg files; allowed: a folder of noise recordings")
        out[name], budget = [], MAX_NOISE_FOLDER_S * SAMPLE_RATE
        for path in files:
            if budget <= 0:
                break
            out[name].append(read(path)[:budget])
            budget -= len(out[name][-1])
    return out


def noise_folder(option: str) -> tuple[str, Path]:
    """`--noise NAME=FOLDER` as (name, folder): a new noise type's name and an existing folder."""
    name, sep, folder = option.partition("=")
    if not sep or not re.fullmatch(r"[a-z][a-z0-9]{0,31}", name) or name in (*NOISE_TYPES, "background") \
            or not Path(folder).is_dir():
        raise ConditionError(f"--noise {option!r}: not NAME=FOLDER with a new name and an existing folder; allowed: "
                             f"NAME=FOLDER, NAME lower-case letters and digits other than {', '.join(NOISE_TYPES)}, "
                             "background")
    return name, Path(folder)


def parse_grid(name: str, noise_types: tuple[str, ...]) -> list[Condition]:
    """A grid by name, or a comma-separated list of condition names of the default grid."""
    if name in GRIDS:
        return GRIDS[name](noise_types)
    every = {c.name: c for c in default_grid(noise_types)}
    wanted = [n.strip() for n in name.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in every]
    if unknown or not wanted:
        raise ConditionError(f"--conditions {name!r}: unknown {unknown or 'empty'}; allowed: {', '.join(GRIDS)}, or "
                             f"names from the default grid such as {', '.join(list(every)[:4])}, ...")
    return [every[n] for n in wanted]
