"""A wake-word spotter that was never trained, scored like an exported model: PocketSphinx keyphrase spotting.

`PocketSphinxSpotter` has the parts of `kd_tune.deploy.detect.Detector` that an evaluation uses (read, probabilities,
threshold, sample_rate, hop_samples, window_samples, refractory_seconds, detect), so the same code measures a
distilled student and this peer on the same audio. It needs the optional `baseline` extra (pocketsphinx, BSD, with
its bundled en-us acoustic model and CMUdict), imported only when a spotter is built.

Each reported keyphrase margin maps to a score in [0, 1] by a fixed, strictly increasing map (`score_of_margin`),
0.5 at pocketsphinx's default kws_threshold; README, "Quality outside the studio", says how and why.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kd_tune.deploy.detect import check_samples, load_audio
from kd_tune.deploy.windows import detection_times, window_count
from kd_tune.errors import InputError, MissingExtraError, shown

BASELINE_EXTRA_HINT = ("the PocketSphinx baseline needs the optional `baseline` extra (BSD): "
                       "pip install 'kd-tune[baseline]'")
SAMPLE_RATE = 16_000  # the bundled en-us acoustic model's rate
WINDOW_SAMPLES = 16_000  # as an exported model's window: a clip's score is then the max over the same windows
HOP_SAMPLES = 1_600  # 100 ms: the score resolution, as an exported model's hop
REFRACTORY_SECONDS = 1.0
# converted to 16-bit PCM and fed to the decoder at a time: memory stays flat for an hour. Fixed, since blocks under
# ~800 samples move a few detections (blocks of 800 to 2**20 give the same ones).
FEED_SAMPLES = 2**16
MAX_KEYPHRASE_WORDS = 8  # a wake word is a few words; keyphrase search is not meant for sentences
SEARCH_NAME = "wake"
# pocketsphinx's own constants (src/kws_search.c, src/util/logmath.c): a margin is reported as the posterior
# logmath_exp(margin - KWS_MAX); thresholds and HMM scores are log base 1.0001 shifted right by SENSCR_SHIFT.
KWS_MAX = 1500
SENSCR_SHIFT = 10
LOG_BASE = 1.0001
# Let every candidate through: 1e-300 (a margin of -6747) is near the least a double holds, and the beam is widened
# as far, so that no keyphrase hypothesis is pruned before its margin is seen: at pocketsphinx's default beam (1e-48)
# over a third of the small set's clips report nothing and all tie at 0. It costs ~15% more time (measured).
PERMISSIVE_KWS_THRESHOLD = 1e-300
WIDE_BEAM = 1e-300
DEFAULT_KWS_THRESHOLD = 1e-30  # pocketsphinx's own default: the spotter's operating point unless told otherwise
SCORE_CENTRE_LOG10 = -30.0  # the default kws_threshold scores 0.5
# 20 decades of kws_threshold per unit of logit: the margins seen, 1e-300 to 1e+67, stay strictly increasing in
# float32 (neighbouring margins differ by >= 1e-5 relative), and 1e-60 to 1e+10 spans 0.18 to 0.88.
SCORE_SPREAD_DECADES = 20.0
DECADES_PER_MARGIN = (1 << SENSCR_SHIFT) * math.log10(LOG_BASE)


class BaselineError(InputError):
    """A keyphrase, threshold or audio the baseline spotter cannot use."""


def score_of_margin(margin: int) -> float:
    """The score (0, 1) of a candidate pocketsphinx reports with this margin, as float32 (the windows' dtype)."""
    logit = (margin * DECADES_PER_MARGIN - SCORE_CENTRE_LOG10) / SCORE_SPREAD_DECADES
    return float(np.float32(1.0 / (1.0 + math.exp(-logit)) if logit > -700 else 0.0))


def margin_of_kws_threshold(kws_threshold: float) -> int:
    """The least margin pocketsphinx reports at this kws_threshold: `(int)(log(p) / log(base)) >> 10`, as in C."""
    return int(math.log(kws_threshold) / math.log(LOG_BASE)) >> SENSCR_SHIFT


def kws_threshold_of_margin(margin: int) -> float:
    # the middle of the margin's bin, so that rounding in log() cannot move it to a neighbour
    return LOG_BASE ** ((margin << SENSCR_SHIFT) + (1 << (SENSCR_SHIFT - 1)))


def kws_threshold_for(score: float) -> float:
    """The kws_threshold at which pocketsphinx reports exactly the candidates that score >= `score` (0 < score < 1)."""
    if not 0.0 < score < 1.0:
        raise BaselineError(f"score: got {shown(score)}; allowed: a score strictly between 0 and 1")
    logit = math.log(score / (1.0 - score))
    margin = math.ceil((SCORE_CENTRE_LOG10 + SCORE_SPREAD_DECADES * logit) / DECADES_PER_MARGIN)
    # the closed form is exact up to float32 rounding of the scores: settle on the least margin that reaches `score`
    while score_of_margin(margin - 1) >= score:
        margin -= 1
    while score_of_margin(margin) < score:
        margin += 1
    return kws_threshold_of_margin(margin)


def margin_of_posterior(posterior: float) -> int:
    """A reported segment's margin from its posterior logmath_exp(margin - KWS_MAX): pow() and log() round, so the
    integer is rounded back, not truncated."""
    return round(math.log(posterior) / math.log(LOG_BASE)) + KWS_MAX


DEFAULT_THRESHOLD = score_of_margin(margin_of_kws_threshold(DEFAULT_KWS_THRESHOLD))


def first_window_holding(end_sample: int, *, window_samples: int, hop_samples: int, n_windows: int) -> int:
    return min(max(math.ceil((end_sample - window_samples) / hop_samples), 0), n_windows - 1)


def to_pcm16(block: np.ndarray) -> bytes:
    """Float audio (full scale 1) as native 16-bit PCM, clipped like a microphone's converter would clip it."""
    return np.clip(np.rint(block * 32768.0), -32768, 32767).astype(np.int16).tobytes()


def checked_number(value: Any, what: str, *, low: float, high: float, allowed: str) -> float:
    """value as a float when it is a finite number (not a bool) in [low, high]."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and low <= value <= high):
        raise BaselineError(f"{what}: got {shown(value)}; allowed: {allowed}")
    return float(value)


def import_pocketsphinx() -> Any:
    try:
        import pocketsphinx
    except ImportError as error:
        raise MissingExtraError(BASELINE_EXTRA_HINT) from error
    return pocketsphinx


def keyphrase_words(keyphrase: Any) -> list[str]:
    """The keyphrase's words, lower case (CMUdict's case): refused unless 1 to MAX_KEYPHRASE_WORDS of them."""
    words = keyphrase.lower().split() if isinstance(keyphrase, str) else []
    if not 1 <= len(words) <= MAX_KEYPHRASE_WORDS:
        raise BaselineError(f"keyphrase: got {shown(keyphrase)}; allowed: 1 to {MAX_KEYPHRASE_WORDS} words of "
                            "PocketSphinx's bundled en-us dictionary (CMUdict), separated by spaces")
    return words


class PocketSphinxSpotter:
    """PocketSphinx keyphrase spotting over audio of any length, scored per window like `Detector`.

    One decoder, reused: each `probabilities` call starts a fresh front end and a fresh keyphrase search
    (pocketsphinx carries the noise estimate, the cepstral mean and the keyphrase HMMs' state from one utterance to
    the next otherwise), so audio scores the same whatever was scored before it, as with a new decoder. Not
    thread-safe: one spotter per thread.
    """

    name = "pocketsphinx"

    def __init__(self, keyphrase: str, *, threshold: float | None = None,
                 kws_threshold: float = PERMISSIVE_KWS_THRESHOLD):
        """keyphrase: the wake word's text, e.g. "hey nova". threshold: the operating point in this spotter's
        scores (default: the score of pocketsphinx's default kws_threshold). kws_threshold: what pocketsphinx itself
        lets through; the default lets every candidate through, so that scores and `threshold` decide."""
        words = keyphrase_words(keyphrase)
        self.threshold = DEFAULT_THRESHOLD if threshold is None else checked_number(
            threshold, "threshold", low=0.0, high=1.0, allowed="a score in [0, 1]")
        # strictly above 0: pocketsphinx compares margins with its log
        kws_threshold = checked_number(kws_threshold, "kws_threshold", low=math.ulp(0.0), high=math.inf,
                                       allowed="a number > 0, e.g. 1e-30")
        pocketsphinx = import_pocketsphinx()
        # kws_delay 0: pocketsphinx holds back detections that end in the last kws_delay frames of an utterance
        self.decoder = pocketsphinx.Decoder(lm=None, kws_threshold=kws_threshold, beam=WIDE_BEAM, kws_delay=0,
                                            samprate=SAMPLE_RATE, loglevel="FATAL")
        self.check_dictionary(words, keyphrase)
        self.keyphrase = " ".join(words)
        self.samples_per_frame = SAMPLE_RATE // int(self.decoder.config["frate"])
        self.sample_rate, self.window_samples, self.hop_samples = SAMPLE_RATE, WINDOW_SAMPLES, HOP_SAMPLES
        self.refractory_seconds = REFRACTORY_SECONDS

    def check_dictionary(self, words: list[str], keyphrase: str) -> None:
        # pocketsphinx itself only logs a missing word and then never detects the phrase
        missing = [w for w in words if not w.isprintable() or self.decoder.lookup_word(w) is None]
        if missing:
            raise BaselineError(f"keyphrase {shown(keyphrase)}: {', '.join(shown(w) for w in missing)} not in "
                                "PocketSphinx's bundled en-us dictionary; allowed: words of that dictionary "
                                "(CMUdict, ~134k English words and names), without punctuation")

    def read(self, source: Any) -> np.ndarray:
        """A file's audio (a path or a file object) as mono float32 [T] at 16 kHz, read as `Detector` reads it."""
        return load_audio(source, sample_rate=self.sample_rate)

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """Scores [W] float32, one per window kd_tune.deploy.windows.frames would cut from mono 16 kHz audio [T]: each
        detection's score at the first window holding its end (the highest where several share one), 0 elsewhere."""
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise BaselineError(f"audio: shape {audio.shape}; allowed: non-empty mono samples [T]")
        check_samples(audio, where="audio")
        scores = np.zeros(window_count(len(audio), window_samples=self.window_samples, hop_samples=self.hop_samples),
                          np.float32)
        for end_sample, margin in self.detections(audio):
            i = first_window_holding(end_sample, window_samples=self.window_samples, hop_samples=self.hop_samples,
                                     n_windows=len(scores))
            scores[i] = max(scores[i], score_of_margin(margin))
        return scores

    def detections(self, audio: np.ndarray) -> list[tuple[int, int]]:
        """(end sample, margin) of each detection pocketsphinx reports in one streaming pass over audio [T]."""
        # the noise-removal statistics and the live cepstral mean carry over between utterances otherwise
        self.decoder.reinit_feat()
        self.decoder.add_keyphrase(SEARCH_NAME, self.keyphrase)  # replaces the previous search of that name
        self.decoder.activate_search(SEARCH_NAME)
        self.decoder.start_utt()
        for start in range(0, len(audio), FEED_SAMPLES):
            self.decoder.process_raw(to_pcm16(audio[start:start + FEED_SAMPLES]), False, False)
        self.decoder.end_utt()
        # end_frame is inclusive: the detection ends where its last 10 ms frame does
        return [((s.end_frame + 1) * self.samples_per_frame, margin_of_posterior(s.prob))
                for s in self.decoder.seg() or ()]

    def detect(self, audio: np.ndarray) -> list[float]:
        """Times (s) of the detections in mono audio [T] at `threshold`: window centres, as `Detector.detect`."""
        return detection_times(self.probabilities(audio), threshold=self.threshold, sample_rate=self.sample_rate,
                               window_samples=self.window_samples, hop_samples=self.hop_samples,
                               refractory_seconds=self.refractory_seconds)
