"""An accelerator out of memory (injected: `torch.cuda.OutOfMemoryError` from the forward pass) splits the batch
and retries; a request whose rows fail alone gets 503 with Retry-After, refunded, and the requests that shared
its batches still complete with their own logits."""

from __future__ import annotations

import httpx
import numpy as np
import torch

from lmaas_server.errors import Overloaded
from lmaas_server.metering.budget import CallBudget
from tests.server.support import assert_error, engine_logits, inputs_body, remaining_after_one_call
from tests.server.test_batching import BlockFirstForward, batching_requests, evaluate_together


def fail_when(engine, monkeypatch, too_big) -> list[int]:
    """engine.forward.run raises CUDA's out-of-memory error when `too_big(batch)`; returns the sizes that ran."""
    original, ran = engine.forward.run, []

    def run(batch):
        if too_big(batch):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        ran.append(len(batch))
        return original(batch)

    monkeypatch.setattr(engine.forward, "run", run)
    return ran


def test_an_oversized_batch_is_split_until_it_fits_and_logits_do_not_change(engines, monkeypatch):
    engine = engines("llama", max_candidates=57)  # a private engine: its forward pass gets patched
    request = batching_requests(engine)[3]  # 3 candidates (one with an offset: both paths) x 3 examples
    alone = engine_logits(engine.evaluate(request, CallBudget(None)))
    ran = fail_when(engine, monkeypatch, lambda batch: len(batch) > 2)
    budget = CallBudget(10)
    split = engine_logits(engine.evaluate(request, budget))
    np.testing.assert_allclose(split, alone, atol=1e-5)
    assert ran and max(ran) <= 2 and sum(ran) == 9  # every row ran once, in batches that fit
    assert budget.used == 3


def test_only_the_request_that_does_not_fit_gets_503_and_is_refunded(engines, monkeypatch):
    engine = engines("llama", max_candidates=56)
    requests = batching_requests(engine)  # request i has i + 2 classes: its rows are recognisable
    alone = [engine_logits(engine.evaluate(r, CallBudget(None))) for r in requests]
    # request 3's rows never fit (even alone); any batch of more than 2 rows does not either
    ran = fail_when(engine, monkeypatch, lambda b: len(b) > 2 or any(row.out.shape[0] == 5 for row in b))
    spy = BlockFirstForward(engine, monkeypatch)
    budgets = [CallBudget(10) for _ in requests]
    results = evaluate_together(engine, requests, budgets, spy)  # requests 1 to 3 share the next round
    assert isinstance(results[3], Overloaded) and results[3].status == 503
    assert results[3].headers["Retry-After"] and budgets[3].used == 0  # refunded
    for i in (0, 1, 2):
        np.testing.assert_allclose(results[i], alone[i], atol=1e-5)
        assert budgets[i].used == len(requests[i].candidates)
    shared = [owners for owners, *_ in spy.batches[1:] if 5 in owners and len(owners) > 1]
    assert shared and 4 in set().union(*shared)  # request 3 shared a batch with request 2 (the plain path)
    assert max(ran) <= 2


def test_out_of_memory_over_http_is_503_with_retry_after_and_not_charged(live_server, engines, monkeypatch):
    engine = engines("llama", max_candidates=55, budget=10)
    failing = [True]
    fail_when(engine, monkeypatch, lambda batch: failing[0])
    body = {**inputs_body(engine), "candidates": [{}, {}]}
    with live_server("llama", max_candidates=55, budget=10) as server, httpx.Client(base_url=server.url) as client:
        response = client.post("/v1/evaluate", json=body)
        assert_error(response, 503, "overloaded")
        assert int(response.headers["retry-after"]) > 0
        failing[0] = False
        assert remaining_after_one_call(client, body) == 9  # the failed request charged nothing
