"""The device-side runtime: numpy, soundfile, tokenizers and onnxruntime/tensorrt only."""
