"""The backends that turn texts into probabilities: `base` (what they share), `graph` (the checkpoint's
ONNX graphs, no torch in the process) run by `onnx_backend` (ONNX Runtime) or `openvino_backend`
(OpenVINO), and `torch_backend`. Import base and inference.options only (an engine imports graph)."""
