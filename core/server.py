"""The scheduler process: one Engine behind a ZeroMQ ROUTER socket that clients talk to.

Loop: read every waiting client message (GenerateRequest, AbortRequest, HealthRequest,
StatsRequest), run one engine step if anything is in flight, route the step's deltas to the
clients that own the requests, repeat. Client request ids are namespaced by the client's
socket identity, so clients never collide and cannot abort each other's requests. Bad bytes,
bad requests and a full queue get an ErrorReply; nothing a client sends stops the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import msgspec
import zmq

from titanserve.core.engine import Engine
from titanserve.core.errors import InvalidRequest, WorkerLost
from titanserve.core.outputs import RequestOutput, StepDelta
from titanserve.ipc.messages import (
    DECODE_ERRORS,
    MAX_CLIENT_MESSAGE_BYTES,
    AbortRequest,
    ErrorReply,
    GenerateRequest,
    HealthReply,
    HealthRequest,
    OutputBatch,
    OutputDelta,
    StatsReply,
    StatsRequest,
    ToScheduler,
)
from titanserve.ipc.sockets import recv_ready

log = logging.getLogger("titanserve.server")

IDLE_POLL_MS = 100  # how long an idle loop waits for a client message
MAX_MESSAGES_PER_STEP = 256  # messages read between two steps, so that steps keep coming


@dataclass
class _Owner:
    client: bytes  # ZeroMQ identity of the client's socket
    request_id: str  # the id the client chose
    stream: bool
    output: RequestOutput  # the engine's, updated in place, final once finished
    num_sent_tokens: int = 0  # tokens already delivered in earlier deltas


class Server:
    """Serve `engine` on `address` (`ipc://PATH` or `tcp://HOST:PORT`).

    `curve_secret_key` (z85) makes the socket a CurveZMQ server: clients must know its public
    key. Binding anything but loopback or ipc:// without keys is refused (see launcher).
    """

    def __init__(
        self,
        engine: Engine,
        address: str,
        curve_keys: tuple[bytes, bytes] | None = None,  # (public, secret), z85
        max_waiting: int = 1024,
    ) -> None:
        self.engine, self.max_waiting = engine, max_waiting
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_CLIENT_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)  # per client: room for long streams
        if curve_keys is not None:
            self.sock.curve_server = True
            self.sock.curve_publickey, self.sock.curve_secretkey = curve_keys
        self.sock.bind(address)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.decoder = msgspec.msgpack.Decoder(ToScheduler)
        self.encoder = msgspec.msgpack.Encoder()
        self.owners: dict[str, _Owner] = {}  # engine request id -> its client
        self.lost: WorkerLost | None = None
        self.started = time.monotonic()
        self.num_requests = self.num_prompt_tokens = self.num_generated_tokens = 0

    # ------------------------------------------------------------------ loop
    def serve_forever(self, stop: threading.Event | None = None) -> None:
        """Run until `stop` is set (or forever); the caller shuts the engine down."""
        stop = stop or threading.Event()
        while not stop.is_set():
            busy = self.engine.has_unfinished() and self.lost is None
            self._read_messages(0 if busy else IDLE_POLL_MS)
            if self.engine.has_unfinished() and self.lost is None:
                self._step()

    def _read_messages(self, first_wait_ms: int) -> None:
        wait = first_wait_ms
        for _ in range(MAX_MESSAGES_PER_STEP):
            frames = recv_ready(self.sock, wait)
            if frames is None:
                return
            wait = 0
            if len(frames) != 2:
                if frames:
                    self._send(frames[0], ErrorReply(kind="invalid_request", message=(
                        f"expected one frame per message, got {len(frames) - 1}")))
                continue
            client, data = frames
            try:
                msg = self.decoder.decode(data)
            except (*DECODE_ERRORS, msgspec.ValidationError) as e:
                self._send(client, ErrorReply(kind="invalid_request", message=f"bad message: {e}"))
                continue
            try:
                self._handle(client, msg)
            except Exception as e:  # a bug must not take the server down with it
                log.exception("error handling %s", type(msg).__name__)
                rid = getattr(msg, "request_id", None)
                self._send(client, ErrorReply(kind="internal", message=str(e), request_id=rid))

    def _handle(self, client: bytes, msg) -> None:
        if isinstance(msg, GenerateRequest):
            self._generate(client, msg)
        elif isinstance(msg, AbortRequest):
            self._abort(client, msg.request_id)
        elif isinstance(msg, HealthRequest):
            workers = self.engine.config.num_workers
            alive = workers if self.lost is None else workers - (self.lost.rank is not None)
            self._send(client, HealthReply(
                ok=self.lost is None, num_workers=workers, workers_alive=alive,
                uptime_s=time.monotonic() - self.started))
        elif isinstance(msg, StatsRequest):
            self._send(client, self.stats())

    def _generate(self, client: bytes, req: GenerateRequest) -> None:
        rid = _engine_id(client, req.request_id)
        fail = lambda kind, message: self._send(  # noqa: E731
            client, ErrorReply(kind=kind, message=message, request_id=req.request_id))
        if self.lost is not None:
            return fail("worker_lost", str(self.lost))
        if len(self.engine.scheduler.waiting) >= self.max_waiting:
            return fail("overloaded", f"{self.max_waiting} requests already wait; retry later")
        if rid in self.owners:
            return fail("invalid_request", f"request id {req.request_id!r} is already in flight")
        try:
            prompt = self._prompt_ids(req)
            self.engine.add_request(prompt, req.sampling, request_id=rid, stream=req.stream)
        except InvalidRequest as e:
            return fail("invalid_request", str(e))
        output = self.engine.get_output(rid)
        self.owners[rid] = _Owner(client, req.request_id, req.stream, output)
        self.num_requests += 1
        self.num_prompt_tokens += len(prompt)

    def _prompt_ids(self, req: GenerateRequest) -> list[int]:
        if req.prompt_token_ids is not None:
            return list(req.prompt_token_ids)
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise InvalidRequest("this model has no tokenizer.json: send prompt_token_ids")
        if req.prompt is not None:
            return tokenizer.encode(req.prompt)
        turns = [{"role": m.role, "content": m.content} for m in req.messages]
        text = tokenizer.apply_chat_template(turns, req.add_generation_prompt)
        return tokenizer.encode(text, add_special_tokens=False)

    def _abort(self, client: bytes, request_id: str) -> None:
        rid = _engine_id(client, request_id)
        owner = self.owners.get(rid)
        if owner is None:
            self._send(client, ErrorReply(
                kind="invalid_request", message=f"no request {request_id!r} in flight",
                request_id=request_id))
            return
        self.engine.abort(rid)
        self._deliver(rid, StepDelta(rid, [], "", True, "abort"))

    def _step(self) -> None:
        try:
            deltas = self.engine.step()
        except WorkerLost as e:
            self.lost = e
            log.error("%s; failing %d requests in flight", e, len(self.owners))
            for rid, owner in list(self.owners.items()):
                self._send(owner.client, ErrorReply(
                    kind="worker_lost", message=str(e), request_id=owner.request_id))
                del self.owners[rid]
            return
        except InvalidRequest as e:  # the engine dropped a request that can never be placed
            deltas = []
            for rid in [rid for rid in self.owners if rid not in self.engine.trackers]:
                owner = self.owners.pop(rid)
                self._send(owner.client, ErrorReply(
                    kind="invalid_request", message=str(e), request_id=owner.request_id))
        except Exception as e:  # a bug: the engine's state is unknown, so tell everyone, stop
            for owner in self.owners.values():
                self._send(owner.client, ErrorReply(
                    kind="internal", message=f"server error: {e}", request_id=owner.request_id))
            self.owners.clear()
            raise
        batches: dict[bytes, list[OutputDelta]] = {}  # one message per client a step
        for delta in deltas:
            self._deliver(delta.request_id, delta, batches)
        for client, batch in batches.items():
            self._send(client, batch[0] if len(batch) == 1 else OutputBatch(deltas=batch))

    # ------------------------------------------------------------------ replies
    def _deliver(
        self, rid: str, delta: StepDelta, batches: dict[bytes, list[OutputDelta]] | None = None
    ) -> None:
        """Turn an engine delta into its client's OutputDelta: sent now, or added to the
        client's list in `batches`."""
        owner = self.owners.get(rid)
        if owner is None:
            return
        if delta.finished:
            del self.owners[rid]
        elif not owner.stream:
            return  # one final delta carries everything
        out, start = owner.output, owner.num_sent_tokens
        owner.num_sent_tokens = len(out.token_ids)
        self.num_generated_tokens += len(out.token_ids) - start
        reply = OutputDelta(
            request_id=owner.request_id,
            new_token_ids=out.token_ids[start:],
            new_text=delta.new_text if owner.stream else out.text,
            finished=delta.finished,
            finish_reason=delta.finish_reason,
            logprobs=out.logprobs[start:] if out.logprobs is not None else None,
            top_logprobs=out.top_logprobs[start:] if out.top_logprobs is not None else None,
            num_prompt_tokens=len(out.prompt_token_ids),
            num_generated_tokens=len(out.token_ids),
        )
        if batches is None:
            self._send(owner.client, reply)
        else:
            batches.setdefault(owner.client, []).append(reply)

    def _send(self, client: bytes, msg) -> None:
        # ROUTER never blocks: a gone client's (or one SNDHWM behind) replies are dropped
        self.sock.send_multipart([client, self.encoder.encode(msg)])

    def stats(self) -> StatsReply:
        engine, scheduler = self.engine, self.engine.scheduler
        placed = scheduler.num_placed_tokens
        return StatsReply(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_requests_total=self.num_requests,
            num_prompt_tokens_total=self.num_prompt_tokens,
            num_generated_tokens_total=self.num_generated_tokens,
            kv_cache_usage=[bm.usage for bm in scheduler.block_managers],
            prefix_cache_hit_rate=scheduler.num_cached_tokens / placed if placed else 0.0,
            num_steps_total=engine.num_steps,
            step_time_mean_s=engine.step_time_s / engine.num_steps if engine.num_steps else 0.0,
            overhead_fraction=engine.overhead_fraction,
            overhead_parts=engine.overhead_parts(),
            workers_compute_apart=engine.workers_compute_apart,
        )

    def close(self) -> None:
        """Close the socket (after serve_forever has returned) and its context."""
        self.sock.close(linger=0)
        self.ctx.destroy(linger=0)


def _engine_id(client: bytes, request_id: str) -> str:
    return f"{client.hex()}/{request_id}"
