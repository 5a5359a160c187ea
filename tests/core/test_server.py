"""The scheduler process's client protocol, with raw DEALER sockets (no client library):
results equal the offline API, streams add up, bad input gets ErrorReply and serving goes on."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import msgspec
import pytest
import zmq

from titanserve import LLM, SamplingParams
from titanserve.core.server import Server
from titanserve.ipc import messages as m

FAMILY = "llama"


class RawClient:
    """A DEALER socket speaking the protocol by hand."""

    def __init__(self, address: str, curve_server_key: bytes | None = None) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 10_000)  # a send that cannot go out fails the test
        if curve_server_key is not None:
            self.sock.curve_publickey, self.sock.curve_secretkey = zmq.curve_keypair()
            self.sock.curve_serverkey = curve_server_key
        self.sock.connect(address)
        self.decoder = msgspec.msgpack.Decoder(m.ToClient)
        self.unread: list = []  # the rest of an OutputBatch
        self.batches: list[int] = []  # the size of each OutputBatch received

    def send(self, msg) -> None:
        self.sock.send(msgspec.msgpack.encode(msg))

    def recv(self, timeout_s: float = 30.0):
        """The next reply; the deltas of an OutputBatch one by one (`batches` counts those)."""
        if self.unread:
            return self.unread.pop(0)
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError("no reply")
        reply = self.decoder.decode(self.sock.recv())
        if isinstance(reply, m.OutputBatch):
            self.batches.append(len(reply.deltas))
            self.unread = list(reply.deltas[1:])
            return reply.deltas[0]
        return reply

    def until_finished(self, request_id: str) -> list:
        replies = []
        while True:
            reply = self.recv()
            if getattr(reply, "request_id", None) != request_id:
                continue
            replies.append(reply)
            if isinstance(reply, m.ErrorReply) or reply.finished:
                return replies

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


@contextmanager
def serving(llm: LLM, address: str, **kw):
    """A Server on `address` looping in a thread; on exit the loop must stop, then closes."""
    server = Server(llm.engine, address, **kw)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(10)
        assert not thread.is_alive(), "the server loop did not stop"
        server.close()


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """(address, a reference LLM on the same checkpoint) with a server thread running."""
    path = str(tiny_model(FAMILY))
    address = f"ipc://{tmp_path_factory.mktemp('srv')}/sock"
    with LLM(path, progress=False) as llm, LLM(path, progress=False) as reference:
        with serving(llm, address):
            yield address, reference


@pytest.fixture
def client(served):
    with RawClient(served[0]) as c:
        yield c


def test_generate_equals_the_offline_api(served, client, random_prompts):
    _, reference = served
    prompts = random_prompts([5, 17, 9], seed=1)
    want = reference.generate(prompts, greedy(logprobs=2))
    for i, prompt in enumerate(prompts):
        client.send(m.GenerateRequest(request_id=f"r{i}", sampling=greedy(logprobs=2),
                                      prompt_token_ids=prompt))
    got = {}
    for _ in prompts:
        reply = client.recv()
        got[reply.request_id] = reply
    for i, out in enumerate(want):
        reply = got[f"r{i}"]
        assert reply.finished and reply.finish_reason == "length"
        assert (reply.new_token_ids, reply.new_text) == (out.token_ids, out.text)
        assert reply.logprobs == pytest.approx(out.logprobs, abs=1e-5)
        assert len(reply.top_logprobs) == len(out.token_ids)
        assert (reply.num_prompt_tokens, reply.num_generated_tokens) == (len(prompts[i]), 12)


def test_stream_deltas_add_up_and_text_prompts_and_chat_work(served, client):
    _, reference = served
    (want,) = reference.generate(["hello world"], greedy(16))
    client.send(m.GenerateRequest(request_id="s", sampling=greedy(16), prompt="hello world",
                                  stream=True))
    deltas = client.until_finished("s")
    assert len(deltas) > 1 and [d.finished for d in deltas][-1] and not deltas[0].finished
    assert sum((d.new_token_ids for d in deltas), []) == want.token_ids
    assert "".join(d.new_text for d in deltas) == want.text
    counts = [d.num_generated_tokens for d in deltas]
    assert counts == sorted(counts) and counts[-1] == 16
    turns = [{"role": "user", "content": "hi there"}]
    (chat_want,) = reference.chat(turns, greedy(8))
    client.send(m.GenerateRequest(request_id="c", sampling=greedy(8),
                                  messages=[m.ChatMessage(role="user", content="hi there")]))
    (reply,) = client.until_finished("c")
    assert (reply.new_token_ids, reply.new_text) == (chat_want.token_ids, chat_want.text)


def test_a_steps_deltas_for_one_client_come_in_one_message(served, client, random_prompts):
    """Streams of one client share each step's message (an OutputBatch); each adds up."""
    _, reference = served
    prompts = random_prompts([3, 8, 5, 12], seed=2)
    want = reference.generate(prompts, greedy(10))
    for i, prompt in enumerate(prompts):
        client.send(m.GenerateRequest(request_id=f"b{i}", sampling=greedy(10),
                                      prompt_token_ids=prompt, stream=True))
    tokens: dict[str, list[int]] = {f"b{i}": [] for i in range(len(prompts))}
    done = set()
    while len(done) < len(prompts):
        reply = client.recv()
        tokens[reply.request_id] += reply.new_token_ids
        if reply.finished:
            done.add(reply.request_id)
    assert [tokens[f"b{i}"] for i in range(len(prompts))] == [w.token_ids for w in want]
    assert client.batches and max(client.batches) == len(prompts)


