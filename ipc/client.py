"""Client library of the scheduler's ZeroMQ protocol: `Client` (blocking) and `AsyncClient`.

One DEALER socket per client. Each message is one msgpack frame (`ipc/messages.py`): the
client sends GenerateRequest / AbortRequest / HealthRequest / StatsRequest and reads back
OutputDelta (a step's several in an OutputBatch) / ErrorReply / HealthReply / StatsReply.
Replies are matched to their waiter by
request id (health and stats by reply type); replies nobody waits for any more (late deltas of
an aborted request) are dropped. Every wait is bounded by `timeout_s` and raises `Timeout`.

    with Client("ipc:///tmp/titanserve/sock") as client:
        print(client.generate("The capital of France is").text)
"""

from __future__ import annotations

import math
import operator
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import zmq

from titanserve.core.errors import ConfigError, InvalidRequest
from titanserve.core.sampling_params import SamplingParams
from titanserve.ipc.errors import Overloaded, Timeout, TitanserveError, WorkerLost
from titanserve.ipc.messages import (
    DECODE_ERRORS,
    MAX_CLIENT_MESSAGE_BYTES,
    AbortRequest,
    ChatMessage,
    ErrorReply,
    GenerateRequest,
    HealthReply,
    HealthRequest,
    OutputBatch,
    OutputDelta,
    StatsReply,
    StatsRequest,
    ToClient,
    ToScheduler,
)
from titanserve.ipc.sockets import recv_ready

if TYPE_CHECKING:  # at run time loaded on first use, see __getattr__ at the end
    from titanserve.ipc.async_client import AsyncClient

__all__ = ["AsyncClient", "Client", "Completion"]

_ENCODER = msgspec.msgpack.Encoder()
_REPLY_DECODER = msgspec.msgpack.Decoder(ToClient)
_REQUEST_DECODER = msgspec.msgpack.Decoder(ToScheduler)  # checks our own requests' limits


@dataclass(frozen=True)
class Completion:
    """A finished request: every generated token and the whole text."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort"
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    num_prompt_tokens: int

    @classmethod
    def from_deltas(cls, deltas: Iterable[OutputDelta]) -> Completion:
        """Join a request's deltas, in order, up to its final one (a non-streamed request
        has just that one)."""
        deltas = list(deltas)
        last = deltas[-1]
        logprobs = [d.logprobs for d in deltas if d.logprobs is not None]
        top = [d.top_logprobs for d in deltas if d.top_logprobs is not None]
        return cls(
            request_id=last.request_id,
            token_ids=[t for d in deltas for t in d.new_token_ids],
            text="".join(d.new_text for d in deltas),
            finish_reason=last.finish_reason,
            logprobs=[x for part in logprobs for x in part] if logprobs else None,
            top_logprobs=[x for part in top for x in part] if top else None,
            num_prompt_tokens=last.num_prompt_tokens,
        )


# ---------------------------------------------------------------- shared by both clients


def _connect(context_type: type, address: str, key: bytes | str | None, timeout_s: float):
    """(context, DEALER socket) connected to `address`, with the socket's limits and CurveZMQ
    keys (an ephemeral client pair when `key`, the server's public key, is given)."""
    if key is not None:
        key = (key.encode() if isinstance(key, str) else key).strip()  # as read from a key file
        if len(key) != 40:
            raise ConfigError(
                f"server_public_key must be the 40-character z85 key from `titanserve keygen`, "
                f"got {len(key)} characters"
            )
    ctx = context_type()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_CLIENT_MESSAGE_BYTES)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))  # a send raises zmq.Again past it
        if key is not None:
            sock.curve_serverkey = key
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.connect(address)
    except zmq.ZMQError as e:
        ctx.destroy(linger=0)
        message = f"cannot connect to {address!r} ({e}): use ipc://PATH or tcp://HOST:PORT"
        raise ConfigError(message) from None
    return ctx, sock


def _generate_request(
    request_id: str | None,
    sampling: SamplingParams | None,
    stream: bool,
    prompt: str | Iterable[int] | None = None,
    messages: list[dict] | None = None,
    add_generation_prompt: bool = True,
) -> GenerateRequest:
    """A GenerateRequest checked against the server's decode-time limits, so that a bad one
    fails here with InvalidRequest rather than as an unanswerable message there."""
    fields: dict = {}
    try:
        if messages is not None:
            fields["messages"] = msgspec.convert(messages, list[ChatMessage])
        elif isinstance(prompt, str):
            fields["prompt"] = prompt
        else:
            fields["prompt_token_ids"] = [operator.index(t) for t in prompt]  # numpy ints too
        request = GenerateRequest(
            request_id=request_id or uuid.uuid4().hex,
            sampling=sampling or SamplingParams(),
            stream=stream,
            add_generation_prompt=add_generation_prompt,
            **fields,
        )
        _REQUEST_DECODER.decode(_ENCODER.encode(request))
    except (msgspec.ValidationError, TypeError, ValueError) as e:
        if isinstance(e, InvalidRequest):
            raise
        raise InvalidRequest(f"bad request: {e}") from None
    return request


