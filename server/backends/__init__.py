"""Accelerated backends: ONNX export, ONNX Runtime (CPU), OpenVINO (CPU), TensorRT (CUDA).

The engine keeps its own denoising loop (``server.engine.denoise``); a backend
replaces the UNet call (OpenVINO also the text encoder and the VAE decoder), and
hot-swaps blends by writing weights computed from the pristine base (never from
the previous blend). ``select`` builds the one the engine is asked for.
"""
