import numpy as np
import pytest
import soundfile as sf

from moss_edge.runtime.audio import (EncoderBatch, chunk_mels, load_audio, log_mel, num_audio_tokens,
                                     prepare_waveform, resample)
from moss_edge.runtime.errors import MossEdgeError


def _tone(freq, rate, seconds=1.0):
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _amplitude_at(x, freq, rate=16000):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return spec[int(round(freq * len(x) / rate))] / (np.hanning(len(x)).sum() / 2)


def test_resampler_keeps_passband_and_rejects_aliases():
    y = resample(_tone(1000, 44100), 44100, 16000)
    assert len(y) == 16000
    assert abs(_amplitude_at(y, 1000) - 0.5) < 0.01
    # 11 kHz at 48 kHz is above 16 kHz's Nyquist: naive decimation would fold it to 5 kHz
    folded = resample(_tone(11000, 48000), 48000, 16000)
    assert np.abs(folded[100:-100]).max() < 0.01  # away from the onset transients
    up = resample(_tone(440, 8000), 8000, 16000)
    assert abs(_amplitude_at(up, 440) - 0.5) < 0.01


@pytest.mark.parametrize("fmt,ext", [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg"), ("MP3", "mp3")])
def test_formats_stereo_and_rates(tmp_path, fmt, ext):
    stereo = np.stack([_tone(500, 22050), _tone(500, 22050)], axis=1)
    path = tmp_path / f"clip.{ext}"
    sf.write(path, stereo, 22050, format=fmt)
    wav = load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1 and abs(len(wav) - 16000) <= 1
    assert abs(_amplitude_at(wav[:15000], 500) - 0.5) < 0.05


def test_silence_short_and_long_clips():
    silent = log_mel(np.zeros(16000, np.float32))
    assert silent.shape == (128, 100) and np.isfinite(silent).all()
    short = log_mel(np.random.default_rng(0).normal(0, 0.1, 1600).astype(np.float32))  # 0.1 s
    assert short.shape == (128, 10) and num_audio_tokens(10) == 2
    long = log_mel(np.random.default_rng(0).normal(0, 0.1, 16000 * 600).astype(np.float32))  # 10 min
    batch = chunk_mels([long], 400)
    assert batch.mel.shape == (150, 128, 400) and sum(batch.clip_tokens) == 7500


def test_chunking_pads_to_the_longest_chunk_of_the_prompt():
    mels = [np.ones((128, 1000), np.float32), np.ones((128, 120), np.float32)]
    batch: EncoderBatch = chunk_mels(mels, 400)
    assert batch.frames.tolist() == [400, 400, 200, 120]
    assert batch.tokens.tolist() == [50, 50, 25, 15]
    assert batch.clip_tokens == [125, 15]
    assert batch.mel.shape == (4, 128, 400) and batch.mel[2, :, 200:].sum() == 0
    alone = chunk_mels([np.ones((128, 120), np.float32)], 400)
    assert alone.mel.shape == (1, 128, 120)  # short clips alone pad only to their own length


def test_bad_audio_inputs(tmp_path):
    with pytest.raises(MossEdgeError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(MossEdgeError, match="empty"):
        load_audio(tmp_path / "empty.wav")
    (tmp_path / "notes.wav").write_text("this is not audio")
    with pytest.raises(MossEdgeError, match="cannot decode"):
        load_audio(tmp_path / "notes.wav")
    with pytest.raises(MossEdgeError, match="shape"):
        prepare_waveform(np.zeros((2, 3, 4), np.float32), 16000)
    with pytest.raises(MossEdgeError, match="floats"):
        prepare_waveform(np.zeros(100, np.int16), 16000)
    with pytest.raises(MossEdgeError, match="too short"):
        log_mel(np.zeros(100, np.float32))
