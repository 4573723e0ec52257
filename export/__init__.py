"""Checkpoint loading, the PyTorch reference model and ONNX export."""
