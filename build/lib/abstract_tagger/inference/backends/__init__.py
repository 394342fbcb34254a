"""The backends that turn texts into probabilities: `base` (what they share), `onnx_backend` (no
torch in the process) and `torch_backend`. Import base and inference.options only."""
