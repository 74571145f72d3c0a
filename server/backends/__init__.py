"""Accelerated backends for the UNet forward: ONNX export, ONNX Runtime (CPU), TensorRT (CUDA).

The engine keeps its own denoising loop (``server.engine.denoise``); a backend
only replaces the UNet call, and hot-swaps blends by writing weights computed
from the pristine base (never from the previous blend).
"""
