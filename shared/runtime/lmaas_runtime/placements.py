"""Where a batch's prompt vectors go: (row, position) pairs and the values to write there, built on the host and
sent in one transfer, so a batch costs one indexed write per kind of vector, not one per row.

Rows of one candidate share its tensors (a `RowPrompt` is built once per candidate), so each distinct tensor is
concatenated once and gathered by index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


class Placements:
    """Accumulates (row, positions, tensor, tensor rows) and builds (rows [N], positions [N], values [N, H])."""

    def __init__(self) -> None:
        self._rows: list[np.ndarray] = []
        self._positions: list[np.ndarray] = []
        self._sources: list[np.ndarray] = []
        self._tensors: list[torch.Tensor] = []
        self._offsets: dict[int, int] = {}  # id(tensor) -> its first row in the concatenation
        self._size = 0

    def __bool__(self) -> bool:
        return bool(self._rows)

    def add(self, row: int, positions: np.ndarray, tensor: torch.Tensor, take: np.ndarray | None = None) -> None:
        """Values `tensor[take]` (default: its first len(positions) rows) go to `positions` of batch row `row`."""
        key = id(tensor)
        if key not in self._offsets:
            self._offsets[key] = self._size
            self._tensors.append(tensor)
            self._size += int(tensor.shape[0])
        take = np.arange(len(positions)) if take is None else take
        self._rows.append(np.full(len(positions), row, dtype=np.int64))
        self._positions.append(np.asarray(positions, dtype=np.int64))
        self._sources.append(take.astype(np.int64) + self._offsets[key])

    def span(self, row: int, start: int, tensor: torch.Tensor) -> None:
        """All of `tensor` [n, H] at positions start .. start + n - 1."""
        self.add(row, np.arange(start, start + int(tensor.shape[0])), tensor)

    def build(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch

        index = np.stack([np.concatenate(self._rows), np.concatenate(self._positions), np.concatenate(self._sources)])
        rows, positions, sources = torch.from_numpy(index).to(device)  # one transfer
        values = self._tensors[0] if len(self._tensors) == 1 else torch.cat(self._tensors)
        return rows, positions, values[sources]


def text_positions(length: int, prompt_at: int, prompt_length: int) -> np.ndarray:
    """Positions of an example's own `length` tokens (all but the prompt span) in the plain-path sequence."""
    positions = np.arange(length)
    if prompt_at >= 0:
        positions[prompt_at:] += prompt_length
    return positions
