"""Stage 3, training: the backbone, the training data (weak soft targets and hand labels), the loop,
losses, thresholds and the blend chosen on dev, the honest evaluation, tracking. Imports common,
metrics, data and labeling."""