def test_bad_input_gets_error_replies_and_serving_goes_on(served, client):
    client.sock.send(b"\xc1 not msgpack")
    reply = client.recv()
    assert isinstance(reply, m.ErrorReply) and reply.kind == "invalid_request"
    assert reply.request_id is None and "bad message" in reply.message
    client.sock.send_multipart([b"two", b"frames"])
    assert client.recv().kind == "invalid_request"
    bad_sampling = {"type": "GenerateRequest", "request_id": "x", "prompt_token_ids": [5],
                    "sampling": {"temperature": -1.0}}
    client.sock.send(msgspec.msgpack.encode(bad_sampling))
    assert "temperature" in client.recv().message
    for rid, prompt in [("empty", []), ("vocab", [5, 10**6])]:
        client.send(m.GenerateRequest(request_id=rid, sampling=greedy(), prompt_token_ids=prompt))
        reply = client.recv()
        assert (reply.kind, reply.request_id) == ("invalid_request", rid)
    client.send(m.GenerateRequest(request_id="ok", sampling=greedy(3), prompt_token_ids=[5, 6]))
    (reply,) = client.until_finished("ok")
    assert len(reply.new_token_ids) == 3


def test_abort_ends_a_stream_and_unknown_ids_are_refused(served, client):
    client.send(m.GenerateRequest(request_id="long", sampling=greedy(200),
                                  prompt_token_ids=[5, 6, 7], stream=True))
    first = client.recv()
    assert first.request_id == "long" and not first.finished
    client.send(m.AbortRequest(request_id="long"))
    last = client.until_finished("long")[-1]
    assert (last.finished, last.finish_reason) == (True, "abort")
    assert last.num_generated_tokens < 200
    client.send(m.AbortRequest(request_id="nobody"))
    reply = client.recv()
    assert (reply.kind, reply.request_id) == ("invalid_request", "nobody")


def test_request_ids_belong_to_their_client(served, client):
    other = RawClient(served[0])
    try:
        for c, prompt in ((client, [5, 6]), (other, [9, 10, 11])):
            c.send(m.GenerateRequest(request_id="same", sampling=greedy(200), stream=True,
                                     prompt_token_ids=prompt))
        other.send(m.AbortRequest(request_id="same"))  # aborts only its own
        assert other.until_finished("same")[-1].finish_reason == "abort"
        client.send(m.GenerateRequest(request_id="same", sampling=greedy(), prompt_token_ids=[5]))
        replies = client.until_finished("same")
        assert isinstance(replies[-1], m.ErrorReply) and "already in flight" in replies[-1].message
        assert client.until_finished("same")[-1].finish_reason == "length"
    finally:
        other.close()


def test_health_and_stats(served, client):
    client.send(m.HealthRequest())
    health = client.recv()
    assert isinstance(health, m.HealthReply) and health.ok and health.num_workers == 1
    prompt = list(range(3, 40))
    for rid in ("a", "b"):  # the second finds the first's blocks in the prefix cache
        client.send(m.GenerateRequest(request_id=rid, sampling=greedy(2), prompt_token_ids=prompt))
        client.until_finished(rid)
    client.send(m.StatsRequest())
    stats = client.recv()
    assert isinstance(stats, m.StatsReply)
    assert stats.num_requests_total >= 2 and stats.num_generated_tokens_total >= 4
    assert stats.prefix_cache_hit_rate > 0 and stats.num_steps_total > 0
    assert stats.num_running == stats.num_waiting == 0 and len(stats.kv_cache_usage) == 1
    # one worker exchanges nothing: all of the share outside compute is the engine's and IPC's
    assert stats.overhead_parts == {"all-to-all wait": 0.0, "all-to-all work": 0.0,
                                    "engine + IPC": pytest.approx(stats.overhead_fraction)}
    assert stats.workers_compute_apart == 0.0


