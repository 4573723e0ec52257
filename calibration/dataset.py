"""Calibration sets: which audio, which crop, which task prompt. Deterministic by seed."""

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from moss_edge import bundled_audio
from moss_edge.runtime.audio import SAMPLE_RATE, load_audio
from moss_edge.runtime.errors import MossEdgeError

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3"}
HELD_OUT = "speech_en_10s.flac"  # bundled clip kept out of the default set, for verification
TASK_PROMPTS = (
    "Transcribe the speech in this recording.",
    "Describe the audio in detail.",
    "List the sound events with their start times in seconds.",
    "Who is speaking, and what emotion do they convey?",
    "What sounds can be heard apart from speech?",
    "Is there music? Describe its genre and tempo.",
)


@dataclass(frozen=True)
class CalibrationSample:
    path: str
    start_s: float
    seconds: float
    prompt: str

    def waveform(self) -> np.ndarray:
        wave = load_audio(self.path)
        start = int(self.start_s * SAMPLE_RATE)
        return wave[start : start + int(self.seconds * SAMPLE_RATE)]


def default_files() -> list[Path]:
    folder = Path(bundled_audio()).parent
    return sorted(p for p in folder.iterdir() if p.suffix in AUDIO_EXTENSIONS and p.name != HELD_OUT)


def find_audio(source: str | Path | None) -> list[Path]:
    """A folder (searched recursively), a glob, a text file listing paths, or one audio file;
    None means the bundled recordings."""
    if source is None:
        return default_files()
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
    elif path.is_file() and path.suffix.lower() in AUDIO_EXTENSIONS:
        files = [path]
    elif path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        files = [(path.parent / line) if not Path(line).is_absolute() else Path(line) for line in lines]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise MossEdgeError(f"calibration list {path} names missing files: {', '.join(missing[:5])}")
    else:
        files = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        raise MossEdgeError(f"no audio files (wav, flac, ogg, mp3) found in calibration source {source}")
    return files


def build_samples(files: list[Path], count: int = 12, seed: int = 0, min_s: float = 2.0,
                  max_s: float = 20.0) -> list[CalibrationSample]:
    """count samples: files in turn, random crops of min_s..max_s seconds, prompts in turn."""
    rng = np.random.default_rng(seed)
    durations = []
    for f in files:
        try:
            durations.append(sf.info(str(f)).duration)
        except (sf.LibsndfileError, RuntimeError) as err:
            raise MossEdgeError(f"calibration file {f} is not readable audio ({err})") from None
    usable = [(f, d) for f, d in zip(files, durations) if d >= 0.5]
    if not usable:
        raise MossEdgeError("every calibration file is shorter than 0.5 s")
    samples = []
    for i in range(count):
        path, duration = usable[i % len(usable)]
        seconds = float(min(duration, rng.uniform(min_s, max_s)))
        start = float(rng.uniform(0, duration - seconds)) if duration > seconds else 0.0
        samples.append(CalibrationSample(str(path), round(start, 2), round(seconds, 2), TASK_PROMPTS[i % len(TASK_PROMPTS)]))
    return samples
