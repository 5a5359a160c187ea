"""The engine loop: step() = schedule -> submit to workers -> process the previous step's
outputs while they compute -> collect results.

Owns requests, tokenizer, scheduler and block managers; never touches model tensors
beyond handing returned logits to the caller.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from titanserve.core.block_manager import BlockManager
from titanserve.core.config import ModelConfig
from titanserve.core.engine_config import TWO_BATCH_MIN_SEQS_PER_WORKER, EngineConfig
from titanserve.core.errors import ConfigError, InvalidRequest, WorkerLost
from titanserve.core.model.kv_cache import kv_cache_dtype
from titanserve.core.model_runner import kv_bytes_per_block
from titanserve.core.outputs import RequestOutput, StepDelta
from titanserve.core.request import Request
from titanserve.core.sampling_params import SamplingParams
from titanserve.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from titanserve.core.tokenizer import FinalDetokenizer, IncrementalDetokenizer, Tokenizer
from titanserve.core.warmup import warm_up
from titanserve.moe.expert_loads import check_writable, write_expert_loads

logger = logging.getLogger("titanserve.engine")


def resolve_model_path(model: str) -> Path:
    """A checkpoint folder, or a .gguf file converted once and cached."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ConfigError(f"model path {model!r} does not exist")
    if path.suffix == ".gguf":
        from titanserve.core.gguf_convert import cached_checkpoint_for_gguf

        return cached_checkpoint_for_gguf(path)
    return path


def outside_compute(
    step_s: float, compute_s: float, comm_s: float = 0.0, comm_wait_s: float = 0.0
) -> tuple[float, dict[str, float]]:
    """The share of `step_s` (step wall time) outside `compute_s` (model compute), and that
    share in parts: `comm_wait_s` (all-to-all time spent waiting for other workers), the rest
    of `comm_s` (all-to-all time), and what is left (engine + IPC: scheduling, engine <->
    worker messages, output processing, whatever a step does not overlap). 0 for no steps."""
    if step_s == 0:
        return 0.0, {"all-to-all wait": 0.0, "all-to-all work": 0.0, "engine + IPC": 0.0}
    share = max(0.0, 1.0 - compute_s / step_s)
    wait, work = comm_wait_s / step_s, (comm_s - comm_wait_s) / step_s
    rest = max(0.0, share - wait - work)
    return share, {"all-to-all wait": wait, "all-to-all work": work, "engine + IPC": rest}


def compute_apart(slowest_s: float, fastest_s: float) -> float:
    """How much less the fastest worker computed than the slowest, as a share of the slowest's
    compute (steps summed): lockstep workers on identical work still drift apart when the host
    slows one core down for a while, and the others then wait. 0 for no steps."""
    return max(0.0, 1.0 - fastest_s / slowest_s) if slowest_s > 0 else 0.0


