"""Next-token scoring, shared by the language-model tasks (charlm, hf-causal-lm): cross-entropy per token.

Importing this module must not import torch (the gateway uses tasks too).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch


class NextTokenScoring:
    """``loss``, ``score`` and ``finish`` of a task whose model maps token ids (``token_input``) to logits at
    every position, scored by validation loss (nats per token) and perplexity."""

    token_input: ClassVar[str]

    def loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        from torch.nn import functional as F

        logits = model(inputs[self.token_input])  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    def score(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        logits = outputs.reshape(-1, outputs.shape[-1]).astype(np.float64)  # (B*T, V)
        top = logits.max(axis=1)
        log_norm = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        target_logit = np.take_along_axis(logits, targets.reshape(-1, 1), axis=1)[:, 0]
        return {"nll": float((log_norm - target_logit).sum()), "count": float(targets.size)}

    def finish(self, totals: dict[str, float]) -> dict[str, float]:
        # an untrained model's loss can be large: perplexity saturates rather than overflow
        return {"val_loss": totals["nll"], "perplexity": math.exp(min(totals["nll"], 700.0))}
