"""Lightweight APTP runtime: routes prompts to per-expert ONNX/TensorRT engines. Never imports torch."""