def _error(reply: ErrorReply) -> TitanserveError:
    """The typed exception that an ErrorReply stands for."""
    if reply.kind == "invalid_request":
        return InvalidRequest(reply.message)
    if reply.kind == "overloaded":
        return Overloaded(reply.message)
    if reply.kind == "worker_lost":
        return WorkerLost(None, reply.message)
    if reply.kind == "timeout":
        return Timeout(reply.message)
    return TitanserveError(f"server error: {reply.message}")


def _is_final(item) -> bool:
    """The last reply a request gets: its finished delta, an error, or a client-side failure."""
    return not isinstance(item, OutputDelta) or item.finished


def _route(data: bytes, requests: dict, asks: dict) -> None:
    """Hand one reply frame to the box (`.put(item)`) waiting for it, by request id or, for
    health and stats, by reply type. Replies nobody waits for are dropped."""
    try:
        msg = _REPLY_DECODER.decode(data)
    except (*DECODE_ERRORS, msgspec.ValidationError) as e:
        _fail_all(TitanserveError(f"unreadable reply from the server: {e}"), requests, asks)
        return
    if isinstance(msg, OutputBatch):
        for delta in msg.deltas:
            if (box := requests.get(delta.request_id)) is not None:
                box.put(delta)
    elif isinstance(msg, (HealthReply, StatsReply)):
        if (box := asks.pop(type(msg), None)) is not None:
            box.put(msg)
    elif msg.request_id is not None:
        if (box := requests.get(msg.request_id)) is not None:
            box.put(msg)
    elif asks:
        # NOTE: an ErrorReply without id answers a message the server could not read or handle.
        # Our requests are checked before sending, so it is most likely a health/stats failure.
        for box in asks.values():
            box.put(msg)
        asks.clear()
    else:
        _fail_all(_error(msg), requests, asks)


def _fail_all(error: Exception, requests: dict, asks: dict) -> None:
    for box in [*requests.values(), *asks.values()]:
        box.put(error)
    asks.clear()


def _reply(item, expected: type):
    """`item` if it is an `expected` reply, else the error it stands for, raised."""
    if isinstance(item, Exception):
        raise item
    if isinstance(item, ErrorReply):
        raise _error(item)
    assert isinstance(item, expected), item
    return item


def _abort_result(final) -> OutputDelta | None:
    if isinstance(final, ErrorReply) and final.kind == "invalid_request":
        return None  # the server does not know the id: the request already finished
    return _reply(final, OutputDelta)


def _timeout(address: str, timeout_s: float) -> Timeout:
    return Timeout(
        f"no reply from {address} within {timeout_s} s: is the server up, and given its "
        f"server_public_key if it uses CurveZMQ?"
    )


# ---------------------------------------------------------------- blocking client


class _Box:
    """Replies for one waiter, in arrival order; `final` is set once its last one arrived."""

    def __init__(self) -> None:
        self.items: deque = deque()
        self.final = None

    def put(self, item) -> None:
        self.items.append(item)
        if self.final is None and _is_final(item):
            self.final = item


