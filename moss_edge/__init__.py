"""moss-audio-edge: MOSS-Audio as deployable, quantized ONNX artifacts for edge devices."""

from importlib import resources

__version__ = "0.1.0"


def bundled_audio(name: str = "speech_en_10s.flac") -> str:
    """Path of a recording shipped with the package (see data/audio/README.md)."""
    return str(resources.files("moss_edge") / "data" / "audio" / name)
