"""kd_tune.audio.acoustics: training's noise mixing, tones and transients, from their definitions."""

import pytest
import torch
from test_features import snr_of, waves

from kd_tune.audio.acoustics import mix_at_snr, tones, transients, wavetables
from kd_tune.audio.features import N_SAMPLES


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
def test_noise_is_mixed_at_the_requested_snr(snr_db):
    # Rule: background noise is scaled so that the signal-to-noise ratio equals the drawn SNR.
    wave = waves(4)
    noise = torch.randn(4, N_SAMPLES, generator=torch.Generator().manual_seed(1))
    mixed = mix_at_snr(wave, noise, torch.full((4,), snr_db))
    torch.testing.assert_close(snr_of(wave, mixed), torch.full((4,), snr_db), rtol=0, atol=1e-3)


def test_tones_are_notes_and_transients_are_short_events():
    # Rule: generated tones put their energy at the notes' fundamentals and harmonics; generated transients put
    # theirs right after the events' onsets.
    tables = wavetables()
    melody = tones(torch.zeros(2, 10, dtype=torch.long), torch.full((2,), 0.5), torch.full((2,), 1.0),
                   tables[[0, 2]], N_SAMPLES)  # A4 throughout, flute and brass
    power = torch.fft.rfft(melody).abs().square()  # 1 Hz bins
    harmonics = sum(power[:, h * 440 - 3:h * 440 + 4].sum(-1) for h in range(1, 9))
    assert (harmonics / power.sum(-1) > 0.99).all()
    excitation = torch.randn(1, N_SAMPLES, generator=torch.Generator().manual_seed(0))
    events = transients(excitation, torch.tensor([[0.2, 0.6]]), torch.tensor([[0.005, 0.01]]), torch.ones(1, 2))
    energy = events.square()[0]
    after_onsets = energy[3200:3200 + 1600].sum() + energy[9600:9600 + 1600].sum()  # 100 ms after each onset
    assert after_onsets / energy.sum() > 0.999 and energy[:3200].sum() == 0
