"""Binary bundle bodies over real HTTP: the JSON bodies' results, malformed bundles rejected and not charged,
and the upload size of a BBT population."""

from __future__ import annotations

import struct

import httpx
import numpy as np
import pytest

from lmaas_protocol import (
    BUNDLE_MEDIA_TYPE,
    Candidate,
    EvaluateRequest,
    Example,
    InputsSpec,
    LowRankOffset,
    Projected,
    ProjectionSpec,
    Tensor,
    decode_bundle,
    encode_bundle,
)
from tests.server.support import (
    BUDGET,
    assert_error,
    inputs_body,
    logits_of,
    normal,
    remaining_after_one_call,
)
from tests.support.tiny_models import HIDDEN

# ----------------------------------------------------------------------------------------------- bundle bodies


def rich_request(engine) -> EvaluateRequest:
    body = inputs_body(engine)
    spec = ProjectionSpec(seed=11, scale=0.05, dim=64, shape=[4, HIDDEN])
    return EvaluateRequest(
        template=body["template"],
        examples=[Example(**e) for e in body["examples"]],
        verbalizer=body["verbalizer"],
        projections={"bbt": spec},
        candidates=[
            Candidate(),
            Candidate(soft_prompt=Tensor.from_numpy(normal(1, 3, HIDDEN))),
            Candidate(soft_prompt=Projected(z=Tensor.from_numpy(normal(2, 64)), projection="bbt")),
            Candidate(soft_prompt=Projected(z=Tensor.from_numpy(normal(3, 64), dtype="float16"), projection="bbt")),
            Candidate(
                prompt_token_ids=[5, 6, 7, 8],
                deep_prompt=[None, Projected(z=Tensor.from_numpy(normal(4, 64)), projection="bbt")],
            ),
            Candidate(
                prompt_token_ids=[5],
                embedding_offset=LowRankOffset(
                    a=Tensor.from_numpy(normal(5, 7, 2)),
                    b=Tensor.from_numpy(normal(6, 2, HIDDEN), dtype="float16"),
                    scale=0.4,
                ),
            ),
        ],
    )


def bundle(document: bytes, buffers: list[bytes], lengths: list[int] | None = None) -> bytes:
    lengths = [len(b) for b in buffers] if lengths is None else lengths
    return b"".join(
        [b"LMB1", struct.pack("<I", len(document)), document, struct.pack("<I", len(lengths)),
         struct.pack(f"<{len(lengths)}Q", *lengths), *buffers]
    )  # fmt: skip


BUNDLE_HEADERS = {"content-type": BUNDLE_MEDIA_TYPE}


@pytest.mark.parametrize("kind", ["roberta", "llama"])
def test_bundle_bodies_give_the_json_bodies_results(live_server, engines, kind):
    engine = engines(kind, budget=BUDGET)
    request = rich_request(engine)
    as_json = request.model_dump_json(exclude_none=True)
    as_bundle = encode_bundle(request)
    assert len(as_bundle) < len(as_json)
    with live_server(kind, budget=BUDGET) as server, httpx.Client(base_url=server.url) as client:
        by_json = client.post("/v1/evaluate", content=as_json, headers={"content-type": "application/json"})
        by_bundle = client.post("/v1/evaluate", content=as_bundle, headers=BUNDLE_HEADERS)
        assert by_json.status_code == by_bundle.status_code == 200, (by_json.text, by_bundle.text)
        np.testing.assert_array_equal(logits_of(by_bundle.json()), logits_of(by_json.json()))
        assert by_bundle.json()["usage"]["calls"] == len(request.candidates)
        # the media type may carry parameters and any case
        upper = client.post(
            "/v1/evaluate", content=as_bundle, headers={"content-type": "Application/X-LMAAS-Bundle; v=1"}
        )
        assert upper.status_code == 200
        charset = client.post(
            "/v1/evaluate", content=as_json, headers={"content-type": "application/json; charset=utf-8"}
        )
        assert charset.status_code == 200
        # every buffer misaligned by one byte: same results
        document, buffers = decode_bundle(as_bundle)
        shifted = bundle(document + b" ", [bytes(b) for b in buffers])
        np.testing.assert_array_equal(
            logits_of(client.post("/v1/evaluate", content=shifted, headers=BUNDLE_HEADERS).json()),
            logits_of(by_json.json()),
        )
        # registering inputs as a bundle works too (no tensors: no buffers)
        registered = client.post(
            "/v1/inputs", content=encode_bundle(InputsSpec.model_validate(inputs_body(engine))), headers=BUNDLE_HEADERS
        )
        assert registered.status_code == 201, registered.text
        handle = registered.json()["handle"]
        by_handle = client.post(
            "/v1/evaluate",
            content=encode_bundle(
                EvaluateRequest(inputs=handle, candidates=request.candidates, projections=request.projections)
            ),
            headers=BUNDLE_HEADERS,
        )
        np.testing.assert_allclose(logits_of(by_handle.json()), logits_of(by_json.json()), atol=1e-5)
        client.delete(f"/v1/inputs/{handle}")