def test_full_queue_answers_overloaded(tiny_model, tmp_path):
    address = f"ipc://{tmp_path}/sock"
    with LLM(str(tiny_model(FAMILY)), progress=False) as llm, serving(
        llm, address, max_waiting=1
    ), RawClient(address) as client:
        for i in range(4):  # read in one go, before any step admits the first
            client.send(m.GenerateRequest(request_id=f"q{i}", sampling=greedy(2),
                                          prompt_token_ids=[5, 6]))
        kinds = {}
        while len(kinds) < 4:
            reply = client.recv()
            kinds[reply.request_id] = getattr(reply, "kind", "ok")
        assert kinds["q0"] == "ok" and "overloaded" in kinds.values()


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CurveZMQ")
def test_curve_server_refuses_clients_without_its_key(tiny_model, tmp_path):
    public, secret = zmq.curve_keypair()
    address = f"ipc://{tmp_path}/sock"
    with LLM(str(tiny_model(FAMILY)), progress=False) as llm, serving(
        llm, address, curve_keys=(public, secret)
    ), RawClient(address) as plain, RawClient(address, curve_server_key=public) as keyed:
        try:  # queued, unless the failed handshake has already dropped the connection
            plain.sock.send(msgspec.msgpack.encode(m.HealthRequest()), zmq.NOBLOCK)
        except zmq.Again:
            pass
        with pytest.raises(TimeoutError):
            plain.recv(timeout_s=1.0)
        keyed.send(m.HealthRequest())
        assert keyed.recv().ok


def test_killed_worker_fails_requests_in_flight_and_health(tiny_model, tmp_path):
    address = f"ipc://{tmp_path}/sock"
    with LLM(str(tiny_model(FAMILY)), num_workers=2, progress=False) as llm, serving(
        llm, address
    ), RawClient(address) as client:
        client.send(m.GenerateRequest(request_id="r", sampling=greedy(500), stream=True,
                                      prompt_token_ids=[5, 6, 7]))
        client.recv()
        os.kill(llm.engine.executor.procs[1].pid, signal.SIGKILL)
        last = client.until_finished("r")[-1]
        assert isinstance(last, m.ErrorReply) and last.kind == "worker_lost"
        client.send(m.HealthRequest())
        assert not client.recv().ok
        client.send(m.GenerateRequest(request_id="n", sampling=greedy(), prompt_token_ids=[5]))
        assert client.recv().kind == "worker_lost"


def _children_of(pid: int) -> set[int]:
    found = set()
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == str(pid):
            found.add(int(stat.split("/")[2]))
    return found


def test_serve_command_runs_until_sigterm(tiny_model, tmp_path):
    """One worker still gets a process of its own: the scheduler never holds the model."""
    address = f"ipc://{tmp_path}/sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "titanserve.launcher.cli", "serve", str(tiny_model(FAMILY)),
         "--address", address],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = iter(proc.stderr.readline, "")  # the loading bar comes first
        ready = next((line for line in lines if "serving" in line), "")
        assert address in ready and "1 worker" in ready, ready
        (worker,) = _children_of(proc.pid)
        client = RawClient(address)
        client.send(m.GenerateRequest(request_id="x", sampling=greedy(4), prompt="hi"))
        (reply,) = client.until_finished("x")
        assert len(reply.new_token_ids) == 4
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "server stopped" in proc.stderr.read()
        deadline = time.monotonic() + 5  # the worker is gone with the server, not orphaned
        while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{worker}")
    finally:
        if proc.poll() is None:
            proc.kill()
            time.sleep(0.1)


def test_client_library_against_the_real_server(served, random_prompts):
    import asyncio

    from titanserve.core.errors import InvalidRequest
    from titanserve.ipc import AsyncClient, Client

    address, reference = served
    prompts = random_prompts([4, 11, 23, 6, 15, 9, 30, 2], seed=7)
    want = reference.generate(prompts, greedy(10))
    with Client(address, timeout_s=30) as client:
        got = client.generate(prompts[0], greedy(10))
        assert (got.token_ids, got.text, got.finish_reason) == (
            want[0].token_ids, want[0].text, "length")
        deltas = list(client.stream(prompts[1], greedy(10)))
        assert sum((d.new_token_ids for d in deltas), []) == want[1].token_ids
        with pytest.raises(InvalidRequest, match="empty"):
            client.generate([], greedy())
        assert client.health().ok

    async def many() -> list:
        async with AsyncClient(address, timeout_s=30) as client:
            return await asyncio.gather(*(client.generate(p, greedy(10)) for p in prompts))

    outs = asyncio.run(many())
    assert [o.token_ids for o in outs] == [w.token_ids for w in want]


def test_an_engine_bug_fails_requests_in_flight_then_stops_the_loop(tiny_model, tmp_path):
    with LLM(str(tiny_model(FAMILY)), progress=False) as llm:
        address = f"ipc://{tmp_path}/sock"
        server = Server(llm.engine, address)
        client = RawClient(address)
        try:
            client.send(m.GenerateRequest(request_id="r", sampling=greedy(),
                                          prompt_token_ids=[5, 6]))
            server._read_messages(first_wait_ms=5000)
            llm.engine.step = lambda: 1 / 0  # an injected fault
            with pytest.raises(ZeroDivisionError):
                server.serve_forever()
            reply = client.recv()
            assert (reply.kind, reply.request_id) == ("internal", "r")
            assert "division by zero" in reply.message
        finally:
            client.close()
            server.close()
