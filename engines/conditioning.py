"""What the UNet reads about the prompts besides the sample and timestep: `TextCondition`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import EngineError
from .manifest import UNET_INPUTS


def _as_input(a: np.ndarray) -> np.ndarray:
    """float32 for real-valued inputs, int64 for integer ones (PixArt's caption mask)."""
    return a.astype(np.int64 if np.issubdtype(a.dtype, np.integer) else np.float32, copy=False)


@dataclass(frozen=True)
class TextCondition:
    """What the UNet reads about the prompts, row by row: the text context [B, L, E] and the extra inputs
    `added` (name -> [B, ...]): for SDXL-class UNets text_embeds [B, P], the pooled text embedding, and
    time_ids [B, 6], the size conditioning; for PixArt encoder_attention_mask [B, L] int64, the caption's
    padding mask; for SD3 pooled_projections [B, P]. A bare context array is a TextCondition without extras."""

    context: np.ndarray
    added: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, value) -> TextCondition:
        if isinstance(value, TextCondition):
            return value
        return cls(np.asarray(value, dtype=np.float32))

    def __len__(self) -> int:
        return int(self.context.shape[0])

    def take(self, rows) -> TextCondition:
        """The rows `rows` (indices or a slice) of every array."""
        return TextCondition(self.context[rows], {k: v[rows] for k, v in self.added.items()})

    def repeat(self, n: int) -> TextCondition:
        """Each row repeated n times (a [1, ...] unconditional condition for a batch of n)."""
        return TextCondition(np.repeat(self.context, n, axis=0), {k: np.repeat(v, n, axis=0)
                                                                  for k, v in self.added.items()})

    @staticmethod
    def concat(items: Sequence[TextCondition]) -> TextCondition:
        keys = set(items[0].added)
        if any(set(c.added) != keys for c in items):
            raise EngineError("text conditions with different UNet inputs cannot share a batch (an SDXL export "
                              "needs Runtime.condition's TextCondition, not a bare text context)")
        return TextCondition(np.concatenate([c.context for c in items]).astype(np.float32, copy=False),
                             {k: _as_input(np.concatenate([c.added[k] for c in items])) for k in sorted(keys)})

    def feeds(self) -> dict[str, np.ndarray]:
        """The UNet inputs besides sample and timestep."""
        return {UNET_INPUTS[2]: self.context, **self.added}
