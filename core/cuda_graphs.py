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

from titanserve.core.model.attention import AttentionMetadata
from titanserve.ipc.messages import SeqPlan

# forward(token_ids (B,), meta) -> hidden (B, H)
Forward = Callable[[torch.Tensor, AttentionMetadata], torch.Tensor]
_FIELDS = 5  # token ids, positions, slot blocks, slot offsets, context lengths


def capture_sizes(max_batch: int) -> list[int]:
    """The batch sizes to capture: 1, 2, 4, then every multiple of 8, up to `max_batch`
    (included). Padding a batch up to the next size wastes at most 7 rows."""
    sizes = {b for b in (1, 2, 4) if b <= max_batch} | set(range(8, max_batch + 1, 8))
    return sorted(sizes | {max_batch})


class DecodeGraphs:
    """Decode-step graphs over one set of static inputs.

    Memory: one int64 buffer holds the (n,) token ids, positions, slot blocks, slot offsets
    and context lengths, then the (n, W) block tables, n the largest size and W the blocks
    of the longest sequence. One copy fills it each step.
    """

    def __init__(
        self,
        forward: Forward,
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
        self.block_size, self.scratch_block = block_size, scratch_block
        self.sizes = capture_sizes(max_batch)
        n, W = self.sizes[-1], max_blocks_per_seq
        self._n, self._w = n, W
        size = _FIELDS * n + n * W
        self.inputs = torch.zeros(size, dtype=torch.int64, device=device)
        pinned = device.type == "cuda"
        self._staging = torch.zeros(size, dtype=torch.int64, pin_memory=pinned)
        self._host = self._staging.numpy()  # writes here reach the pinned memory
        self._copied = torch.cuda.Event() if pinned else None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0  # steps served by a graph (or its eager stand-in)

    def _views(self, b: int) -> tuple[torch.Tensor, AttentionMetadata]:
        n, W, x = self._n, self._w, self.inputs
        meta = AttentionMetadata(
            positions=x[n : n + b],
            slot_blocks=x[2 * n : 2 * n + b],
            slot_offsets=x[3 * n : 3 * n + b],
            num_decode_tokens=b,
            decode_block_tables=x[_FIELDS * n : _FIELDS * n + b * W].view(b, W),
            decode_context_lens=x[4 * n : 4 * n + b],
            prefills=[],
        )
        return x[:b], meta

    def _stage(self, seqs: list[SeqPlan], b: int) -> None:
        """Write the step's inputs, padded to b rows, into the static buffer."""
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has read the staging memory
        n, W, bs, B, host = self._n, self._w, self.block_size, len(seqs), self._host
        positions = [s.start_pos for s in seqs]
        host[:B] = [s.token_ids[0] for s in seqs]
        host[n : n + B] = positions
        host[2 * n : 2 * n + B] = [s.block_ids[p // bs] for s, p in zip(seqs, positions)]
        host[3 * n : 3 * n + B] = host[n : n + B] % bs
        host[4 * n : 4 * n + B] = host[n : n + B] + 1
        for field in range(_FIELDS):  # the padding rows
            host[field * n + B : field * n + b] = self.scratch_block if field == 2 else 0
        tables = host[_FIELDS * n :].reshape(n, W)
        for i, s in enumerate(seqs):
            # Entries past a sequence's blocks keep older values: no kernel reads them.
            tables[i, : len(s.block_ids)] = s.block_ids
        used = _FIELDS * n + b * W
        self.inputs[:used].copy_(self._staging[:used], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

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
            self._stage([], b)  # every row padding: the capture writes only the scratch block
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

    def run(self, seqs: list[SeqPlan]) -> torch.Tensor:
        """The step's hidden states (B, H): a view that the next run overwrites."""
        B = len(seqs)
        b = self.bucket(B)
        self._stage(seqs, b)
        self.replays += 1
        if not self.capturing:
            return self.forward(*self._views(b))[:B]
        graph, hidden = self._graphs[b]
        graph.replay()
        return hidden[:B]