def test_malformed_bundles_are_rejected_and_not_charged(live_server, engines):
    engine = engines("llama", budget=BUDGET)
    request = rich_request(engine)
    good = encode_bundle(request)
    document, buffers = decode_bundle(good)
    raw = [bytes(b) for b in buffers]
    soft_ref = "candidates.1.soft_prompt.ref"
    cases = [
        (b"LMB0" + good[4:], 400, None),
        (b"", 400, None),
        (good[:7], 400, None),
        (good[:-1], 400, None),
        (good[: 8 + len(document) + 2], 400, None),
        (good + b"\x00\x00", 400, None),
        (bundle(document, raw, lengths=[len(b) for b in raw[:-1]] + [2**40]), 400, None),
        (bundle(document, raw[:1]), 422, "candidates.2.soft_prompt.z.ref"),  # refs to missing buffers
        (bundle(document, [raw[0][:-4], *raw[1:]]), 422, soft_ref),  # a buffer of the wrong length
        (bundle(document, [raw[0] + b"\x00" * 4, *raw[1:]]), 422, soft_ref),
        (
            bundle(document, [np.full(len(raw[0]) // 4, np.inf, "<f4").tobytes(), *raw[1:]]),
            422,
            "candidates.1.soft_prompt.data",
        ),
        (bundle(b"{not json", []), 400, None),
        (bundle(b"[1, 2]", []), 400, None),
        (bundle(document.replace(b'"candidates"', b'"candidatez"'), raw), 422, "candidates"),
        (good, 415, None),  # a valid bundle sent as octet-stream: see headers below
    ]
    with live_server("llama", budget=BUDGET) as server, httpx.Client(base_url=server.url) as client:
        for i, (payload, status, param) in enumerate(cases):
            headers = {"content-type": "application/octet-stream"} if status == 415 else BUNDLE_HEADERS
            response = client.post("/v1/evaluate", content=payload, headers=headers)
            code = "unsupported_media_type" if status == 415 else "invalid_request"
            error = assert_error(response, status, code, param)
            if status == 400 and i < 7:
                assert "bundle" in error["message"], error
        # a JSON body may not use buffer references
        as_json = request.model_dump(mode="json", exclude_none=True)
        as_json["candidates"][1]["soft_prompt"] = {"dtype": "float32", "shape": [3, HIDDEN], "ref": 0}
        error = assert_error(client.post("/v1/evaluate", json=as_json), 422, "invalid_request", soft_ref)
        assert "bundle" in error["message"]
        # a JSON body sent with the bundle media type is a malformed bundle
        assert_error(
            client.post("/v1/evaluate", content=request.model_dump_json(), headers=BUNDLE_HEADERS),
            400,
            "invalid_request",
        )
        assert_error(client.post("/v1/inputs", content=b"LMB1", headers=BUNDLE_HEADERS), 400, "invalid_request")
        assert client.get("/v1/health").status_code == 200
        assert remaining_after_one_call(client, inputs_body(engine)) == BUDGET - 1


def test_bbt_population_upload_is_about_4d_bytes_per_candidate(live_server, engines):
    d = 500
    engine = engines("llama", budget=BUDGET)
    spec = ProjectionSpec(seed=7, scale=0.02, dim=d, shape=[5, HIDDEN])
    body = inputs_body(engine)

    def population(n: int, dtype: str) -> EvaluateRequest:
        return EvaluateRequest(
            template=body["template"],
            examples=[Example(**e) for e in body["examples"]],
            verbalizer=body["verbalizer"],
            projections={"bbt": spec},
            candidates=[
                Candidate(soft_prompt=Projected(z=Tensor.from_numpy(normal(i, d), dtype=dtype), projection="bbt"))
                for i in range(n)
            ],
        )

    for dtype, itemsize in (("float32", 4), ("float16", 2)):
        one, twenty = len(encode_bundle(population(1, dtype))), len(encode_bundle(population(20, dtype)))
        per_candidate = (twenty - one) / 19
        assert itemsize * d <= per_candidate <= itemsize * d + 256, (dtype, per_candidate)
        assert twenty <= 20 * (itemsize * d + 256) + one  # the fixed part: the examples, sent once
        json_per_candidate = (
            len(population(20, dtype).model_dump_json(exclude_none=True))
            - len(population(1, dtype).model_dump_json(exclude_none=True))
        ) / 19
        assert json_per_candidate > 1.3 * itemsize * d  # base64
    with live_server("llama", budget=BUDGET) as server, httpx.Client(base_url=server.url) as client:
        request = population(20, "float32")
        by_bundle = client.post("/v1/evaluate", content=encode_bundle(request), headers=BUNDLE_HEADERS)
        assert by_bundle.status_code == 200, by_bundle.text
        by_json = client.post(
            "/v1/evaluate",
            content=request.model_dump_json(exclude_none=True),
            headers={"content-type": "application/json"},
        )
        np.testing.assert_array_equal(logits_of(by_bundle.json()), logits_of(by_json.json()))
        assert by_bundle.json()["usage"]["budget_remaining"] == BUDGET - 20
