"""Audio front end: file -> mono 16 kHz waveform -> Whisper log-mel -> encoder chunks.

numpy and libsoxr (resampling) only, so it runs on the device. The mel matches Whisper's feature extractor (and so
upstream MOSS-Audio): periodic Hann, centred reflect-padded frames, Slaney mel filters.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from moss_edge.runtime.errors import MossEdgeError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 128
TOKENS_PER_SECOND = SAMPLE_RATE / HOP_LENGTH / 2**3  # 12.5: three stride-2 convolutions over 100 frames/s


def load_audio(path: str | Path) -> np.ndarray:
    """Read wav/flac/ogg/mp3 (whatever libsndfile reads), mix to mono, resample to 16 kHz."""
    return prepare_waveform(*read_audio(path))


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """A file's [n, channels] float32 samples and its sample rate, as recorded."""
    path = Path(path)
    if path.is_dir():
        raise MossEdgeError(f"{path} is a folder; give an audio file (wav, flac, ogg or mp3)")
    if not path.is_file():
        raise MossEdgeError(f"audio file not found: {path}")
    if path.stat().st_size == 0:
        raise MossEdgeError(f"audio file is empty: {path}")
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise MossEdgeError(f"cannot decode {path} as audio ({decode_failure(err)}); give a wav, flac, ogg or mp3 file") from None
    return samples, rate


def decode_failure(err: Exception) -> str:
    """libsndfile's reason alone ("Format not recognised"), without the repr of what it was reading."""
    return (getattr(err, "error_string", None) or str(err)).rstrip(".")


MAX_CHANNELS = 64


