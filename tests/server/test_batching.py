"""Dynamic batching: concurrent requests (on the engine and over HTTP) share forward passes without changing
anyone's logits, a failing request does not fail its round, and a 500 leaves the connection usable."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import numpy as np

from lmaas_protocol import (
    Candidate,
    EvaluateRequest,
    Example,
    LowRankOffset,
    Tensor,
)
from lmaas_server.metering.budget import CallBudget
from tests.server.support import (
    TEMPLATES,
    TEXTS,
    engine_logits,
    inputs_body,
    logits_of,
    normal,
)
from tests.support.tiny_models import HIDDEN

# ----------------------------------------------------------------------------------------------- dynamic batching


class BlockFirstForward:
    """Wraps engine.forward.run: the first call waits until released; every call records its rows' requests
    (by the number of classes, which differs per request) and the path it took."""

    def __init__(self, engine, monkeypatch):
        self.entered, self.release = threading.Event(), threading.Event()
        self.batches: list[tuple[frozenset[int], bool, int]] = []
        original = engine.forward.run

        def run(batch):
            first = not self.batches
            self.batches.append((frozenset(row.out.shape[0] for row in batch), batch[0].prefix is not None, len(batch)))
            if first:
                self.entered.set()
                assert self.release.wait(30), "never released"
            return original(batch)

        monkeypatch.setattr(engine.forward, "run", run)


def wait_for_queue(engine, depth: int) -> None:
    deadline = time.monotonic() + 30
    while engine.scheduler.queue_depth < depth:
        assert time.monotonic() < deadline, f"queue depth {engine.scheduler.queue_depth}, waiting for {depth}"
        time.sleep(0.002)


def run_together(engine, spy, calls, timeout: float = 30) -> dict[int, object]:
    """calls[0] first (held inside its forward by `spy`), then the others queue up and share the next round;
    each call's result, or the exception it raised, by index."""
    results: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    threads[0].start()
    assert spy.entered.wait(30)
    for thread in threads[1:]:
        thread.start()
    wait_for_queue(engine, len(calls) - 1)
    spy.release.set()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive()
    return results


def evaluate_together(engine, requests, budgets, spy) -> dict[int, object]:
    """`run_together` of engine evaluations: each request's logits, or its exception."""
    calls = [lambda i=i: engine_logits(engine.evaluate(requests[i], budgets[i])) for i in range(len(requests))]
    return run_together(engine, spy, calls)


def batching_requests(engine) -> list[EvaluateRequest]:
    """Four requests, request i with i + 2 classes (so its rows are recognisable in a batch)."""
    vocab = [
        [engine.loaded.tokenizer(w, add_special_tokens=False)["input_ids"][0]]
        for w in (" bad", " great", " fun", " thin", " dull")
    ]

    def make(i: int, template: str, texts: list[str], candidates: list[Candidate]) -> EvaluateRequest:
        return EvaluateRequest(
            template=template,
            examples=[Example(text_a=t) for t in texts],
            verbalizer=vocab[: i + 2],
            candidates=candidates,
        )

    soft = [Candidate(soft_prompt=Tensor.from_numpy(normal(s, 1 + s % 3, HIDDEN))) for s in range(6)]
    offset = Candidate(
        embedding_offset=LowRankOffset(a=Tensor.from_numpy(normal(9, 5, 2)), b=Tensor.from_numpy(normal(10, 2, HIDDEN)))
    )
    return [
        make(0, TEMPLATES["causal"], TEXTS, soft[:2]),  # the one that blocks the worker
        make(
            1,
            TEMPLATES["causal"],
            ["it was terrible", "fun", "as lively an account as seinfeld is deadpan ."],
            soft[2:4],
        ),
        make(2, TEMPLATES["causal_front"], TEXTS[1:], [soft[4]]),  # plain path
        make(3, "Text: {text_a}\nSo it was {prompt}Answer:{mask}", TEXTS[:3], [soft[5], Candidate(), offset]),
    ]


