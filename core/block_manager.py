"""Paged KV block manager with prefix caching (one per worker; lives in the scheduler).

A block holds `block_size` token slots. Full blocks are identified by a chain hash of all
tokens up to their end, so equal prefixes share blocks. Freed blocks keep their hash and
stay reusable until they are evicted, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict

from titanserve.core.request import Request


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    """Narrow verbs: can_allocate/allocate/free, can_append/append, cache_full_blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Blocks with ref count 0, least recently freed first (the eviction order).
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, request: Request) -> list[int]:
        """Chain hashes of the request's full blocks (extended as tokens arrive)."""
        hashes, bs, tokens = request.block_hashes, self.block_size, request.all_token_ids
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            hashes.append(
                chain_hash(hashes[-1] if hashes else None, tuple(tokens[i * bs : (i + 1) * bs]))
            )
        return hashes

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids of the longest cached prefix. At least one token is always left to
        compute, because the step that computes it produces the next token's logits."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks = []
        for i, h in enumerate(self._hashes(request)[:max_blocks]):
            block = self.hash_to_block.get(h)
            bs = self.block_size
            if block is None or self.block_tokens[block] != tuple(
                request.all_token_ids[i * bs : (i + 1) * bs]
            ):
                break
            blocks.append(block)
        return blocks

    # ------------------------------------------------------------------ allocate / free
    def can_allocate(self, cached_blocks: list[int], num_tokens: int) -> bool:
        """Room for a new request covering `num_tokens`, reusing `cached_blocks`."""
        revived = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        new = max(0, self.blocks_needed(num_tokens) - len(cached_blocks))
        return new + revived <= self.num_free_blocks

    def allocate(self, request: Request, cached_blocks: list[int], num_tokens: int) -> None:
        assert not request.block_ids, "request already holds blocks"
        assert self.can_allocate(cached_blocks, num_tokens)
        for block in cached_blocks:
            self._ref(block)
        request.block_ids = list(cached_blocks)
        request.num_published_blocks = len(cached_blocks)  # already in the index
        self.append(request, num_tokens)

    def can_append(self, request: Request, num_tokens: int) -> bool:
        """Room to grow the request's table so that it covers `num_tokens` tokens."""
        return self.blocks_needed(num_tokens) - len(request.block_ids) <= self.num_free_blocks

    def append(self, request: Request, num_tokens: int) -> None:
        missing = self.blocks_needed(num_tokens) - len(request.block_ids)
        assert missing <= self.num_free_blocks, "append without can_append"
        for _ in range(missing):
            block, _ = self.free_blocks.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            request.block_ids.append(block)

    def free(self, request: Request) -> None:
        # Tail blocks first: they are the least likely to be shared, so evict them first.
        for block in reversed(request.block_ids):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        request.block_ids = []
        request.num_published_blocks = 0

    def cache_full_blocks(self, request: Request) -> None:
        """Publish the request's computed full blocks in the prefix index."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        if num_full <= request.num_published_blocks:  # most decode steps fill no block
            return
        hashes = self._hashes(request)
        bs = self.block_size
        for i in range(request.num_published_blocks, num_full):
            block = request.block_ids[i]
            if self.block_hash[block] is not None:
                continue
            h = hashes[i]
            if h in self.hash_to_block:  # same content computed twice: keep the first
                continue
            self.block_hash[block] = h
            self.block_tokens[block] = tuple(request.all_token_ids[i * bs : (i + 1) * bs])
            self.hash_to_block[h] = block
        request.num_published_blocks = max(request.num_published_blocks, num_full)

    def reset_prefix_cache(self) -> None:
        for block in list(self.hash_to_block.values()):
            self._evict(block)

    # ------------------------------------------------------------------ internals
    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
            self.block_tokens[block] = None
