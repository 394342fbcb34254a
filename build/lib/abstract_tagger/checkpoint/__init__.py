"""Stage 4, the checkpoint: its format (one owner of every file in it, written whole or not at all and
checked on load), the model card, the ONNX graphs. Imports common, data, labeling and training."""