def test_concurrent_requests_share_forward_passes_and_keep_their_logits(engines, monkeypatch):
    engine = engines("llama", max_candidates=63)  # a private engine: its forward pass gets patched
    requests = batching_requests(engine)
    alone = [engine_logits(engine.evaluate(r, CallBudget(None))) for r in requests]
    spy = BlockFirstForward(engine, monkeypatch)
    results: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            results[i] = engine_logits(engine.evaluate(requests[i], CallBudget(None)))
        except BaseException as exc:  # surfaced below
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    threads[0].start()
    assert spy.entered.wait(30)
    for thread in threads[1:]:
        thread.start()
    wait_for_queue(engine, len(requests) - 1)  # everyone else is waiting for the worker
    spy.release.set()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    for i, expected in enumerate(alone):
        assert not isinstance(results[i], BaseException), results[i]
        np.testing.assert_allclose(results[i], expected, atol=1e-5)
    first, *later = spy.batches
    assert first[0] == {2}
    # one round for the three waiting requests: one plain and one cached forward pass, each shared
    assert [(owners, cached) for owners, cached, _ in later] == [(frozenset({4, 5}), False), (frozenset({3, 5}), True)]
    rows = {cached: n for _, cached, n in later}
    assert rows == {False: 1 * 3 + 1 * 3, True: 2 * 3 + 2 * 3}  # (candidates x examples) per request
    assert engine.scheduler.batch_sizes == [6, 12]


def test_concurrent_http_clients_share_forward_passes(live_server, engines, monkeypatch):
    engine = engines("llama", max_candidates=62)  # a private engine: its forward pass gets patched
    requests = batching_requests(engine)
    bodies = [r.model_dump_json(exclude_none=True) for r in requests]
    headers = {"content-type": "application/json"}
    with live_server("llama", max_candidates=62) as server:
        with httpx.Client(base_url=server.url) as client:
            alone = [logits_of(client.post("/v1/evaluate", content=b, headers=headers).json()) for b in bodies]
        spy = BlockFirstForward(engine, monkeypatch)

        def post(i: int) -> object:
            with httpx.Client(base_url=server.url, timeout=60) as own:
                response = own.post("/v1/evaluate", content=bodies[i], headers=headers)
                return logits_of(response.json()) if response.status_code == 200 else response.text

        results = run_together(engine, spy, [lambda i=i: post(i) for i in range(len(bodies))], timeout=60)
    for i, expected in enumerate(alone):
        assert isinstance(results[i], np.ndarray), results[i]
        np.testing.assert_allclose(results[i], expected, atol=1e-5)
    assert any(len(owners) > 1 for owners, _, _ in spy.batches[1:])
    assert len(spy.batches) == 3


def test_a_failing_request_does_not_fail_the_others_in_its_round(engines, monkeypatch):
    engine = engines("llama", max_candidates=61)
    requests = batching_requests(engine)
    alone = engine_logits(engine.evaluate(requests[1], CallBudget(None)))
    spy = BlockFirstForward(engine, monkeypatch)
    # request 2's rows fail to build on the worker (e.g. an out-of-memory while computing its text cache)
    original_rows = engine._rows

    def rows(prepared, variant, prompts, logits, use_prefix):
        if logits.shape[2] == 4:
            raise RuntimeError("simulated failure")
        return original_rows(prepared, variant, prompts, logits, use_prefix)

    monkeypatch.setattr(engine, "_rows", rows)
    budgets = [CallBudget(10) for _ in requests]
    results = evaluate_together(engine, requests, budgets, spy)
    assert isinstance(results[2], RuntimeError) and budgets[2].used == 0  # refunded
    np.testing.assert_allclose(results[1], alone, atol=1e-5)
    assert budgets[0].used == 2 and budgets[1].used == 2


# ----------------------------------------------------------------------------------------------- robustness


def test_a_500_keeps_the_connection_usable_or_says_it_closes(live_server, engines, monkeypatch):
    engine = engines("llama", max_candidates=60)  # a private engine: its forward pass gets patched

    def explode(batch):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(engine.forward, "run", explode)
    body = json.dumps({**inputs_body(engine), "candidates": [{}]}).encode()
    with live_server("llama", max_candidates=60) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            head = (
                f"POST /v1/evaluate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            sock.sendall(head + body)
            received = b""
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536)
            header_text, rest = received.split(b"\r\n\r\n", 1)
            headers = dict(line.split(": ", 1) for line in header_text.decode("latin-1").lower().split("\r\n")[1:])
            assert header_text.startswith(b"HTTP/1.1 500")
            while len(rest) < int(headers["content-length"]):
                rest += sock.recv(65536)
            assert json.loads(rest)["error"]["code"] == "internal_error"
            sock.settimeout(1.0)
            try:
                closed = sock.recv(1) == b""
            except TimeoutError:
                closed = False  # still open: the next request may reuse it
            assert not closed or headers.get("connection") == "close", headers
