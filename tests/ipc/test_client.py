"""Client and AsyncClient against a scripted fake server: a real ROUTER socket in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq

from titanserve.core.errors import ConfigError, InvalidRequest
from titanserve.core.sampling_params import SamplingParams
from titanserve.ipc.client import AsyncClient, Client, Completion
from titanserve.ipc.errors import Overloaded, Timeout, TitanserveError, WorkerLost
from titanserve.ipc.messages import (
    AbortRequest,
    ChatMessage,
    ErrorReply,
    GenerateRequest,
    HealthReply,
    HealthRequest,
    OutputDelta,
    StatsReply,
    StatsRequest,
    ToScheduler,
)

ENCODER = msgspec.msgpack.Encoder()
DECODER = msgspec.msgpack.Decoder(ToScheduler)
HEALTH = HealthReply(ok=True, num_workers=2, workers_alive=2, uptime_s=1.5)
STATS = StatsReply(
    num_running=1, num_waiting=0, num_requests_total=7, num_prompt_tokens_total=70,
    num_generated_tokens_total=35, kv_cache_usage=[0.25, 0.5], prefix_cache_hit_rate=0.125,
    num_steps_total=40, step_time_mean_s=0.01, overhead_fraction=0.0625,
)


class FakeServer:
    """A ROUTER socket answering by script, on its own thread.

    Generated tokens: a token-id prompt's ids, a text prompt's character codes, or
    [len(messages)] for chat; the text of token t is "<t>". Streams send one delta per token.
    Text prompts "silence" (no answer) and "forever" (one delta, then nothing) stay open until
    aborted; "error:KIND" gets ErrorReply(KIND); "garbage" gets bytes that are no message.
    With `hold` = n, the first n non-streamed requests are answered together, in reverse.
    """

    def __init__(self, address: str, curve_keys=None, hold: int = 0, health_error=False):
        self.received: list = []  # every message, decoded
        self.finished_ids: list[str] = []  # request ids, in the order their final delta went
        self._hold, self._held, self._health_error = hold, [], health_error
        self._open: set[str] = set()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        if curve_keys is not None:
            self._sock.curve_server = True
            self._sock.curve_publickey, self._sock.curve_secretkey = curve_keys
        self._sock.bind(address)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._ctx.destroy(linger=0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(20):
                client, data = self._sock.recv_multipart()
                msg = DECODER.decode(data)
                self.received.append(msg)
                self._answer(client, msg)

    def _send(self, client: bytes, reply) -> None:
        if isinstance(reply, OutputDelta) and reply.finished:
            self.finished_ids.append(reply.request_id)
        self._sock.send_multipart([client, ENCODER.encode(reply)])

    def _answer(self, client: bytes, msg) -> None:
        if isinstance(msg, HealthRequest):
            error = ErrorReply(kind="internal", message="no health")  # no request id
            self._send(client, error if self._health_error else HEALTH)
        elif isinstance(msg, StatsRequest):
            self._send(client, STATS)
        elif isinstance(msg, AbortRequest):
            rid = msg.request_id
            if rid in self._open:
                self._open.remove(rid)
                final = OutputDelta(request_id=rid, finished=True, finish_reason="abort")
                self._send(client, final)
            else:
                error = ErrorReply(kind="invalid_request", message="no such id", request_id=rid)
                self._send(client, error)
        elif msg.prompt in ("silence", "forever"):
            self._open.add(msg.request_id)
            if msg.prompt == "forever":
                self._send(client, OutputDelta(request_id=msg.request_id, new_token_ids=[0]))
        elif msg.prompt == "garbage":
            self._sock.send_multipart([client, b"\xc1"])  # a byte msgpack never uses
        elif msg.prompt is not None and msg.prompt.startswith("error:"):
            self._send(client, ErrorReply(kind=msg.prompt[6:], message="scripted failure",
                                          request_id=msg.request_id))
        elif self._hold and not msg.stream:
            self._held.append((client, msg))
            if len(self._held) == self._hold:
                for held in reversed(self._held):
                    self._generate(*held)
        else:
            self._generate(client, msg)

    def _generate(self, client: bytes, req: GenerateRequest) -> None:
        if req.prompt_token_ids is not None:
            prompt_tokens = tokens = req.prompt_token_ids
        elif req.messages is not None:
            prompt_tokens, tokens = [0] * len(req.messages), [len(req.messages)]
        else:
            prompt_tokens = tokens = [ord(c) for c in req.prompt]
        with_logprobs = req.sampling.logprobs is not None
        deltas = [
            OutputDelta(
                request_id=req.request_id,
                new_token_ids=[t],
                new_text=f"<{t}>",
                logprobs=[-0.5] if with_logprobs else None,
                top_logprobs=[[(t, -0.5)]] if with_logprobs else None,
                num_prompt_tokens=len(prompt_tokens),
                num_generated_tokens=i + 1,
            )
            for i, t in enumerate(tokens)
        ]
        deltas[-1].finished, deltas[-1].finish_reason = True, "length"
        if not req.stream:  # one final delta with everything
            deltas = [msgspec.structs.replace(
                deltas[-1],
                new_token_ids=list(tokens),
                new_text="".join(d.new_text for d in deltas),
                logprobs=[-0.5] * len(tokens) if with_logprobs else None,
                top_logprobs=[[(t, -0.5)] for t in tokens] if with_logprobs else None,
            )]
        for delta in deltas:
            self._send(client, delta)


@contextlib.contextmanager
def fake_server(tmp_path, **kwargs) -> Iterator[tuple[FakeServer, str]]:
    address = f"ipc://{tmp_path}/sock"
    server = FakeServer(address, **kwargs)
    try:
        yield server, address
    finally:
        server.close()


def wait_until(predicate, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


# ---------------------------------------------------------------- Client


def test_generate_text_prompt(tmp_path) -> None:
    with fake_server(tmp_path) as (server, address), Client(address, timeout_s=5) as client:
        completion = client.generate("hi", SamplingParams(max_tokens=4, temperature=0))
    request_id = completion.request_id
    assert len(request_id) == 32 and int(request_id, 16) >= 0  # uuid4 hex
    assert completion == Completion(
        request_id=request_id, token_ids=[104, 105], text="<104><105>", finish_reason="length",
        logprobs=None, top_logprobs=None, num_prompt_tokens=2,
    )
    assert server.received == [
        GenerateRequest(request_id=request_id, prompt="hi",
                        sampling=SamplingParams(max_tokens=4, temperature=0)),
    ]


def test_generate_token_ids_with_logprobs(tmp_path) -> None:
    sampling = SamplingParams(logprobs=1)
    with fake_server(tmp_path) as (server, address), Client(address, timeout_s=5) as client:
        completion = client.generate([5, 0, 7], sampling, request_id="r1")
    assert completion.request_id == "r1"
    assert completion.token_ids == [5, 0, 7]
    assert completion.text == "<5><0><7>"
    assert completion.logprobs == [-0.5] * 3
    assert completion.top_logprobs == [[(5, -0.5)], [(0, -0.5)], [(7, -0.5)]]
    assert server.received == [
        GenerateRequest(request_id="r1", prompt_token_ids=[5, 0, 7], sampling=sampling),
    ]


def test_chat_sends_messages(tmp_path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with fake_server(tmp_path) as (server, address), Client(address, timeout_s=5) as client:
        completion = client.chat(messages, add_generation_prompt=False)
    assert (completion.token_ids, completion.text, completion.num_prompt_tokens) == ([2], "<2>", 2)
    (request,) = server.received
    assert request.messages == [
        ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi"),
    ]
    assert request.add_generation_prompt is False and request.stream is False


def test_stream_yields_deltas_in_order(tmp_path) -> None:
    with fake_server(tmp_path) as (server, address), Client(address, timeout_s=5) as client:
        deltas = list(client.stream([3, 1, 4, 1, 5], SamplingParams(logprobs=0)))
    assert [d.new_token_ids for d in deltas] == [[3], [1], [4], [1], [5]]
    assert [d.finished for d in deltas] == [False] * 4 + [True]
    assert server.received[0].stream is True
    completion = Completion.from_deltas(deltas)
    assert completion.token_ids == [3, 1, 4, 1, 5] and completion.text == "<3><1><4><1><5>"
    assert completion.logprobs == [-0.5] * 5 and completion.finish_reason == "length"


def test_stream_closed_early_sends_abort(tmp_path) -> None:
    with fake_server(tmp_path) as (server, address), Client(address, timeout_s=5) as client:
        for delta in client.stream("forever", request_id="s1"):
            assert delta.new_token_ids == [0]
            break  # closes the iterator: aborts, then reads up to the final delta
        assert server.received[1:] == [AbortRequest(request_id="s1")]
        assert server.finished_ids == ["s1"]
        # the id is free again, and the connection still serves
        assert client.generate([9], request_id="s1").token_ids == [9]


def test_abort(tmp_path) -> None:
    with fake_server(tmp_path) as (_, address), Client(address, timeout_s=5) as client:
        assert client.abort("unknown") is None
        stream = client.stream("forever", request_id="s1")
        assert next(stream).finished is False
        final = client.abort("s1")
        assert (final.request_id, final.finished, final.finish_reason) == ("s1", True, "abort")
        assert list(stream) == [final]  # the stream still ends with that final delta


def test_interleaved_streams_and_health(tmp_path) -> None:
    with fake_server(tmp_path) as (_, address), Client(address, timeout_s=5) as client:
        first, second = client.stream([1, 2, 3]), client.stream([4, 5])
        assert next(first).new_token_ids == [1]
        assert next(second).new_token_ids == [4]  # first's other deltas wait in its box
        assert client.health() == HEALTH
        assert [d.new_token_ids for d in second] == [[5]]
        assert [d.new_token_ids for d in first] == [[2], [3]]


@pytest.mark.parametrize(
    "kind, error_type",
    [("invalid_request", InvalidRequest), ("overloaded", Overloaded),
     ("worker_lost", WorkerLost), ("timeout", Timeout), ("internal", TitanserveError)],
)
def test_error_reply_kinds(tmp_path, kind: str, error_type: type) -> None:
    with fake_server(tmp_path) as (_, address), Client(address, timeout_s=5) as client:
        with pytest.raises(error_type, match="scripted failure") as info:
            client.generate(f"error:{kind}")
        with pytest.raises(error_type):
            list(client.stream(f"error:{kind}"))
        assert client.generate([1]).token_ids == [1]  # the client is still usable
    if kind == "worker_lost":
        assert info.value.rank is None


def test_timeout_on_silence_aborts_the_request(tmp_path) -> None:
    with fake_server(tmp_path) as (server, address), Client(address, timeout_s=0.3) as client:
        start = time.monotonic()
        with pytest.raises(Timeout, match="no reply from"):
            client.generate("silence", request_id="quiet")
        assert 0.25 < time.monotonic() - start < 1.5
        wait_until(lambda: AbortRequest(request_id="quiet") in server.received)
        # the late abort delta is dropped; the next request gets its own reply
        assert client.generate([2]).token_ids == [2]


def test_health_and_stats(tmp_path) -> None:
    with fake_server(tmp_path) as (_, address), Client(address, timeout_s=5) as client:
        assert client.health() == HEALTH
        assert client.stats() == STATS
    with fake_server(tmp_path, health_error=True) as (_, address), Client(address) as client:
        with pytest.raises(TitanserveError, match="no health"):  # an ErrorReply without id
            client.health()


def test_unreadable_reply_raises(tmp_path) -> None:
    with fake_server(tmp_path) as (_, address), Client(address, timeout_s=5) as client:
        with pytest.raises(TitanserveError, match="unreadable reply") as info:
            client.generate("garbage")
        assert "\n" not in str(info.value)


def test_bad_requests_fail_before_sending(tmp_path) -> None:
    with fake_server(tmp_path) as (server, address), Client(address, timeout_s=5) as client:
        with pytest.raises(InvalidRequest, match=r"\$.prompt_token_ids\[1\]"):
            client.generate([1, -2])
        with pytest.raises(InvalidRequest, match="Invalid enum value 'bot'"):
            client.chat([{"role": "bot", "content": "hi"}])
        with pytest.raises(InvalidRequest, match="request_id"):
            client.generate("hi", request_id="x" * 300)
        stream = client.stream("forever", request_id="busy")
        next(stream)
        with pytest.raises(InvalidRequest, match="in flight"):
            client.generate("hi", request_id="busy")
        stream.close()
        assert [type(m) for m in server.received] == [GenerateRequest, AbortRequest]
    with pytest.raises(ConfigError, match="40-character"):
        Client(f"ipc://{tmp_path}/none", server_public_key=b"short")
    with pytest.raises(ConfigError, match="use ipc://PATH or tcp://HOST:PORT"):
        Client("localhost:5555")


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CurveZMQ")
def test_curve_server(tmp_path) -> None:
    keys = zmq.curve_keypair()
    with fake_server(tmp_path, curve_keys=keys) as (_, address):
        with Client(address, server_public_key=keys[0] + b"\n", timeout_s=5) as client:
            assert client.generate([4, 2]).token_ids == [4, 2]
            assert client.health() == HEALTH
        with Client(address, timeout_s=0.3) as client:  # no key: the handshake fails silently
            with pytest.raises(Timeout, match="server_public_key"):
                client.generate([4, 2])
            with pytest.raises(Timeout):
                client.health()


# ---------------------------------------------------------------- AsyncClient


def test_async_concurrent_generates_get_their_own_replies(tmp_path) -> None:
    async def main(address: str) -> list[Completion]:
        async with AsyncClient(address, timeout_s=5) as client:
            prompts = [[i, i + 1] for i in range(20)]
            return await asyncio.gather(*(client.generate(p) for p in prompts))

    with fake_server(tmp_path, hold=20) as (server, address):
        completions = asyncio.run(main(address))
    assert [c.token_ids for c in completions] == [[i, i + 1] for i in range(20)]
    sent_ids = [m.request_id for m in server.received]
    assert [c.request_id for c in completions] == sent_ids
    assert server.finished_ids == sent_ids[::-1]  # answered in reverse


def test_async_stream_chat_abort_health(tmp_path) -> None:
    async def main(address: str):
        async with AsyncClient(address, timeout_s=5) as client:
            deltas = [d async for d in client.stream([7, 8, 9])]
            chat = await client.chat([{"role": "user", "content": "Hi"}])
            async with contextlib.aclosing(client.stream("forever", request_id="s1")) as stream:
                async for _ in stream:
                    break  # aclosing aborts it
            aborted = await client.abort("gone")
            healths = await asyncio.gather(client.health(), client.health(), client.stats())
            return deltas, chat, aborted, healths

    with fake_server(tmp_path) as (server, address):
        deltas, chat, aborted, healths = asyncio.run(main(address))
    assert [d.new_token_ids for d in deltas] == [[7], [8], [9]]
    assert [d.finished for d in deltas] == [False, False, True]
    assert chat.token_ids == [1]
    assert AbortRequest(request_id="s1") in server.received and "s1" in server.finished_ids
    assert aborted is None
    assert healths == [HEALTH, HEALTH, STATS]
    assert sum(isinstance(m, HealthRequest) for m in server.received) == 1  # shared request


def test_async_abort_and_cancel_of_a_running_generate(tmp_path) -> None:
    async def main(address: str):
        async with AsyncClient(address, timeout_s=5) as client:
            task = asyncio.create_task(client.generate("silence", request_id="g1"))
            await asyncio.sleep(0.05)
            final = await client.abort("g1")
            completion = await task
            task = asyncio.create_task(client.generate("silence", request_id="g2"))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return final, completion

    with fake_server(tmp_path) as (server, address):
        final, completion = asyncio.run(main(address))
        wait_until(lambda: AbortRequest(request_id="g2") in server.received)  # sent on cancel
    assert final.finish_reason == "abort" and completion.finish_reason == "abort"
    assert completion.token_ids == []


def test_async_timeout_errors_and_close(tmp_path) -> None:
    async def main(address: str):
        async with AsyncClient(address, timeout_s=0.3) as client:
            start = time.monotonic()
            with pytest.raises(Timeout):
                await client.generate("silence")
            assert 0.25 < time.monotonic() - start < 1.5
            with pytest.raises(Overloaded):
                await client.generate("error:overloaded")
            with pytest.raises(TitanserveError, match="unreadable reply"):
                await client.generate("garbage")
            assert (await client.generate([3])).token_ids == [3]
        async with AsyncClient(address, timeout_s=5) as client:
            task = asyncio.create_task(client.generate("silence"))
            await asyncio.sleep(0.05)
            await client.close()
            with pytest.raises(TitanserveError, match="closed"):
                await task

    with fake_server(tmp_path) as (_, address):
        asyncio.run(main(address))


def test_the_client_imports_without_torch():
    """Light clients (examples, HTTP front ends on other machines) must not need torch."""
    import subprocess
    import sys

    code = (
        "import sys; from titanserve.ipc import Client, AsyncClient, Completion; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_engine_config_knows_every_dtype_the_model_code_does():
    from titanserve.core.config import DTYPES
    from titanserve.core.engine_config import DTYPE_NAMES

    assert set(DTYPE_NAMES) == set(DTYPES)
