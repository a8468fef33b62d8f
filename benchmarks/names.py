"""Names shared by the benchmarks and the CLI's argument definitions (light: `aptp bench --help` imports it
without torch)."""

# UNet backends `aptp bench` can time (benchmarks.unet_latency). "openvino-int8": each model's OpenVINO IR
# where it has one (aptp quantize), its ONNX graph on onnxruntime (CPU) where it has none.
UNET_BACKENDS = ("onnxruntime", "onnxruntime-cuda", "torch", "tensorrt", "openvino-int8")
