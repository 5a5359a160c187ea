"""Every message that crosses a process boundary, as tagged msgspec structs.

Tensors never ride inside a struct: they follow as separate zero-copy frames
(`titanserve.ipc.tensor_frames`). Nothing here is pickled.
"""

from __future__ import annotations

import msgspec

from titanserve.core.engine_config import EngineConfig
from titanserve.core.sampling_params import SamplingParams


class Struct(msgspec.Struct, tag=True, kw_only=True, omit_defaults=True):
    """Base of all wire messages: tagged by class name, keyword-only."""


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
    block_ids: list[int]  # the request's whole block table on this worker
    sample: bool  # this chunk reaches the end of the known tokens: sample the next one
    new: NewRequest | None = None


class StepPlan(Struct):
    """Plain data the scheduler hands a worker each step. Decodes come first."""

    step_id: int
    seqs: list[SeqPlan]
    finished_ids: list[str] = []  # requests whose worker-side state can be dropped


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


class WorkerError(Struct):
    """A worker could not do what it was asked; `fatal` means it is exiting."""

    rank: int
    message: str
    fatal: bool = False
    lost_rank: int | None = None  # set when the error is a lost peer


class Shutdown(Struct):
    pass


ToWorker = StepPlan | LoadModel | Shutdown
FromWorker = StepResult | WorkerReady | WorkerError | Hello | Heartbeat

HEARTBEAT_INTERVAL_S = 0.5

# NOTE: every decoder of bytes from a socket is typed and every socket that receives them sets
# zmq.MAXMSGSIZE: a plan or result larger than this is refused, never buffered.
MAX_CONTROL_MESSAGE_BYTES = 256 * 1024 * 1024