def prepare_waveform(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Turn [n] or [n, channels] samples at any rate into mono float32 at 16 kHz."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer, float, np.floating)):
        raise MossEdgeError(f"sample rate must be a number of samples per second, got {type(sample_rate).__name__}")
    if not (np.isfinite(sample_rate) and sample_rate > 0 and float(sample_rate).is_integer()):
        raise MossEdgeError(f"sample rate must be a positive whole number, got {sample_rate}")
    samples = np.asarray(samples)
    if samples.ndim == 2:
        if samples.shape[1] > MAX_CHANNELS and samples.shape[0] <= MAX_CHANNELS:
            raise MossEdgeError(f"audio of shape {samples.shape} looks channels-first; the layout is [samples, "
                                "channels]: pass samples.T")
        samples = samples.mean(axis=1)
    if samples.ndim != 1:
        raise MossEdgeError(
            f"audio must be [samples] or [samples, channels], got shape {samples.shape}"
        )
    if not np.issubdtype(samples.dtype, np.floating):
        raise MossEdgeError(f"audio samples must be floats in [-1, 1], got {samples.dtype}")
    if samples.size == 0:
        raise MossEdgeError("audio has no samples")
    if not np.all(np.isfinite(samples)):
        raise MossEdgeError("audio contains NaN or infinite samples")
    peak = float(np.abs(samples).max())
    if peak > 2.0:  # a little over 1 is ordinary clipping; far over is integer PCM stored as floats
        raise MossEdgeError(f"audio samples reach {peak:.0f}; float samples are in [-1, 1] (16-bit PCM stored as "
                            "floats: divide by 32768)")
    return resample(samples.astype(np.float32), int(sample_rate), SAMPLE_RATE)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling with libsoxr ("HQ": passband to 91% of the lower Nyquist rate,
    no aliasing to speak of): 30 s of 44.1 kHz audio in ~7 ms, ARM64 wheels included."""
    if rate_in == rate_out:
        return x.astype(np.float32, copy=False)
    return soxr.resample(x.astype(np.float32, copy=False), rate_in, rate_out, quality="HQ").astype(np.float32, copy=False)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, np.float64)
    mel = 3.0 * hz / 200.0
    log_region = hz >= 1000.0
    mel[log_region] = 15.0 + np.log(hz[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    hz = 200.0 * mel / 3.0
    log_region = mel >= 15.0
    hz[log_region] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel[log_region] - 15.0))
    return hz


def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, rate: int = SAMPLE_RATE) -> np.ndarray:
    """[n_fft//2+1, n_mels] triangular Slaney filters, 0 Hz to Nyquist, Slaney area norm."""
    fft_hz = np.linspace(0.0, rate / 2, n_fft // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([rate / 2]))[0], n_mels + 2))
    widths = np.diff(edges_hz)
    slopes = edges_hz[None, :] - fft_hz[:, None]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    filters *= 2.0 / (edges_hz[2:] - edges_hz[:-2])
    return filters


_FILTERS = mel_filters()
_WINDOW = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann


def log10_mel(windows: np.ndarray) -> np.ndarray:
    """[n, N_FFT] sample windows -> [128, n] float64 log10 mel power (before the floor)."""
    spec = np.abs(np.fft.rfft(windows * _WINDOW, axis=-1)) ** 2
    return np.log10(np.maximum((spec @ _FILTERS).T, 1e-10))


def floor_and_scale(mel: np.ndarray, peak: float) -> np.ndarray:
    """Whisper's normalization: values more than 8 (80 dB) below `peak` raised to it, then scaled."""
    return ((np.maximum(mel, peak - 8.0) + 4.0) / 4.0).astype(np.float32)


def log_mel(waveform: np.ndarray) -> np.ndarray:
    """[n] float waveform at 16 kHz -> [128, n // 160] float32 Whisper log-mel (no 30 s padding)."""
    mel = log10_mel_frames(waveform)
    return floor_and_scale(mel, mel.max())


def log10_mel_frames(waveform: np.ndarray) -> np.ndarray:
    """[n] float waveform at 16 kHz -> [128, n // 160] float64 log10 mel power, before the floor."""
    x = np.asarray(waveform, np.float64)
    if x.ndim != 1:
        raise MossEdgeError(f"waveform must be 1-D, got shape {x.shape}")
    n_frames = len(x) // HOP_LENGTH
    if n_frames == 0:
        raise MossEdgeError(
            f"audio is too short: {len(x)} samples at 16 kHz, at least {HOP_LENGTH} needed"
        )
    pad = N_FFT // 2
    if len(x) <= pad:  # reflect padding needs more samples than the pad; zero-extend tiny clips
        x = np.concatenate([x, np.zeros(pad + 1 - len(x))])
    x = np.pad(x, pad, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP_LENGTH][:n_frames]
    mel = np.empty((N_MELS, n_frames), np.float64)
    for start in range(0, n_frames, 4096):  # bounded memory for long clips
        mel[:, start : start + 4096] = log10_mel(frames[start : start + 4096])
    return mel


def clip_token_count(n_samples: int, chunk_frames: int) -> int:
    """Audio tokens a clip of n_samples (16 kHz) becomes, chunk by chunk, without computing its mel."""
    frames = n_samples // HOP_LENGTH
    return sum(num_audio_tokens(min(chunk_frames, frames - s)) for s in range(0, frames, chunk_frames))


def num_audio_tokens(n_frames: int) -> int:
    """Tokens the encoder makes from n mel frames: three stride-2 convolutions."""
    for _ in range(3):
        n_frames = (n_frames - 1) // 2 + 1
    return n_frames


@dataclass
class EncoderBatch:
    """Mel chunks of every clip of a prompt, zero-padded to the longest chunk."""

    mel: np.ndarray  # [n_chunks, 128, chunk_frames] float32
    frames: np.ndarray  # [n_chunks] int64 valid frames per chunk
    tokens: np.ndarray  # [n_chunks] int64 valid tokens per chunk
    clip_tokens: list[int]  # audio tokens per clip, in prompt order


def chunk_mels(mels: list[np.ndarray], chunk_frames: int) -> EncoderBatch:
    """Split each clip's mel into chunks of chunk_frames (= 2 * n_window), tail last.

    Every chunk is padded to the longest chunk among all clips, as upstream does: the padding
    is visible to the convolutions, so padding differently would change the results.
    """
    chunks, frames, clip_tokens = [], [], []
    for mel in mels:
        clip_chunks = [mel[:, s : s + chunk_frames] for s in range(0, mel.shape[1], chunk_frames)]
        chunks += clip_chunks
        frames += [c.shape[1] for c in clip_chunks]
        clip_tokens.append(sum(num_audio_tokens(c.shape[1]) for c in clip_chunks))
    longest = max(frames)
    batch = np.zeros((len(chunks), mels[0].shape[0], longest), np.float32)
    for i, chunk in enumerate(chunks):
        batch[i, :, : chunk.shape[1]] = chunk
    frames_arr = np.array(frames, np.int64)
    tokens_arr = np.array([num_audio_tokens(f) for f in frames], np.int64)
    return EncoderBatch(batch, frames_arr, tokens_arr, clip_tokens)
