"""Model runner: turns a StepPlan into tensors, runs the decoder, samples.

One runner lives in each worker. It owns the model shard, the paged KV cache (keys and values,
each `[layers, num_blocks, block_size, kv_heads, head_dim]`, see `core.model.kv_cache`) and the
sampler state.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from titanserve.core.block_tables import BlockTables
from titanserve.core.config import ModelConfig
from titanserve.core.cpu_malloc import tune_malloc
from titanserve.core.cuda_graphs import DecodeGraphs
from titanserve.core.model.attention import AttentionMetadata, PrefillChunk
from titanserve.core.model.decoder import DecoderModel
from titanserve.core.model.kv_cache import allocate_kv_caches, key_pages
from titanserve.core.model.kv_cache import kv_cache_dtype as resolve_kv_cache_dtype
from titanserve.core.model.loader import load_weights
from titanserve.core.model.rotary_layout import interleave_rotary_pairs
from titanserve.core.sampler import Sampler, SamplingState
from titanserve.ipc.messages import SeqPlan, SeqResult, StepPlan, StepResult
from titanserve.kernels.backend import backend
from titanserve.kernels.cpu_experts import pack_expert_weights, packed_expert_matrices
from titanserve.kernels.cpu_linear import pack_linear_weights, warm_up_packed
from titanserve.kernels.fused_moe import use_input_major_experts
from titanserve.kernels.paged_decode_rows import decode_rows
from titanserve.moe.layer import MoELayer
from titanserve.moe.placement import ExpertPlacement


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * itemsize


class ModelRunner:
    def __init__(
        self,
        model_path: Path,
        cfg: ModelConfig,
        dtype: torch.dtype,
        block_size: int,
        num_blocks: int,
        max_model_len: int,
        placement: ExpertPlacement,
        device: torch.device | None = None,
        seed: int = 0,
        progress: bool = True,
        kv_cache_dtype: str = "auto",  # see core.model.kv_cache.kv_cache_dtype
        layer_placements: dict[int, ExpertPlacement] | None = None,  # see DecoderModel
    ) -> None:
        device = device or torch.device("cpu")
        if device.type == "cpu":
            tune_malloc()
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.block_size, self.max_model_len = block_size, max_model_len
        # One block more than the block managers hand out: the scratch block that a decode
        # graph's padding rows write to (core.cuda_graphs).
        self.scratch_block = num_blocks
        self.num_blocks = num_blocks + 1
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                self.model = DecoderModel(cfg, placement, max_model_len, layer_placements)
        finally:
            torch.set_default_dtype(previous)
        load_weights(self.model, model_path, progress=progress)
        interleave_rotary_pairs(self.model)  # CPU: one complex multiply rotates q and k
        pack_linear_weights(self.model)  # CPU weights: oneDNN layout, once (kernels.cpu_linear)
        pack_expert_weights(self.model)  # and experts, one packed matrix per expert
        use_input_major_experts(self.model)  # or, where oneDNN cannot, the layout BLAS reads
        self.k_caches, self.v_caches = allocate_kv_caches(
            cfg.num_layers, cfg.num_kv_heads, self.num_blocks, block_size, cfg.head_dim,
            resolve_kv_cache_dtype(kv_cache_dtype, device, dtype), device,
        )  # each (L, num_blocks + 1, block_size, Hk, D)
        # CPU fp32 caches keep keys page-transposed: decode then reads them in place.
        self.decode_in_place = cfg.num_layers > 0 and key_pages(self.k_caches[0]) is not None
        self.sampler = Sampler(seed)
        self.lockstep = False  # set by a worker whose layers run collectives
        self.states: dict[str, SamplingState] = {}
        self.block_tables = BlockTables(-(-max_model_len // block_size))
        self.decode_graphs: DecodeGraphs | None = None

    def warm_up_cpu_linears(self, max_batch: int) -> int:
        """Build oneDNN's kernels for the packed weights' row buckets up to `max_batch`
        (kernels.cpu_linear: each new row count costs ~0.5 ms once); returns how many."""
        weights = [*self.model.parameters(), *packed_expert_matrices(self.model)]
        return warm_up_packed(weights, max_batch)

    def capture_decode_graphs(
        self, max_batch: int, capture: bool = True, progress: bool = True
    ) -> bool:
        """Serve decode-only steps of up to `max_batch` sequences from CUDA graphs (without
        `capture`: from the same static buffers, eagerly; for tests). Call it once the MoE
        layers' exchanges are set; a forward with collectives stays eager (returns False)."""
        if any(isinstance(m, MoELayer) and m.exchange is not None for m in self.model.modules()):
            self.decode_graphs = None
            return False
        self.decode_graphs = DecodeGraphs(
            self.run_model,
            self.block_tables,
            self.block_size,
            -(-self.max_model_len // self.block_size),
            self.scratch_block,
            max_batch,
            self.device,
            capture=capture,
        )
        self.decode_graphs.capture(progress)
        return True

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> tuple[StepResult, torch.Tensor | None]:
        """Run one step. Returns the result and a (R, V) fp32 tensor of requested logits rows."""
        t0 = time.perf_counter()
        for rid in plan.finished_ids:
            self.states.pop(rid, None)
            self.block_tables.drop(rid)
        rows = []  # each sequence's row in the block tables
        for seq in plan.seqs:
            if seq.new is not None:
                self.states[seq.request_id] = SamplingState(
                    seq.new.sampling, seq.new.num_prompt_tokens, list(seq.new.history_token_ids)
                )
            if seq.follows_sample:  # planned before the scheduler saw the token sampled here
                seq.token_ids = [self.states[seq.request_id].last_token_id]
            rows.append(self.block_tables.update(seq))
        if not plan.seqs:
            if self.lockstep:  # join the other workers' collectives with no tokens
                if plan.two_batches:
                    self._run_overlapped([], [])
                else:
                    self.run_model(torch.empty(0, dtype=torch.int64, device=self.device), None)
            return StepResult(
                step_id=plan.step_id, seqs=[], compute_time_s=time.perf_counter() - t0
            ), None

        if plan.two_batches and self.lockstep:
            hidden, starts = self._run_overlapped(plan.seqs, rows)  # (T, H)
        elif self.decode_graphs is not None and self.decode_graphs.covers(plan.seqs):
            hidden = self.decode_graphs.run(plan.seqs, rows)  # (B, H)
            starts = range(len(plan.seqs))
        else:
            token_ids, meta, starts = self._prepare(plan.seqs, rows)
            hidden = self.run_model(token_ids, meta)  # (T, H)

        sample_rows, logit_rows, results = [], [], []
        for seq, start in zip(plan.seqs, starts):
            state = self.states[seq.request_id]
            result = SeqResult(request_id=seq.request_id)
            n = len(seq.token_ids)
            if state.params.return_prompt_logits:
                first = len(logit_rows)
                logit_rows.extend(range(start, start + n))
                result.prompt_logits_rows = (first, first + n)
                result.prompt_logits_start_pos = seq.start_pos
            if seq.sample:
                sample_rows.append(start + n - 1)
            results.append(result)

        sampled_seqs = [(s, r) for s, r in zip(plan.seqs, results) if s.sample]
        extra_logits = None
        rows = sample_rows + logit_rows
        if rows:
            # Sample rows rise, one per sampling sequence: T of them are every row, in order
            # (a decode step), and the hidden states need no gather.
            if logit_rows or len(sample_rows) != hidden.shape[0]:
                hidden = hidden[torch.tensor(rows, dtype=torch.int64, device=self.device)]
            logits = self.model.logits(hidden)  # (S + P, V) fp32
            sample_logits = logits[: len(sample_rows)]
            if sampled_seqs:
                states = [self.states[s.request_id] for s, _ in sampled_seqs]
                context_lens = [s.start_pos + len(s.token_ids) for s, _ in sampled_seqs]
                for state, context_len in zip(states, context_lens):
                    # A step redone (its results were lost) sampled once already: forget it.
                    state.truncate(context_len)
                num_generated = [n - st.num_prompt_tokens for n, st in zip(context_lens, states)]
                out = self.sampler(sample_logits, states, num_generated)
                keep = []
                for j, ((_, result), state) in enumerate(zip(sampled_seqs, states)):
                    result.token_id = state.last_token_id = out.token_ids[j]
                    result.logprob = out.logprobs[j]
                    result.top_logprobs = out.top_logprobs[j]
                    state.record(out.token_ids[j])
                    if state.params.return_logits:
                        result.logits_row = len(logit_rows) + len(keep)
                        keep.append(j)
                parts = [logits[len(sample_rows) :]]
                if keep:
                    parts.append(sample_logits[keep])
                extra_logits = torch.cat(parts).cpu() if (logit_rows or keep) else None
            elif logit_rows:
                extra_logits = logits.cpu()
        elapsed = time.perf_counter() - t0
        return StepResult(step_id=plan.step_id, seqs=results, compute_time_s=elapsed), extra_logits

    def run_model(self, token_ids: torch.Tensor, meta: AttentionMetadata | None) -> torch.Tensor:
        if meta is None:
            meta = _no_tokens_metadata(token_ids)
        return self.model(token_ids, meta, self.k_caches, self.v_caches)

    def _run_overlapped(
        self, seqs: list[SeqPlan], rows: list[int]
    ) -> tuple[torch.Tensor, list[int]]:
        """Run the step as two micro-batches of about half its tokens each (sequences kept
        whole and in order, either may be empty), one's all-to-alls in flight while the other
        computes. Returns the (T, H) hidden states and each sequence's first row, as one
        batch would."""
        half = split_in_halves([len(s.token_ids) for s in seqs])
        batches, starts, offset = [], [], 0
        for part, part_rows in ((seqs[:half], rows[:half]), (seqs[half:], rows[half:])):
            if not part:
                no_tokens = torch.empty(0, dtype=torch.int64, device=self.device)
                batches.append((no_tokens, _no_tokens_metadata(no_tokens)))
                continue
            token_ids, meta, part_starts = self._prepare(part, part_rows)
            batches.append((token_ids, meta))
            starts += [offset + start for start in part_starts]
            offset += token_ids.shape[0]
        hidden = self.model.forward_overlapped(batches, self.k_caches, self.v_caches)
        return torch.cat(hidden), starts  # (T, H)

    # ------------------------------------------------------------------ inputs
    def _prepare(
        self, seqs: list[SeqPlan], rows: list[int]
    ) -> tuple[torch.Tensor, AttentionMetadata, list[int]]:
        """The step's inputs; `rows`: each sequence's row in the block tables."""
        bs, tables = self.block_size, self.block_tables
        # a decode (one token, as most rows of most steps are) at each of the first rows
        num_decodes = next((i for i, s in enumerate(seqs) if len(s.token_ids) != 1), len(seqs))
        token_ids = [s.token_ids[0] for s in seqs[:num_decodes]]
        positions = [s.start_pos for s in seqs[:num_decodes]]
        decode_lens = [p + 1 for p in positions]
        starts = list(range(num_decodes))
        table_rows = rows[:num_decodes]
        decode_blocks = np.asarray(positions, dtype=np.int64) // bs  # (Bd,)
        assert (decode_blocks < tables.lengths[table_rows]).all(), "a position past its table"
        slot_blocks = [tables.array[table_rows, decode_blocks]]  # the cache block of each token
        prefills = []
        for seq, row in zip(seqs[num_decodes:], rows[num_decodes:]):
            n, first = len(seq.token_ids), seq.start_pos
            assert n != 1, "decode rows must come first in a plan"
            starts.append(len(token_ids))
            token_ids.extend(seq.token_ids)
            positions.extend(range(first, first + n))
            blocks = tables.blocks(row)  # (blocks,) int32
            slot_blocks.append(blocks[np.arange(first, first + n) // bs])
            context_len = first + n
            used = -(-context_len // bs)
            block_ids = torch.from_numpy(blocks[:used].astype(np.int64)).to(self.device)
            prefills.append(PrefillChunk(starts[-1], n, context_len, block_ids))
        # (Bd, width) int32, 0 past each sequence's blocks
        width = max(1, int(tables.lengths[table_rows].max(initial=0)))
        table = torch.from_numpy(tables.gather(table_rows, width))
        dev = self.device
        lens = torch.tensor(decode_lens, dtype=torch.int32, device=dev)
        in_place = None  # the cache rows decode attention reads (CPU)
        if decode_lens and self.decode_in_place and backend(lens) == "torch":
            cfg = self.cfg
            in_place = decode_rows(
                table,
                lens,
                cfg.num_kv_heads,
                cfg.num_heads // cfg.num_kv_heads,
                self.num_blocks,
                bs,
                cfg.head_dim,
            )
        position_tensor = torch.tensor(positions, dtype=torch.int64, device=dev)
        meta = AttentionMetadata(
            positions=position_tensor,
            slot_blocks=torch.from_numpy(np.concatenate(slot_blocks).astype(np.int64)).to(dev),
            slot_offsets=position_tensor % bs,
            num_decode_tokens=len(decode_lens),
            decode_block_tables=table.to(dev),
            decode_context_lens=lens,
            prefills=prefills,
            decode_rows=in_place,
        )
        return torch.tensor(token_ids, dtype=torch.int64, device=dev), meta, starts


def split_in_halves(num_tokens: list[int]) -> int:
    """Where to cut a step's sequences (each `num_tokens[i]` long, kept whole) into two
    micro-batches: the cut whose larger side has the fewest tokens (the first such)."""
    total = sum(num_tokens)
    before, best, best_larger = 0, 0, total
    for i, n in enumerate(num_tokens):
        before += n
        larger = max(before, total - before)
        if larger < best_larger:
            best, best_larger = i + 1, larger
    return best


def _no_tokens_metadata(token_ids: torch.Tensor) -> AttentionMetadata:
    """Attention metadata for a batch of no tokens (a worker joining the collectives)."""
    return AttentionMetadata(
        positions=token_ids,
        slot_blocks=token_ids,
        slot_offsets=token_ids,
        num_decode_tokens=0,
        decode_block_tables=torch.empty(0, 1, dtype=torch.int32),
        decode_context_lens=torch.empty(0, dtype=torch.int32),
        prefills=[],
    )
