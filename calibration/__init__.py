"""Calibration data sets (audio -> mel -> activations) for quantization."""
