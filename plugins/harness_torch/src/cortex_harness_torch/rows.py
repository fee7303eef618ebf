"""The KV cache of a batched transformers model: one row per running generation.

Per layer, keys and values live in one tensor of shape ``[rows, kv_heads, positions, head_dim]``
and running generation ``i`` owns row ``i``: its cached tokens sit at positions ``0..len-1``.
The running rows are kept contiguous (``0..n-1``; a generation that ends gives its row to the
last one), so the decode step of every running generation attends to a *view* of the tensor
(``[:n, :, :longest + 1]``): nothing is copied per step. This is the padded layout of TGI's
``CausalLMBatch`` with per-row lengths instead of left padding, which lets a row join and leave
without touching the others. Paged attention (vLLM) would waste less memory on rows of very
different lengths, but needs attention kernels that read through a block table; transformers'
own paged path was measured at 3-9 tokens/s on CPU (docs/benchmarks.md), so this harness keeps
one contiguous tensor and reports the memory it really uses.

The model's attention layers call :meth:`RowCache.update` with the keys and values of the
tokens of one forward pass (this object stands in for transformers' ``Cache``): it writes each
token at its row and position, and returns the rows' keys and values for attention. Which rows
and positions a forward pass covers is set just before it (:meth:`RowCache.plan`); the
attention mask (:func:`attention_mask`) is built from the same positions, so a query only sees
the keys at or before its own position in its own row.

Allocation is lazy and grows geometrically (rows up to ``max_rows``, positions as the longest
row needs them); everything is freed when no generation runs. Values start zeroed: a masked
key still multiplies its value by a zero weight, and uninitialised memory could hold NaN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

POSITION_GRANULE = 64


def _round_up(value: int, granule: int) -> int:
    return -(-value // granule) * granule


class RowCache:
    """KV tensors of the running generations of one model (see the module docstring)."""

    def __init__(self, device: torch.device, max_rows: int) -> None:
        self.device = device
        self.max_rows = max_rows
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0  # allocated rows
        self.positions = 0  # allocated positions per row
        # the current forward pass: row indices (or a slice), positions [batch, tokens], and
        # how many positions attention reads
        self._rows: Any = None
        self._row_index: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._view = 0

    # ---- transformers' Cache interface (what the attention layers and masks call) ---------

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's keys/values (``[batch, heads, tokens, dim]``) at their rows and
        positions; return the keys/values attention reads (``[batch, heads, view, dim]``)."""
        if layer_idx >= len(self.keys):
            self._allocate_layer(layer_idx, key_states, value_states)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        index = (self._row_index, slice(None), self._positions)
        keys[index] = key_states.transpose(1, 2)
        values[index] = value_states.transpose(1, 2)
        rows, view = self._rows, self._view
        if isinstance(rows, slice):
            return keys[rows, :, :view], values[rows, :, :view]
        # rows that are not contiguous (prompt chunks of several generations): a copy of just
        # the positions attention reads
        return keys[:, :, :view].index_select(0, rows), values[:, :, :view].index_select(0, rows)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Only asked when a model computes positions itself; ours always passes them."""
        return 0

    # ---- planning a forward pass ------------------------------------------------------

    def plan(self, rows: Any, positions: torch.Tensor, view: int) -> None:
        """The next forward pass covers ``rows`` (a slice of running rows, or a 1-D index
        tensor), whose tokens go to ``positions`` (``[batch, tokens]``), and attends to the
        first ``view`` positions of each row."""
        import torch

        self._rows = rows
        if isinstance(rows, slice):
            index = torch.arange(rows.start, rows.stop, device=self.device)
        else:
            index = rows
        self._row_index = index[:, None]
        self._positions = positions
        self._view = view

    # ---- storage ----------------------------------------------------------------------

    def ensure(self, rows: int, positions: int) -> None:
        """Room for ``rows`` rows of ``positions`` positions; grows (and copies what is there)
        geometrically so a growing batch or sequence reallocates only a few times."""
        if rows <= self.rows and positions <= self.positions:
            return
        new_rows = self.rows
        if rows > self.rows:
            new_rows = min(self.max_rows, max(rows, 2 * self.rows, 1))
            new_rows = max(new_rows, rows)
        new_positions = self.positions
        if positions > self.positions:
            new_positions = _round_up(max(positions, self.positions * 3 // 2), POSITION_GRANULE)
        self._resize(new_rows, new_positions)

    def _resize(self, rows: int, positions: int) -> None:
        import torch

        keep_rows, keep_positions = min(rows, self.rows), min(positions, self.positions)
        for tensors in (self.keys, self.values):
            for i, old in enumerate(tensors):
                new = torch.zeros(
                    (rows, old.shape[1], positions, old.shape[3]),
                    dtype=old.dtype,
                    device=old.device,
                )
                new[:keep_rows, :, :keep_positions] = old[:keep_rows, :, :keep_positions]
                tensors[i] = new
        self.rows, self.positions = rows, positions

    def _allocate_layer(
        self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> None:
        """Layers are allocated at their first use, with that layer's own head count and
        dimension (some architectures differ between layers)."""
        import torch

        if layer_idx != len(self.keys):
            raise RuntimeError(f"layer {layer_idx} used before layer {len(self.keys)}")
        for tensors, states in ((self.keys, key_states), (self.values, value_states)):
            tensors.append(
                torch.zeros(
                    (self.rows, states.shape[1], self.positions, states.shape[3]),
                    dtype=states.dtype,
                    device=states.device,
                )
            )

    def allocate_like(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Allocate every layer (with the head counts and dimensions of ``layers``, a saved
        prefix) before a forward pass did, so a saved prefix can be copied into a row."""
        import torch

        if self.keys:
            return
        for saved_keys, saved_values in layers:
            for tensors, saved in ((self.keys, saved_keys), (self.values, saved_values)):
                tensors.append(
                    torch.zeros(
                        (self.rows, saved.shape[0], self.positions, saved.shape[2]),
                        dtype=saved.dtype,
                        device=self.device,
                    )
                )

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``source`` into row ``target``."""
        if source == target or length <= 0:
            return
        for tensors in (self.keys, self.values):
            for tensor in tensors:
                tensor[target, :, :length] = tensor[source, :, :length]

    def read_row(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of the first ``length`` positions of ``row``, per layer (for the prefix
        cache)."""
        return [
            (keys[row, :, :length].clone(), values[row, :, :length].clone())
            for keys, values in zip(self.keys, self.values, strict=True)
        ]

    def write_row(
        self, row: int, layers: list[tuple[torch.Tensor, torch.Tensor]], length: int
    ) -> None:
        """Put the first ``length`` positions of a saved prefix into ``row``."""
        for (keys, values), (saved_keys, saved_values) in zip(
            zip(self.keys, self.values, strict=True), layers, strict=True
        ):
            keys[row, :, :length] = saved_keys[:, :length]
            values[row, :, :length] = saved_values[:, :length]

    @property
    def allocated(self) -> bool:
        return bool(self.keys)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def free(self) -> None:
        self.keys, self.values = [], []
        self.rows = self.positions = 0
        self._rows = self._row_index = self._positions = None


def attention_mask(
    positions: torch.Tensor, view: int, dtype: torch.dtype, window: int | None = None
) -> torch.Tensor:
    """The additive mask (``[batch, 1, tokens, view]``) that lets the token at ``positions[b,
    t]`` attend to the keys of its own row at positions ``<=`` its own (and, with a sliding
    ``window``, only the last ``window`` of those). Floating point, as every attention
    implementation of transformers takes it (eager adds it; SDPA takes it as is)."""
    import torch

    keys = torch.arange(view, device=positions.device)
    visible = keys[None, None, :] <= positions[:, :, None]
    if window is not None:
        visible &= keys[None, None, :] > positions[:, :, None] - window
    mask = torch.zeros(visible.shape, dtype=dtype, device=positions.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[:, None]