class Client:
    """Blocking client of a titanserve server at `address` (`ipc://PATH` or `tcp://HOST:PORT`).

    `server_public_key` (z85, see `titanserve keygen`) is required by a CurveZMQ server.
    `timeout_s` bounds every wait for a reply: a whole non-streamed generation, each delta of
    a stream. Failures raise InvalidRequest, Overloaded, WorkerLost, Timeout, or
    TitanserveError (a server fault). Not thread-safe: use one client per thread, or
    `AsyncClient`.
    """

    def __init__(
        self, address: str, server_public_key: bytes | None = None, timeout_s: float = 60.0
    ) -> None:
        self.address, self.timeout_s = address, timeout_s
        self._ctx, self._sock = _connect(zmq.Context, address, server_public_key, timeout_s)
        self._requests: dict[str, _Box] = {}
        self._asks: dict[type, _Box] = {}

    def generate(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> Completion:
        """Generate from a text or token-id prompt and wait for the whole completion."""
        request = _generate_request(request_id, sampling, False, prompt=prompt)
        return Completion.from_deltas(self._run(request))

    def chat(
        self,
        messages: list[dict],
        sampling: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        request_id: str | None = None,
    ) -> Completion:
        """Generate the next turn of a chat (`{"role", "content"}` dicts; the server applies
        the model's chat template)."""
        request = _generate_request(
            request_id, sampling, False, messages=messages,
            add_generation_prompt=add_generation_prompt,
        )
        return Completion.from_deltas(self._run(request))

    def stream(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> Iterator[OutputDelta]:
        """Yield the request's deltas as tokens come; the last has `finished` set. The request
        is sent on the first `next()`; closing the iterator before the end aborts it."""
        return self._run(_generate_request(request_id, sampling, True, prompt=prompt))

    def chat_stream(
        self,
        messages: list[dict],
        sampling: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        request_id: str | None = None,
    ) -> Iterator[OutputDelta]:
        """`chat`, streamed like `stream`."""
        request = _generate_request(
            request_id, sampling, True, messages=messages,
            add_generation_prompt=add_generation_prompt,
        )
        return self._run(request)

    def abort(self, request_id: str) -> OutputDelta | None:
        """Stop a request; returns its final delta (reason "abort", or its own reason if it had
        just finished), or None if the server does not know the id. An open stream of the
        request still yields every delta up to that final one."""
        box, owned = self._requests.get(request_id), False
        if box is None:  # no stream of ours is waiting on it: wait here
            box, owned = self._requests.setdefault(request_id, _Box()), True
        try:
            self._send(AbortRequest(request_id=request_id))
            deadline = time.monotonic() + self.timeout_s
            while box.final is None:
                self._pump(deadline)
        finally:
            if owned:
                del self._requests[request_id]
        return _abort_result(box.final)

    def health(self) -> HealthReply:
        """Whether the server and its workers are up."""
        return self._ask(HealthRequest(), HealthReply)

    def stats(self) -> StatsReply:
        """The server's counters."""
        return self._ask(StatsRequest(), StatsReply)

    def close(self) -> None:
        """Close the socket; unsent requests are dropped (LINGER 0)."""
        self._ctx.destroy(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _run(self, request: GenerateRequest) -> Iterator[OutputDelta]:
        request_id = request.request_id
        if request_id in self._requests:
            raise InvalidRequest(f"request id {request_id!r} is in flight: use another one")
        box = self._requests[request_id] = _Box()
        done = False  # the server holds nothing more for this request
        try:
            self._send(request)
            while not done:
                deadline = time.monotonic() + self.timeout_s
                while not box.items:
                    self._pump(deadline)
                item = box.items.popleft()
                done = isinstance(item, ErrorReply)  # the server dropped the request
                delta = _reply(item, OutputDelta)
                done = delta.finished
                yield delta
        except GeneratorExit:  # closed early: abort, and read up to the final delta
            if not done:
                self._send_nowait(AbortRequest(request_id=request_id))
                self._drain(box)
            raise
        except BaseException:  # timeout, unreadable reply, Ctrl-C: stop the server's work
            if not done:
                self._send_nowait(AbortRequest(request_id=request_id))
            raise
        finally:
            del self._requests[request_id]

    def _ask(self, request, reply_type: type):
        box = self._asks[reply_type] = _Box()
        try:
            self._send(request)
            deadline = time.monotonic() + self.timeout_s
            while box.final is None:
                self._pump(deadline)
        finally:
            self._asks.pop(reply_type, None)
        return _reply(box.final, reply_type)

    def _drain(self, box: _Box) -> None:
        deadline = time.monotonic() + self.timeout_s
        try:
            while box.final is None:
                self._pump(deadline)
        except TitanserveError:
            pass  # the server did not confirm the abort: its late replies will be dropped

    def _send(self, message) -> None:
        if self._sock.closed:
            raise TitanserveError("the client is closed")
        try:
            self._sock.send(_ENCODER.encode(message))
        except zmq.Again:  # SNDTIMEO: the server has not taken messages for timeout_s
            raise _timeout(self.address, self.timeout_s) from None

    def _send_nowait(self, message) -> None:
        try:
            self._sock.send(_ENCODER.encode(message), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # best effort (the server is unreachable or the client closed)

    def _pump(self, deadline: float) -> None:
        """Wait until `deadline` for one reply and route it."""
        if self._sock.closed:
            raise TitanserveError("the client is closed")
        wait_ms = math.ceil((deadline - time.monotonic()) * 1000)
        frames = recv_ready(self._sock, wait_ms) if wait_ms > 0 else None
        if frames is None:
            if time.monotonic() >= deadline:
                raise _timeout(self.address, self.timeout_s)
            return  # readable with nothing to read: the caller pumps again
        for data in frames:
            _route(data, self._requests, self._asks)


def __getattr__(name: str):
    # AsyncClient lives in async_client.py, which imports the helpers above: load it on first use
    if name == "AsyncClient":
        from titanserve.ipc.async_client import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
