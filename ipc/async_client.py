"""AsyncClient: the scheduler protocol on asyncio (`zmq.asyncio`), many requests on one socket.

One reader task routes every reply to its waiter (`client._route`): a request's queue of
deltas, or the box of the outstanding health or stats request. The protocol helpers and the
blocking `Client` live in `titanserve.ipc.client`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from titanserve.core.errors import InvalidRequest
from titanserve.core.sampling_params import SamplingParams
from titanserve.ipc.client import (
    _ENCODER,
    Completion,
    _abort_result,
    _connect,
    _fail_all,
    _generate_request,
    _is_final,
    _reply,
    _route,
    _timeout,
)
from titanserve.ipc.errors import TitanserveError
from titanserve.ipc.messages import (
    AbortRequest,
    ErrorReply,
    GenerateRequest,
    HealthReply,
    HealthRequest,
    OutputDelta,
    StatsReply,
    StatsRequest,
)


class _AsyncBox:
    """Replies for one waiter: `items` in arrival order, `final` resolved with its last one."""

    def __init__(self) -> None:
        self.items: asyncio.Queue = asyncio.Queue()
        self.final: asyncio.Future = asyncio.get_running_loop().create_future()

    def put(self, item) -> None:
        self.items.put_nowait(item)
        if _is_final(item) and not self.final.done():
            self.final.set_result(item)


class AsyncClient:
    """asyncio client of a titanserve server; any number of requests may run concurrently.

    Same arguments and methods as `Client`, as coroutines; `stream` and `chat_stream` return
    async iterators (close them with `contextlib.aclosing` to abort at once). Use as
    `async with AsyncClient(address) as client:` or call `await client.close()`.
    """

    def __init__(
        self, address: str, server_public_key: bytes | None = None, timeout_s: float = 60.0
    ) -> None:
        self.address, self.timeout_s = address, timeout_s
        self._ctx, self._sock = _connect(
            zmq.asyncio.Context, address, server_public_key, timeout_s
        )
        self._requests: dict[str, _AsyncBox] = {}
        self._asks: dict[type, _AsyncBox] = {}
        self._reader: asyncio.Task | None = None  # started with the first request
        self._closed = False

    async def generate(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> Completion:
        """Generate from a text or token-id prompt and wait for the whole completion."""
        request = _generate_request(request_id, sampling, False, prompt=prompt)
        return Completion.from_deltas([delta async for delta in self._run(request)])

    async def chat(
        self,
        messages: list[dict],
        sampling: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        request_id: str | None = None,
    ) -> Completion:
        """Generate the next turn of a chat (`{"role", "content"}` dicts)."""
        request = _generate_request(
            request_id, sampling, False, messages=messages,
            add_generation_prompt=add_generation_prompt,
        )
        return Completion.from_deltas([delta async for delta in self._run(request)])

    def stream(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[OutputDelta]:
        """Yield the request's deltas as tokens come; the last has `finished` set. Closing the
        iterator before the end aborts the request."""
        return self._run(_generate_request(request_id, sampling, True, prompt=prompt))

    def chat_stream(
        self,
        messages: list[dict],
        sampling: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        request_id: str | None = None,
    ) -> AsyncIterator[OutputDelta]:
        """`chat`, streamed like `stream`."""
        request = _generate_request(
            request_id, sampling, True, messages=messages,
            add_generation_prompt=add_generation_prompt,
        )
        return self._run(request)

    async def abort(self, request_id: str) -> OutputDelta | None:
        """Stop a request; returns its final delta (reason "abort", or its own reason if it had
        just finished), or None if the server does not know the id. A running `generate` of
        the request returns what it had; a stream yields up to that final delta."""
        box, owned = self._requests.get(request_id), False
        if box is None:  # nobody here waits on it: wait here
            box, owned = self._register(request_id), True
        try:
            await self._send(AbortRequest(request_id=request_id))
            final = await self._wait(asyncio.shield(box.final))
        finally:
            if owned:
                del self._requests[request_id]
        return _abort_result(final)

    async def health(self) -> HealthReply:
        """Whether the server and its workers are up."""
        return await self._ask(HealthRequest(), HealthReply)

    async def stats(self) -> StatsReply:
        """The server's counters."""
        return await self._ask(StatsRequest(), StatsReply)

    async def close(self) -> None:
        """Stop the reader, fail every pending wait with TitanserveError, close the socket."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader])
        _fail_all(TitanserveError("the client was closed"), self._requests, self._asks)
        self._ctx.destroy(linger=0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------------ internals
    async def _run(self, request: GenerateRequest) -> AsyncIterator[OutputDelta]:
        request_id = request.request_id
        if request_id in self._requests:
            raise InvalidRequest(f"request id {request_id!r} is in flight: use another one")
        box = self._register(request_id)
        done = False  # the server holds nothing more for this request
        try:
            await self._send(request)
            while not done:
                item = await self._wait(box.items.get())
                done = isinstance(item, ErrorReply)  # the server dropped the request
                delta = _reply(item, OutputDelta)
                done = delta.finished
                yield delta
        except GeneratorExit:  # closed early: abort, and wait for the final delta
            if not done:
                await self._send_nowait(AbortRequest(request_id=request_id))
                await self._drain(box)
            raise
        except BaseException:  # timeout, unreadable reply, cancelled: stop the server's work
            if not done:
                await self._send_nowait(AbortRequest(request_id=request_id))
            raise
        finally:
            del self._requests[request_id]

    async def _ask(self, request, reply_type: type):
        box = self._asks.get(reply_type)
        if box is None:  # NOTE: concurrent callers share one outstanding request and its reply
            box = self._asks[reply_type] = self._new_box()
            try:
                await self._send(request)
            except BaseException:
                self._asks.pop(reply_type, None)
                raise
        try:
            final = await self._wait(asyncio.shield(box.final))
        except TitanserveError:
            if self._asks.get(reply_type) is box:
                del self._asks[reply_type]
            raise
        return _reply(final, reply_type)

    async def _drain(self, box: _AsyncBox) -> None:
        try:
            await self._wait(asyncio.shield(box.final))
        except TitanserveError:
            pass  # the server did not confirm the abort: its late replies will be dropped

    def _register(self, request_id: str) -> _AsyncBox:
        self._requests[request_id] = box = self._new_box()
        return box

    def _new_box(self) -> _AsyncBox:
        if self._closed:
            raise TitanserveError("the client is closed")
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        return _AsyncBox()

    async def _read(self) -> None:
        try:
            while True:
                _route(await self._sock.recv(), self._requests, self._asks)
        except zmq.ZMQError as e:  # the socket is gone: nothing more will arrive
            self._closed = True
            _fail_all(TitanserveError(f"client socket failed: {e}"), self._requests, self._asks)

    async def _wait(self, awaitable):
        try:
            return await asyncio.wait_for(awaitable, self.timeout_s)
        except asyncio.TimeoutError:
            raise _timeout(self.address, self.timeout_s) from None

    async def _send(self, message) -> None:
        if self._closed:
            raise TitanserveError("the client is closed")
        try:
            await self._sock.send(_ENCODER.encode(message))
        except zmq.Again:  # SNDTIMEO: the server has not taken messages for timeout_s
            raise _timeout(self.address, self.timeout_s) from None

    async def _send_nowait(self, message) -> None:
        if self._closed:
            return
        try:
            await self._sock.send(_ENCODER.encode(message), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # best effort: the server is unreachable
