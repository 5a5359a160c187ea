"""Every message that crosses a process boundary, as tagged msgspec structs.

Tensors never ride inside a struct: they follow as separate zero-copy frames
(`titanserve.ipc.tensor_frames`). Nothing here is pickled.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from titanserve.core.engine_config import EngineConfig
from titanserve.core.errors import InvalidRequest
from titanserve.core.sampling_params import SamplingParams


class Struct(msgspec.Struct, tag=True, kw_only=True, omit_defaults=True):
    """Base of all wire messages: tagged by class name, keyword-only."""


# ---------------------------------------------------------------- client <-> scheduler

# NOTE: msgspec checks these bounds when it decodes, not when a struct is built: they guard the
# scheduler against untrusted client bytes. Meaning (empty prompt, ids past the vocabulary,
# context length) is the engine's to judge, with its own InvalidRequest messages.
MAX_CLIENT_MESSAGE_BYTES = 64 * 1024 * 1024  # the client socket's zmq.MAXMSGSIZE
MAX_REQUEST_ID_CHARS = 256
MAX_PROMPT_CHARS = 4 * 1024 * 1024  # also bounds each chat message's content
MAX_PROMPT_TOKENS = 1024 * 1024
MAX_CHAT_MESSAGES = 1024

# NOTE: invalid UTF-8 inside a string raises UnicodeDecodeError, not msgspec.DecodeError
# (msgspec issue #714): a loop that decodes untrusted bytes catches DECODE_ERRORS.
DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError)

RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_REQUEST_ID_CHARS)]
PromptText = Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)]
TokenId = Annotated[int, msgspec.Meta(ge=0)]
PromptTokenIds = Annotated[list[TokenId], msgspec.Meta(max_length=MAX_PROMPT_TOKENS)]
ErrorKind = Literal["invalid_request", "overloaded", "worker_lost", "timeout", "internal"]


class ChatMessage(Struct):
    """One chat turn; the model's chat template renders the turns into a prompt."""

    role: Literal["system", "user", "assistant", "tool"]
    content: PromptText


class GenerateRequest(Struct):
    """Generate from exactly one of `prompt`, `prompt_token_ids` or chat `messages`.

    With `stream` the scheduler sends an OutputDelta per step (those of one step for one
    client's requests in an OutputBatch), else one final OutputDelta.
    `add_generation_prompt` (chat only) ends the prompt with the assistant turn's header.
    """

    request_id: RequestId
    sampling: SamplingParams
    prompt: PromptText | None = None
    prompt_token_ids: PromptTokenIds | None = None
    messages: Annotated[list[ChatMessage], msgspec.Meta(max_length=MAX_CHAT_MESSAGES)] | None = None
    stream: bool = False
    add_generation_prompt: bool = True

    def __post_init__(self) -> None:
        given = [self.prompt, self.prompt_token_ids, self.messages]
        if sum(x is not None for x in given) != 1:
            raise InvalidRequest("give exactly one of prompt, prompt_token_ids or messages")


class AbortRequest(Struct):
    """Stop a request; the scheduler answers with its final OutputDelta (reason "abort")."""

    request_id: RequestId


class HealthRequest(Struct):
    """Ask whether the scheduler and its workers are up (answered by HealthReply)."""


class StatsRequest(Struct):
    """Ask for the scheduler's counters (answered by StatsReply)."""


class OutputDelta(Struct):
    """A request's new tokens since its last delta; the one with `finished` set is its last.

    `logprobs` (and `top_logprobs`, when SamplingParams.logprobs asked) hold one entry per new
    token. The token counts are the request's totals so far.
    """

    request_id: str
    new_token_ids: list[int] = []
    new_text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0


class OutputBatch(Struct):
    """The OutputDeltas one engine step has for one client's requests, in one message: a
    message for each cost the scheduler ~6 µs, 1.5 ms a step at 256 streamed requests."""

    deltas: list[OutputDelta]


class ErrorReply(Struct):
    """A request (or a message that could not be read: no `request_id`) failed.

    `kind` picks the client's typed error: InvalidRequest, Overloaded, WorkerLost, Timeout, or
    a server fault ("internal").
    """

    kind: ErrorKind
    message: str
    request_id: str | None = None


class HealthReply(Struct):
    """Answer to HealthRequest."""

    ok: bool
    num_workers: int
    workers_alive: int
    uptime_s: float


class StatsReply(Struct):
    """Answer to StatsRequest: plain counters since the scheduler started."""

    num_running: int
    num_waiting: int
    num_requests_total: int
    num_prompt_tokens_total: int
    num_generated_tokens_total: int
    kv_cache_usage: list[float]  # fraction of KV blocks in use, per worker
    prefix_cache_hit_rate: float  # cached prompt tokens / prompt tokens
    num_steps_total: int
    step_time_mean_s: float
    overhead_fraction: float  # share of step wall time outside model compute
    # that share in parts (all-to-all wait, all-to-all work, engine + IPC): Engine.overhead_parts
    overhead_parts: dict[str, float] = {}
    # how much less the fastest worker computed than the slowest: Engine.workers_compute_apart
    workers_compute_apart: float = 0.0