@dataclass
class _Tracker:
    request: Request
    output: RequestOutput
    detokenizer: IncrementalDetokenizer | None  # streamed text, a delta every token
    final_text: FinalDetokenizer | None  # or the text made once, when the output ends
    stop_hold: int  # chars held back from streaming while a stop string could still match
    logits_rows: list[torch.Tensor] = field(default_factory=list)
    emitted_chars: int = 0


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.model_config = ModelConfig.from_hf(self.model_path)
        self.tokenizer = (
            Tokenizer(self.model_path) if (self.model_path / "tokenizer.json").exists() else None
        )
        cfg = self.model_config
        if config.record_expert_loads is not None:
            check_writable(config.record_expert_loads, cfg.num_experts)
        self.max_model_len = config.resolve_max_model_len(cfg)
        device = config.resolve_device(0)
        cache_dtype = kv_cache_dtype(config.kv_cache_dtype, device, config.torch_dtype)
        per_block = kv_bytes_per_block(cfg, config.block_size, cache_dtype)
        self.num_blocks = config.resolve_num_blocks(per_block, self.max_model_len, device)
        # NOTE: one worker's cache must hold a whole request (until long prompts are sharded
        # across workers), so the context is capped to it and no request can outgrow it.
        capacity = self.num_blocks * config.block_size
        self.context_capped_by_cache = capacity < self.max_model_len
        if self.context_capped_by_cache:
            if config.max_model_len is not None:
                raise ConfigError(
                    f"max_model_len {config.max_model_len} does not fit in the KV cache "
                    f"({capacity} tokens per worker): raise --kv-cache-memory or lower it"
                )
            self.max_model_len = capacity
        eos = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.executor = self._make_executor(device)
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_batched_tokens,
                config.max_num_seqs,
                self.max_model_len,
                config.num_workers,
                TWO_BATCH_MIN_SEQS_PER_WORKER * config.num_workers
                if config.two_batch_overlap
                else 0,
            ),
            [
                BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
                for _ in range(config.num_workers)
            ],
        )
        self.trackers: dict[str, _Tracker] = {}
        self.layers_rebalanced = 0  # MoE layers whose experts the workers re-placed, in all
        self.reset_stats()
        self._ids = itertools.count()
        self._pending: list[tuple[str, int]] = []  # (request id, token) sampled last step
        # Async scheduling: the next step, planned and submitted while the current one runs.
        self.async_scheduling = config.async_scheduling and self.executor.runs_ahead
        self._ahead: SchedulerOutput | None = None
        self._undelivered: list[StepDelta] = []  # made by a step that then failed
        if config.resolve_warmup(device):
            try:
                warm_up(self)
            except BaseException:
                self.shutdown()
                raise

    def _make_executor(self, device: torch.device):
        c = self.config
        if c.num_workers == 1 and not c.resolve_worker_processes(device):
            from titanserve.core.executor import InProcessExecutor

            return InProcessExecutor(
                c, self.model_path, self.model_config, self.num_blocks, self.max_model_len
            )
        from titanserve.core.multiproc_executor import MultiProcExecutor

        return MultiProcExecutor(
            c, self.model_path, self.model_config, self.num_blocks, self.max_model_len
        )

    # ------------------------------------------------------------------ requests
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest("this model has no tokenizer.json: send token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def validate(self, token_ids: list[int], sampling: SamplingParams) -> None:
        if not token_ids:
            raise InvalidRequest("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad!r} is outside the vocabulary [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            if self.context_capped_by_cache:
                raise InvalidRequest(
                    f"prompt has {len(token_ids)} tokens; the KV cache holds "
                    f"{self.max_model_len} per worker: raise --kv-cache-memory or --num-kv-blocks"
                )
            raise InvalidRequest(
                f"prompt has {len(token_ids)} tokens; the context holds {self.max_model_len} "
                "(prompt + at least one generated token)"
            )
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequest("sampling_params must be a SamplingParams")

    def add_request(
        self,
        prompt: str | list[int],
        sampling: SamplingParams,
        request_id: str | None = None,
        stream: bool = True,
    ) -> str:
        """Queue a request; returns its id. With `stream` False only its final output is
        read, so its text is made once at the end (unless stop strings need it meanwhile)."""
        if self.executor is None:
            raise InvalidRequest("the engine is shut down: create a new LLM to generate again")
        token_ids = self.tokenize(prompt)
        self.validate(token_ids, sampling)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.trackers:
            raise InvalidRequest(f"request id {rid!r} is already in use")
        request = Request(rid, token_ids, sampling, self.eos_token_ids)
        detok = final = None
        if self.tokenizer is not None and (stream or sampling.stop):
            detok = IncrementalDetokenizer(self.tokenizer, token_ids)
        elif self.tokenizer is not None:
            final = FinalDetokenizer(self.tokenizer, token_ids)
        self.trackers[rid] = _Tracker(
            request,
            RequestOutput(rid, list(token_ids)),
            detok,
            final,
            stop_hold=max((len(s) for s in sampling.stop), default=1) - 1,
        )
        self.scheduler.add(request)
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
        tracker = self.trackers.pop(request_id, None)
        if tracker is None:
            return None
        self.scheduler.finish(tracker.request, "abort")
        self._release_cores()
        return self._finalize(tracker, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def _release_cores(self, idle_only: bool = True) -> None:
        """Once idle, the engine thread (it works on the workers' cores where no core is
        spare, see core.cpu_cores) may run anywhere again."""
        if self.executor is not None and not (idle_only and self.has_unfinished()):
            self.executor.release_cores()

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[StepDelta]:
        t0 = time.perf_counter()
        try:
            deltas = self._step()
        except BaseException:
            self._release_cores(idle_only=False)  # the caller may not step again
            raise
        self._release_cores()
        self.step_time_s += time.perf_counter() - t0
        self.num_steps += 1
        return deltas

    def reset_stats(self) -> None:
        """Zero the step counters: steps, their wall time, and of it the model's compute
        and the all-to-alls of the worker whose compute counts (the slowest), of which the
        time it waited there for the others; and the fastest worker's compute."""
        self.step_time_s = self.compute_time_s = self.fastest_compute_time_s = 0.0
        self.comm_time_s = self.comm_wait_time_s = 0.0
        self.num_steps = 0

    @property
    def overhead_fraction(self) -> float:
        """Share of step wall time outside model compute: scheduling, IPC, collectives,
        output processing (model compute = the slowest worker's, its all-to-alls excluded)."""
        return outside_compute(self.step_time_s, self.compute_time_s)[0]

    @property
    def workers_compute_apart(self) -> float:
        """How much less the fastest worker computed than the slowest (see `compute_apart`)."""
        return compute_apart(self.compute_time_s, self.fastest_compute_time_s)

    def overhead_parts(self) -> dict[str, float]:
        """`overhead_fraction` in parts (see `outside_compute`), the all-to-alls being those
        of the slowest worker."""
        return outside_compute(
            self.step_time_s, self.compute_time_s, self.comm_time_s, self.comm_wait_time_s
        )[1]

    def _step(self) -> list[StepDelta]:
        """Schedule and submit step t (unless it went out ahead), with async scheduling plan
        and submit step t+1 too, then turn step t-1's tokens into deltas (detokenize, stop
        strings, finished outputs) while the workers compute, then take step t's results
        worker by worker as they arrive. Where no core is spare (`overlaps` False) each worker's
        tokens are processed as soon as its results come, while slower workers still compute.

        NOTE: so a request that a stop string (or, planned ahead, eos) ends at step t has
        already been scheduled in step t+1; that token is dropped (the scheduler takes none for
        a finished request) and its blocks are freed before any later schedule could hand them
        out. A worker runs its plans in order, so it has written into them by then.
        """
        out, self._ahead = self._ahead, None
        if out is None:
            out = self.scheduler.schedule()
            if out.scheduled:
                self.executor.submit(out.plans)
        if out.scheduled and self.async_scheduling:
            ahead = self.scheduler.schedule(ahead_of=out)
            if ahead.scheduled:
                self.executor.submit(ahead.plans)
                self._ahead = ahead
        deltas, self._undelivered = self._undelivered, []
        deltas += self._process_pending()
        if not out.scheduled:
            if not deltas and self.scheduler.waiting and not self.scheduler.running:
                # Nothing runs and the head request cannot be placed: it never will be.
                request = self.scheduler.waiting[0]
                tracker = self.trackers.pop(request.request_id)
                self.scheduler.finish(request, "abort")
                self._finalize(tracker, "abort")
                raise InvalidRequest(
                    f"request {request.request_id} ({request.num_tokens} tokens) "
                    "does not fit in the KV cache"
                )
            return deltas
        try:
            compute, comm, comm_wait, fastest = self._collect_step(out, deltas)
            self.compute_time_s += compute
            self.fastest_compute_time_s += fastest
            self.comm_time_s += comm
            self.comm_wait_time_s += comm_wait
        except BaseException:
            self._undelivered = deltas  # the next step returns them
            if self._ahead is not None:  # planned on results that are now lost: drop it
                self.executor.forget(self._ahead.step_id)
                self._ahead = None
            raise
        return deltas

    def _collect_step(
        self, out: SchedulerOutput, deltas: list[StepDelta]
    ) -> tuple[float, float, float, float]:
        """Take step `out`'s results worker by worker (appending deltas where no core is
        spare); returns the model compute time of the slowest worker (its all-to-alls
        excluded), that worker's time in all-to-alls and, of it, waiting for the others, and
        the fastest worker's compute time."""
        slowest, fastest = (0.0, 0.0, 0.0), math.inf
        for rank, result, logits in self.executor.collect():  # while the others compute
            compute = result.compute_time_s - result.comm_time_s
            if rank == 0:  # every worker re-places the same layers
                self.layers_rebalanced += result.layers_rebalanced
            if compute > slowest[0]:
                slowest = (compute, result.comm_time_s, result.comm_wait_s)
            fastest = min(fastest, compute)
            sampled = {s.request_id: s.token_id for s in result.seqs if s.token_id is not None}
            taken = [(r.request_id, t) for r, t in self.scheduler.update(out, sampled, rank)]
            taken_ids = {rid for rid, _ in taken}
            for seq in result.seqs:
                tracker = self.trackers.get(seq.request_id)
                if tracker is not None:
                    self._collect(tracker, seq, logits, seq.request_id in taken_ids)
            self._pending += taken
            if not self.executor.overlaps:  # nothing to hide them behind: deliver them now
                deltas += self._process_pending()
        return (*slowest, fastest if fastest < math.inf else 0.0)

    def _process_pending(self) -> list[StepDelta]:
        pending, self._pending = self._pending, []
        return [
            self._process_token(self.trackers[rid], token_id)
            for rid, token_id in pending
            if rid in self.trackers  # else aborted, or ended by a stop string meanwhile
        ]

    def _collect(
        self, tracker: _Tracker, seq, logits: torch.Tensor | None, token_taken: bool
    ) -> None:
        """Keep a result's logprobs and logits rows (those of its token only if the scheduler
        took the token: not for a request preempted while the step ran)."""
        out = tracker.output
        if token_taken and seq.logprob is not None:
            if out.logprobs is None:
                out.logprobs, out.top_logprobs = [], []
            out.logprobs.append(seq.logprob)  # in place: a copy per token is quadratic
            out.top_logprobs.append(list(seq.top_logprobs))
        if token_taken and seq.logits_row is not None:
            tracker.logits_rows.append(logits[seq.logits_row])
        if seq.prompt_logits_rows is not None:
            start, end = seq.prompt_logits_rows
            if out.prompt_logits is None:
                n = len(out.prompt_token_ids)
                out.prompt_logits = torch.empty(n, logits.shape[1], dtype=torch.float32)
            pos = seq.prompt_logits_start_pos
            rows = logits[start:end]
            keep = max(0, min(len(rows), len(out.prompt_token_ids) - pos))
            out.prompt_logits[pos : pos + keep] = rows[:keep]

    def _process_token(self, tracker: _Tracker, token_id: int) -> StepDelta:
        request, out = tracker.request, tracker.output
        out.token_ids.append(token_id)
        if out.time_to_first_token_s is None and request.first_token_time is not None:
            out.time_to_first_token_s = request.first_token_time - request.arrival_time
        reason = request.finish_reason
        if tracker.detokenizer is not None:
            tracker.detokenizer.push(token_id)
            text = tracker.detokenizer.text
            # NOTE: a stop string completed by the last token max_tokens allows still cuts
            # the text and wins over "length" (as in vLLM); eos and stop ids end it first.
            if reason in (None, "length") and request.sampling.stop:
                stop_at = _find_stop(text, request.sampling.stop, out.text)
                if stop_at is not None:
                    text = text[:stop_at]
                    tracker.detokenizer.text = text
                    self.scheduler.finish(request, "stop")  # no-op if finished by length
                    reason = "stop"
            out.text = text
        finished = reason is not None
        if finished:
            del self.trackers[request.request_id]
            self._finalize(tracker, reason)
        visible = (
            len(out.text)
            if finished
            else max(tracker.emitted_chars, len(out.text) - tracker.stop_hold)
        )
        new_text = out.text[tracker.emitted_chars : visible]
        tracker.emitted_chars = visible
        return StepDelta(request.request_id, [token_id], new_text, finished, reason)

    def _finalize(self, tracker: _Tracker, reason: str) -> RequestOutput:
        out = tracker.output
        out.finished, out.finish_reason = True, reason
        if tracker.final_text is not None:
            out.text = tracker.final_text.text(out.token_ids)
        out.num_preemptions = tracker.request.num_preemptions
        if tracker.logits_rows:
            out.logits = torch.stack(tracker.logits_rows)
        return out

    def get_output(self, request_id: str) -> RequestOutput | None:
        tracker = self.trackers.get(request_id)
        return tracker.output if tracker else None

    def expert_loads(self, reset: bool = False) -> dict[int, list[int]]:
        """Pairs routed to each expert so far, by MoE layer (moe.expert_loads); counted only
        with record_expert_loads (or expert_rebalance_steps, which halves them at each
        re-placement). `reset`: count from zero again (the warm-up's requests are not
        traffic)."""
        if not self.config.counts_expert_loads:
            raise ConfigError("expert loads are counted only with record_expert_loads set")
        return self.executor.expert_loads(reset)

    def shutdown(self) -> None:
        if self.executor is None:
            return
        try:
            path = self.config.record_expert_loads
            if path is not None:  # a MoE model (check_writable)
                try:
                    loads = self.expert_loads()
                    write_expert_loads(path, loads, self.model_config.num_experts)
                except (OSError, WorkerLost) as e:  # say so, but shut down all the same
                    logger.warning("expert loads not written to %s: %s", path, e)
        finally:
            self.executor.shutdown()
            self.executor = None


def _find_stop(text: str, stops: list[str], previous_text: str) -> int | None:
    """Index where the earliest stop string starts, searching only where it can be new."""
    start = max(0, len(previous_text) - max(len(s) for s in stops))
    hits = [i for s in stops if (i := text.find(s, start)) != -1]
    return min(hits) if hits else None
