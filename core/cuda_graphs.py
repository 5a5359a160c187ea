"""CUDA graphs for decode steps: the decoder's forward, captured once per batch size.

On a GPU, a small model's decode step is bound by Python launching kernels, not by the
kernels: a profile on an H100 showed 50 ms of GPU time in 489 ms of steps. A graph replays a
whole forward with one launch. A graph fixes every address and shape, so a step's inputs
are copied into static buffers, and a batch of B sequences replays the graph of the smallest
captured size >= B. Its extra rows are padding: token 0 at position 0, context length 0
(attention gives them zeros), writing their keys and values to a scratch block that no
sequence owns.

Only decode-only steps replay. Steps with a prefill chunk run eagerly, and so do models
whose forward exchanges tokens with other workers (expert parallel), which no graph holds.
Without `capture` (the tests on CPU), `run` calls the forward on the same static buffers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from titanserve.core.block_tables import BlockTables
from titanserve.core.model.attention import AttentionMetadata
from titanserve.ipc.messages import SeqPlan

# forward(token_ids (B,), meta) -> hidden (B, H)
Forward = Callable[[torch.Tensor, AttentionMetadata], torch.Tensor]
MAX_CAPTURED_BATCH = 512  # larger decode batches run eagerly (each size is a capture at start)


def capture_sizes(max_batch: int) -> list[int]:
    """The batch sizes to capture: 1, 2, 4, then every multiple of 8, up to `max_batch`
    (included) or MAX_CAPTURED_BATCH. Padding a batch up to the next size wastes at most 7
    rows."""
    max_batch = min(max_batch, MAX_CAPTURED_BATCH)
    sizes = {b for b in (1, 2, 4) if b <= max_batch} | set(range(8, max_batch + 1, 8))
    return sorted(sizes | {max_batch})


class _Staged:
    """A static device buffer and the pinned host buffer that fills it, one copy a step."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.device_buffer = torch.zeros(size, dtype=dtype, device=device)
        pinned = device.type == "cuda"
        self._staging = torch.zeros(size, dtype=dtype, pin_memory=pinned)
        self.host = self._staging.numpy()  # writes here reach the pinned memory
        self._copied = torch.cuda.Event() if pinned else None

    def wait_until_read(self) -> None:
        """Before writing `host`: the last copy has read it."""
        if self._copied is not None:
            self._copied.synchronize()

    def copy(self, used: int) -> None:
        self.device_buffer[:used].copy_(self._staging[:used], non_blocking=True)
        if self._copied is not None:
            self._copied.record()


class DecodeGraphs:
    """Decode-step graphs over one set of static inputs.

    Memory: an int64 buffer holds the token ids, positions, slot blocks and slot offsets, and an
    int32 buffer the context lengths and then the (n, W) block tables (n the largest size, W the
    blocks of the longest sequence): the dtypes the eager steps use. Each part starts 16-byte
    aligned, as a fresh tensor does: Triton compiles a variant per pointer alignment, and so
    the graphs and the eager steps share their kernels' variants (core.warmup).
    """

    def __init__(
        self,
        forward: Forward,
        block_tables: BlockTables,
        block_size: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        max_batch: int,
        device: torch.device,
        capture: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"decode graphs need max_batch >= 1, got {max_batch}")
        self.forward, self.device, self.capturing = forward, device, capture
        self.block_tables = block_tables  # the runner's: each sequence's blocks, by row
        self.block_size, self.scratch_block = block_size, scratch_block
        self.sizes = capture_sizes(max_batch)
        n, W = self.sizes[-1], max_blocks_per_seq
        m = -(-n // 4) * 4  # the stride of the parts: 16-byte aligned in both dtypes
        self._n, self._m, self._w = n, m, W
        self._ids = _Staged(4 * m, torch.int64, device)
        self._tables = _Staged(m + n * W, torch.int32, device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0  # steps served by a graph (or its eager stand-in)

    def _views(self, b: int) -> tuple[torch.Tensor, AttentionMetadata]:
        m, W = self._m, self._w
        x, t = self._ids.device_buffer, self._tables.device_buffer
        meta = AttentionMetadata(
            positions=x[m : m + b],
            slot_blocks=x[2 * m : 2 * m + b],
            slot_offsets=x[3 * m : 3 * m + b],
            num_decode_tokens=b,
            decode_block_tables=t[m : m + b * W].view(b, W),
            decode_context_lens=t[:b],
            prefills=[],
        )
        return x[:b], meta

    def _stage(self, seqs: list[SeqPlan], rows: list[int], b: int) -> None:
        """Write the step's inputs, padded to b rows, into the static buffers (`rows`: each
        sequence's row in the block tables)."""
        self._ids.wait_until_read()
        self._tables.wait_until_read()
        m, W, bs, B = self._m, self._w, self.block_size, len(seqs)
        x, t = self._ids.host, self._tables.host
        x[:B] = [s.token_ids[0] for s in seqs]
        x[m : m + B] = [s.start_pos for s in seqs]
        x[2 * m : 2 * m + B] = self.block_tables.array[rows, x[m : m + B] // bs]
        x[3 * m : 3 * m + B] = x[m : m + B] % bs
        t[:B] = x[m : m + B] + 1
        for part in range(4):  # the padding rows
            x[part * m + B : part * m + b] = self.scratch_block if part == 2 else 0
        t[B:b] = 0
        tables = t[m:].reshape(self._n, W)
        tables[:B] = self.block_tables.gather(rows, W)  # 0 past each sequence's blocks
        self._ids.copy(4 * m)
        self._tables.copy(m + b * W)

    def covers(self, seqs: list[SeqPlan]) -> bool:
        """Whether a graph can run this step: decodes only, no more than the largest size."""
        return 0 < len(seqs) <= self._n and all(len(s.token_ids) == 1 for s in seqs)

    def bucket(self, batch: int) -> int:
        return next(b for b in self.sizes if b >= batch)

    @torch.inference_mode()
    def capture(self, progress: bool = True) -> None:
        """Capture every size, largest first (the smaller ones reuse its memory pool). The
        forward runs once eagerly before each capture, compiling its kernels."""
        pool = None
        for b in tqdm(self.sizes[::-1], desc="capturing CUDA graphs", unit="graph",
                      disable=not (progress and self.capturing)):
            self._stage([], [], b)  # every row padding: the capture writes only the scratch block
            token_ids, meta = self._views(b)
            if not self.capturing:
                continue
            self.forward(token_ids, meta)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.forward(token_ids, meta)  # (b, H), memory of the pool
            pool = graph.pool()
            self._graphs[b] = (graph, hidden)

    def run(self, seqs: list[SeqPlan], rows: list[int]) -> torch.Tensor:
        """The step's hidden states (B, H): a view that the next run overwrites (`rows`: each
        sequence's row in the block tables)."""
        B = len(seqs)
        b = self.bucket(B)
        self._stage(seqs, rows, b)
        self.replays += 1
        if not self.capturing:
            return self.forward(*self._views(b))[:B]
        graph, hidden = self._graphs[b]
        graph.replay()
        return hidden[:B]
