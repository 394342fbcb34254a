"""The torch backend: the checkpoint's transformers model, bf16/fp16 autocast where the hardware runs it
natively, fp32 for the exact pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from abstract_tagger.checkpoint.format import CheckpointError
from abstract_tagger.common.runtime import fast_precision
from abstract_tagger.inference.backends.base import Backend, recheck_margin_for
from abstract_tagger.inference.options import TORCH_PRECISIONS as PRECISIONS

_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None means plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} for backend=torch, got {precision!r}")
    return _AUTOCAST_DTYPES[fast_precision(device.type) if precision == "auto" else precision]


class TorchBackend(Backend):
    engine = "torch"

    def __init__(
        self, model: torch.nn.Module, tokenizer, *, precision: str = "auto", batch_size: int | None = None,
        recheck_margin: float | Mapping[str, float] | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = autocast_dtype(precision, self.device)
        self.reduced = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype)
        self.batch_size = batch_size
        self.recheck_margin = recheck_margin_for(self.reduced, recheck_margin)
        config = model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.pad_id = tokenizer.pad_token_id
        # A tokenizer saved without a length limit reports a huge sentinel; the position table is the real cap.
        self.max_length = min(tokenizer.model_max_length, config.max_position_embeddings)

    @classmethod
    def load(cls, path: Path, *, device: str | torch.device | None, num_threads: int | None, **options) -> TorchBackend:
        if num_threads:
            torch.set_num_threads(num_threads)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except Exception as e:  # the tokenizers library's errors (a corrupt tokenizer.json) derive from Exception only
            raise CheckpointError(f"{path}: cannot load the tokenizer: {type(e).__name__}: "
                                  f"{(str(e).strip().splitlines() or [''])[0]}") from e
        try:
            # Weights may be stored in fp16 (the published checkpoint); compute runs in fp32 plus autocast.
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, use_safetensors=True, trust_remote_code=False, dtype=torch.float32, output_loading_info=True
            )
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            # A truncated file or weights that do not fit config.json: name the checkpoint, not the internals.
            raise CheckpointError(f"{path}: cannot load: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
        # transformers fills weights missing from the file (say, the classifier) with random ones.
        missing = sorted(info["missing_keys"]) + sorted(k for k, *_ in info["mismatched_keys"])
        if missing:
            raise CheckpointError(f"{path}: model.safetensors lacks {', '.join(missing)}; they would be random")
        diverged = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if diverged:
            raise CheckpointError(f"{path}: non-finite (NaN/inf) weights in {', '.join(diverged[:3])}: "
                                  "the training run that exported it diverged")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model.to(device), tokenizer, **options)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                              return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    def autocast(self, enabled: bool = True) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                              enabled=enabled and self.dtype is not None)

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, exact: bool) -> np.ndarray:
        with torch.inference_mode(), self.autocast(not exact):
            out = self.model(input_ids=torch.from_numpy(input_ids).to(self.device, non_blocking=True),
                             attention_mask=torch.from_numpy(attention_mask).to(self.device, non_blocking=True))
        return out.logits.float().cpu().numpy()

    def fingerprint(self, h) -> None:
        for name, tensor in self.model.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    def describe(self) -> str:
        return f"torch on {self.device}, {self.reduced or 'fp32'}"