ToScheduler = GenerateRequest | AbortRequest | HealthRequest | StatsRequest
ToClient = OutputDelta | OutputBatch | ErrorReply | HealthReply | StatsReply


# ---------------------------------------------------------------- scheduler -> worker


class NewRequest(Struct):
    """Sent with a request's first chunk (and again after a preemption recomputes it)."""

    sampling: SamplingParams
    num_prompt_tokens: int
    # All tokens known so far (prompt + generated); only sent when penalties need them.
    history_token_ids: list[int] = []


class SeqPlan(Struct):
    """One request's share of a step: compute `token_ids` at positions start_pos.."""

    request_id: str
    token_ids: list[int]
    start_pos: int  # == num_computed_tokens before this step
    # The request's block table on this worker from index `block_start` on: the blocks it
    # gained since the plan before (all of them with `new`). The worker keeps the table.
    block_ids: list[int]
    sample: bool  # this chunk reaches the end of the known tokens: sample the next one
    new: NewRequest | None = None
    # Async scheduling: the one token to compute is the one this worker sampled for the
    # request in the step before, which the scheduler has not seen yet (token_ids is empty).
    follows_sample: bool = False
    block_start: int = 0


class StepPlan(Struct):
    """Plain data the scheduler hands a worker each step. Decodes come first."""

    step_id: int
    seqs: list[SeqPlan]
    finished_ids: list[str] = []  # requests whose worker-side state can be dropped
    # Run the step as two micro-batches, each one's all-to-alls in flight while the other
    # computes (core.model.stages); the same on every worker's plan of a step.
    two_batches: bool = False


class SeqResult(Struct):
    request_id: str
    token_id: int | None = None  # None when the step did not sample this request
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = []
    # Row indices into the result's logits frames (return_logits / prompt logits).
    logits_row: int | None = None
    prompt_logits_rows: tuple[int, int] | None = None  # [start, end) rows, for positions
    prompt_logits_start_pos: int = 0


class StepResult(Struct):
    step_id: int
    seqs: list[SeqResult]
    compute_time_s: float = 0.0  # the worker's whole execute, collectives included
    comm_time_s: float = 0.0  # of which inside MoE all-to-alls
    comm_wait_s: float = 0.0  # of which waiting there for slower workers' messages
    layers_rebalanced: int = 0  # MoE layers whose experts were re-placed before this step


# ---------------------------------------------------------------- worker lifecycle


class Hello(Struct):
    """A worker's first message: it is up and connected; the scheduler answers LoadModel."""

    rank: int
    pid: int


class LoadModel(Struct):
    """What a worker loads and how it joins the mesh (answer to Hello)."""

    config: EngineConfig  # num_kv_blocks and max_model_len already resolved
    model_path: str
    comm_port: int  # torch.distributed rendezvous port (the ZeroMQ mesh uses ipc:// files)
    # layer index -> (E,) recorded loads to place experts by (moe.expert_loads), read by the
    # engine from config.expert_loads: no worker host needs the file
    expert_loads: dict[int, list[int]] | None = None


class Heartbeat(Struct):
    """Sent every HEARTBEAT_INTERVAL_S from a worker thread, busy or not: a worker that stops
    sending (hung, stopped, or on a dead host) is lost even if its process still exists."""

    rank: int



class WorkerReady(Struct):
    """A worker loaded its shard and joined the mesh."""

    rank: int
    local_experts: list[int]  # global ids of the experts this worker holds
    expert_param_count: int  # elements in its expert weights (all MoE layers)
    num_kv_blocks: int
    # MoE layers placed by recorded loads (moe.expert_loads): layer -> the experts it holds
    layer_experts: dict[int, list[int]] = {}


class WorkerError(Struct):
    """A worker could not do what it was asked; `fatal` means it is exiting."""

    rank: int
    message: str
    fatal: bool = False
    lost_rank: int | None = None  # set when the error is a lost peer


class Shutdown(Struct):
    pass


class ExpertLoadsRequest(Struct):
    """Ask a worker for the expert loads it has counted; `reset`: then start from zero."""

    reset: bool = False


class ExpertLoadsReply(Struct):
    """Pairs this worker's tokens routed to each expert, by MoE layer (moe.expert_loads)."""

    rank: int
    loads: dict[int, list[int]]


ToWorker = StepPlan | LoadModel | Shutdown | ExpertLoadsRequest
FromWorker = StepResult | WorkerReady | WorkerError | Hello | Heartbeat | ExpertLoadsReply

HEARTBEAT_INTERVAL_S = 0.5

# NOTE: every decoder of bytes from a socket is typed and every socket that receives them sets
# zmq.MAXMSGSIZE: a plan or result larger than this is refused, never buffered.
MAX_CONTROL_MESSAGE_BYTES = 256 * 1024 * 1024
