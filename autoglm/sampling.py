"""Next-token sampling and stop strings, shared by every decode loop (numpy only).

The gateway's recomputing loop imports it as ``autoglm.sampling``; the Triton generation model gets
this file copied next to its ``model.py`` and imports it as ``sampling``, so it must import nothing
from the project.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Sampler:
    """Picks tokens from logits: greedy (temperature 0) or temperature + top-k + top-p (nucleus).

    One sampler per sequence: its generator is seeded once, so a seed reproduces the whole text
    whatever else runs at the same time.
    """

    def __init__(self, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None):
        if not 0 <= temperature <= 100:
            raise ValueError(f"temperature={temperature} must be within 0..100")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be within (0, 1]")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        """One token id from the last position's logits (V,)."""
        if self.temperature == 0:
            return int(logits.argmax())
        z = logits.astype(np.float64)
        if self.top_k is not None and self.top_k < z.size:
            kth = np.partition(z, -self.top_k)[-self.top_k]
            z = np.where(z < kth, -np.inf, z)
        # shift before scaling: a tiny temperature then sends the others to -inf, never inf - inf = NaN
        with np.errstate(over="ignore"):
            p = np.exp((z - z.max()) / self.temperature)
        p /= p.sum()
        if self.top_p is not None and self.top_p < 1:
            order = np.argsort(-p)
            # keep the smallest set of most likely tokens whose mass reaches top_p (at least one)
            keep = order[:int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(self.rng.choice(p.size, p=p))


class StopMatcher:
    """Streams text while holding back what could still become a stop string.

    ``push(piece)`` returns the text that is safe to emit now and whether a stop string was completed;
    the stop string itself is never emitted (as in OpenAI's and Triton's generate APIs).
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        self.pending += piece
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            at = min(i for i, _ in hits)
            out, self.pending = self.pending[:at], ""
            return out, True
        # the longest tail of pending that is a prefix of some stop string must wait for more text
        hold = max((n for s in self.stops for n in range(1, min(len(s), len(self.pending)) + 1)
                    if self.pending.endswith(s[:n])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        """What is still held back when generation ends for another reason (length, cancellation)."""
        out, self.pending = self.pending, ""
        return out
