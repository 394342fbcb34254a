"""Stage 5, inference: `Tagger` over a backend (the ONNX graphs on OpenVINO or ONNX Runtime, or torch), its
options and defaults, and the file job predict.py runs. Imports common, data, labeling and checkpoint;
never training."""
