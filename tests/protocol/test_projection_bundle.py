"""Server-side projections and binary bundles on the protocol side (pydantic + numpy, no torch): the pinned
random generator, bundle encoding and its error cases, and the validators of Projected / ProjectionSpec and
of the candidate's shapes, with the parameter paths they report."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
from pydantic import ValidationError

from lmaas_protocol import (
    BundleError,
    Candidate,
    EvaluateRequest,
    Example,
    LowRankOffset,
    Projected,
    ProjectionSpec,
    Tensor,
    decode_bundle,
    encode_bundle,
    error_message,
    error_param,
    materialize,
    parse_bundle,
    project,
)
from lmaas_protocol import projection as projection_module
from lmaas_protocol.bundle import MAGIC, MAX_BUFFERS
from lmaas_protocol.projection import (
    MAX_PROJECTION_DIM,
    MAX_PROJECTION_ELEMENTS,
    standard_normal_stream,
    uniform_stream,
)
from lmaas_protocol.schemas import MAX_PROJECTIONS

HIDDEN = 8


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def tensor(*shape: int, seed: int = 0, dtype: str = "float32") -> Tensor:
    return Tensor.from_numpy(np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32), dtype=dtype)


def wire(*shape: int, seed: int = 0, dtype: str = "float32") -> dict:
    return tensor(*shape, seed=seed, dtype=dtype).model_dump()


def spec_dict(**overrides) -> dict:
    return {"seed": 1, "scale": 1.0, "dim": 5, "shape": [2, HIDDEN], **overrides}


def body(candidates: list[dict], **overrides) -> dict:
    return {
        "template": "{prompt} . {text_a} . It was {mask} .",
        "examples": [{"text_a": "good", "label": 1}, {"text_a": "bad", "label": 0}],
        "verbalizer": [[5], [6]],
        "candidates": candidates,
        **overrides,
    }


def params_of(payload: dict, model=EvaluateRequest) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(payload)
    return [error_param(e) for e in caught.value.errors()]


def first_message(payload: dict, model=EvaluateRequest) -> str:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(payload)
    return error_message(caught.value.errors()[0])


# ----------------------------------------------------------------------------------------------- the generator

# Part of the protocol: computed once from the reference implementation; these must never change.
PINNED_NORMAL_FIRST6 = [
    0.904486894607544,
    0.02149300090968609,
    -0.8543219566345215,
    0.7425169348716736,
    -0.10007549077272415,
    -0.2243257462978363,
]
PINNED_NORMAL_3_7 = -0.15869061648845673
PINNED_UNIFORM_FIRST6 = [
    0.3282574713230133,
    -0.9924375414848328,
    0.05395367369055748,
    -0.22774937748908997,
    0.9405639171600342,
    0.3664308190345764,
]
PINNED_UNIFORM_3_7 = 0.9569197297096252
PINNED_STREAM_SEED7 = [
    1.9076370211776243,
    -1.1217424168066106,
    -0.48574112954970006,
    1.2745761515377911,
    1.7100023878423216,
]
PINNED_UNIFORM_SEED7 = [0.08640648681481006, 0.9153980962857293, 0.39445729105691935]


def test_materialize_is_pinned_by_a_test_vector():
    normal = materialize(ProjectionSpec(seed=1234, scale=1.0, dim=4, shape=[3, 5]))
    assert normal.dtype == np.float32 and normal.shape == (4, 15)
    np.testing.assert_array_equal(normal.reshape(-1)[:6], np.array(PINNED_NORMAL_FIRST6, dtype=np.float32))
    assert normal[3, 7] == np.float32(PINNED_NORMAL_3_7)
    uniform = materialize(ProjectionSpec(seed=1234, scale=1.0, dim=4, shape=[3, 5], distribution="uniform"))
    assert uniform.dtype == np.float32 and uniform.shape == (4, 15)
    np.testing.assert_array_equal(uniform.reshape(-1)[:6], np.array(PINNED_UNIFORM_FIRST6, dtype=np.float32))
    assert uniform[3, 7] == np.float32(PINNED_UNIFORM_3_7)
    # the float64 streams underneath (uniforms are pure integer arithmetic: exact everywhere)
    assert uniform_stream(7, 0, 3).tolist() == PINNED_UNIFORM_SEED7
    np.testing.assert_allclose(standard_normal_stream(7, 0, 5), PINNED_STREAM_SEED7, rtol=1e-13)


def test_materialize_is_deterministic_and_scaled_by_the_spec():
    spec = ProjectionSpec(seed=99, scale=1.0, dim=3, shape=[2, 7])
    first, second = materialize(spec), materialize(ProjectionSpec.model_validate(spec.model_dump()))
    np.testing.assert_array_equal(first, second)
    scaled = materialize(spec.model_copy(update={"scale": 0.25}))
    np.testing.assert_allclose(scaled, first * np.float32(0.25), rtol=1e-6)
    # element (i, j) uses counter i * prod(shape) + j: the flat stream times the scale
    np.testing.assert_array_equal(first.reshape(-1), standard_normal_stream(99, 0, 42).astype(np.float32))
    # so a smaller d is a prefix of the rows of a larger one (same shape)
    np.testing.assert_array_equal(materialize(spec.model_copy(update={"dim": 2})), first[:2])
    # the shape only fixes the width: [2, 7] and [14] give the same matrix
    np.testing.assert_array_equal(materialize(spec.model_copy(update={"shape": [14]})), first)


def test_different_seeds_and_distributions_differ():
    base = ProjectionSpec(seed=5, scale=1.0, dim=8, shape=[4, 4])
    a = materialize(base)
    b = materialize(base.model_copy(update={"seed": 6}))
    c = materialize(base.model_copy(update={"distribution": "uniform"}))
    assert not np.allclose(a, b) and not np.allclose(a, c)
    assert np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1] < 0.3
    big_seed = materialize(base.model_copy(update={"seed": 2**63 - 1}))  # the largest seed works
    assert np.isfinite(big_seed).all() and not np.allclose(big_seed, a)


@pytest.mark.parametrize("scale", [1.0, 0.02])
def test_normal_spec_has_mean_zero_and_std_scale(scale):
    values = materialize(ProjectionSpec(seed=3, scale=scale, dim=100, shape=[50, 40])).astype(np.float64)
    assert values.size == 200_000
    assert abs(values.mean()) < 0.01 * scale
    assert values.std() == pytest.approx(scale, rel=0.01)
    assert np.abs(values).max() > 3.5 * scale  # tails, not a clipped or uniform distribution
    assert abs(((values / scale) ** 4).mean() - 3.0) < 0.1  # Gaussian kurtosis


@pytest.mark.parametrize("scale", [1.0, 3.5])
def test_uniform_spec_fills_the_open_interval(scale):
    values = materialize(ProjectionSpec(seed=4, scale=scale, dim=100, shape=[2000], distribution="uniform"))
    values = values.astype(np.float64)
    assert np.all(values > -scale) and np.all(values < scale)
    assert values.min() < -0.999 * scale and values.max() > 0.999 * scale
    assert abs(values.mean()) < 0.01 * scale
    assert values.std() == pytest.approx(scale / np.sqrt(3), rel=0.01)
    counts, _ = np.histogram(values, bins=10, range=(-scale, scale))
    assert counts.min() > 0.9 * values.size / 10


@pytest.mark.parametrize(("start", "count"), [(0, 1), (1, 1), (1, 2), (2, 5), (3, 6), (7, 0), (10, 11), (999, 4)])
def test_normal_stream_is_counter_based(start, count):
    """Any start offset, odd or even, gives the same values as a slice of one long stream."""
    long = standard_normal_stream(11, 0, 1100)
    part = standard_normal_stream(11, start, count)
    assert part.shape == (count,)
    np.testing.assert_array_equal(part, long[start : start + count])
    np.testing.assert_array_equal(uniform_stream(11, start, count), uniform_stream(11, 0, 1100)[start : start + count])


def test_materialize_does_not_depend_on_its_chunking(monkeypatch):
    spec = ProjectionSpec(seed=21, scale=0.5, dim=3, shape=[5, 7])
    whole = materialize(spec)
    for chunk in (7, 8, 1, 104):  # odd chunks start Box-Muller pairs in the middle
        monkeypatch.setattr(projection_module, "CHUNK", chunk)
        np.testing.assert_array_equal(materialize(spec), whole)
    monkeypatch.setattr(projection_module, "CHUNK", 7)
    uniform = spec.model_copy(update={"distribution": "uniform"})
    expected = ((2.0 * uniform_stream(21, 0, 105) - 1.0) * 0.5).astype(np.float32).reshape(3, 35)
    np.testing.assert_array_equal(materialize(uniform), expected)


def test_project_is_z_times_a_reshaped():
    spec = ProjectionSpec(seed=8, scale=0.1, dim=6, shape=[3, 4])
    matrix = materialize(spec)
    z = np.arange(6, dtype=np.float64) - 2.5
    out = project(z, matrix, spec)
    assert out.dtype == np.float32 and out.shape == (3, 4)
    np.testing.assert_allclose(out, (z.astype(np.float32) @ matrix).reshape(3, 4), rtol=1e-6)
    np.testing.assert_allclose(out.reshape(-1), sum(z[i] * matrix[i] for i in range(6)), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- bundles


def rich_request() -> EvaluateRequest:
    named = ProjectionSpec(seed=2, scale=0.5, dim=10, shape=[3, HIDDEN])
    inline = ProjectionSpec(seed=3, scale=0.1, dim=4, shape=[3, HIDDEN], distribution="uniform")
    offset = LowRankOffset(
        a=tensor(6, 2, seed=4), b=Projected(z=tensor(4, seed=5), projection=spec_like(4, [2, HIDDEN]))
    )
    return EvaluateRequest(
        template="{prompt} . {text_a} . It was {mask} .",
        examples=[Example(text_a="good", label=1), Example(text_a="bad", label=0)],
        verbalizer=[[5], [6, 7]],
        projections={"bbt": named},
        candidates=[
            Candidate(),
            Candidate(prompt_token_ids=[1, 2, 3], soft_prompt=tensor(3, HIDDEN, seed=1)),
            Candidate(soft_prompt=Projected(z=tensor(10, seed=6), projection="bbt")),
            Candidate(
                deep_prompt=[
                    None,
                    Projected(z=tensor(4, seed=7, dtype="float16"), projection=inline),
                    tensor(3, HIDDEN, seed=8),
                ]
            ),
            Candidate(prompt_token_ids=[4, 5, 6], embedding_offset=offset),
        ],
    )


def spec_like(dim: int, shape: list[int]) -> ProjectionSpec:
    return ProjectionSpec(seed=dim, scale=1.0, dim=dim, shape=shape)


def all_tensors(request: EvaluateRequest) -> list[Tensor]:
    found = []
    for candidate in request.candidates:
        for _, value in candidate.prompt_tensors():
            found.append(value.z if isinstance(value, Projected) else value)
    return found


def test_bundle_roundtrips_a_request_with_inline_and_projected_tensors():
    request = rich_request()
    encoded = encode_bundle(request)
    assert encoded[:4] == MAGIC == b"LMB1"
    document, buffers = decode_bundle(encoded)
    tensors = all_tensors(request)
    assert len(buffers) == len(tensors) == 6  # one raw buffer per tensor, in order
    for buffer, original in zip(buffers, tensors, strict=True):
        assert bytes(buffer) == original.to_numpy().tobytes()
    parsed_document = json.loads(document)
    assert parsed_document["candidates"][1]["soft_prompt"] == {"dtype": "float32", "shape": [3, HIDDEN], "ref": 0}
    assert "data" not in document.decode()  # no base64 anywhere
    decoded = parse_bundle(encoded, EvaluateRequest)
    assert decoded.model_dump_json() == request.model_dump_json()
    for got, want in zip(all_tensors(decoded), tensors, strict=True):
        assert got == want and got.dtype == want.dtype
    assert decoded.candidates[3].deep_prompt[1].z.dtype == "float16"
    assert decoded.projections["bbt"] == request.projections["bbt"]
    assert decoded.candidates[2].soft_prompt.projection == "bbt"
    # the bundle of a decoded bundle is the same bytes
    assert encode_bundle(decoded) == encoded


def test_json_of_a_request_roundtrips_too():
    request = rich_request()
    again = EvaluateRequest.model_validate_json(request.model_dump_json(exclude_none=True))
    assert again.model_dump_json() == request.model_dump_json()


def test_bundle_is_smaller_than_json_for_the_same_request():
    request = rich_request()
    assert len(encode_bundle(request)) < len(request.model_dump_json(exclude_none=True).encode())
    big = EvaluateRequest(
        template="{prompt}{text_a}{mask}",
        examples=[Example(text_a="x")],
        verbalizer=[[1], [2]],
        candidates=[Candidate(soft_prompt=tensor(50, 64, seed=s)) for s in range(4)],
    )
    bundle_size, json_size = len(encode_bundle(big)), len(big.model_dump_json(exclude_none=True).encode())
    raw = 4 * 50 * 64 * 4
    assert raw < bundle_size < raw + 1024
    assert bundle_size < 0.8 * json_size  # base64's third is gone


def test_a_request_without_tensors_is_a_bundle_with_no_buffers():
    request = EvaluateRequest.model_validate(body([{}, {"prompt_token_ids": [1, 2]}]))
    document, buffers = decode_bundle(encode_bundle(request))
    assert buffers == []
    assert EvaluateRequest.model_validate_json(document) == request


def bundle_of(document: bytes, buffers: list[bytes], lengths: list[int] | None = None) -> bytes:
    lengths = [len(b) for b in buffers] if lengths is None else lengths
    return b"".join(
        [MAGIC, struct.pack("<I", len(document)), document, struct.pack("<I", len(lengths)),
         struct.pack(f"<{len(lengths)}Q", *lengths), *buffers]
    )  # fmt: skip


def test_decode_bundle_accepts_the_minimal_bundle():
    assert decode_bundle(bundle_of(b"", [])) == (b"", [])
    document, buffers = decode_bundle(bundle_of(b"{}", [b"abc", b"", b"12345678"]))
    assert document == b"{}" and [bytes(b) for b in buffers] == [b"abc", b"", b"12345678"]


GOOD = bundle_of(b'{"a": 1}', [b"x" * 8, b"y" * 4])
BAD_BUNDLES = {
    "empty": (b"", "LMB1"),
    "short": (b"LMB1\x00\x00", "LMB1"),
    "bad-magic": (b"LMB2" + GOOD[4:], "LMB1"),
    "json-magic": (b'{"template": "x"}', "LMB1"),
    "json-length-too-long": (MAGIC + struct.pack("<I", 10_000) + GOOD[8:], "inside its JSON"),
    "truncated-in-json": (GOOD[:12], "inside its JSON"),
    "truncated-in-count": (GOOD[: 8 + 8 + 2], "inside its JSON"),
    "truncated-in-lengths": (GOOD[: 8 + 8 + 4 + 12], "do not fit"),
    "truncated-in-buffer": (GOOD[:-1], "truncated inside a buffer"),
    "trailing-bytes": (GOOD + b"\x00", "1 trailing bytes"),
    "huge-count": (MAGIC + struct.pack("<I", 2) + b"{}" + struct.pack("<I", 2**32 - 1), "buffers"),
    "too-many-buffers": (bundle_of(b"{}", [b""] * (MAX_BUFFERS + 1)), "buffers"),
    "buffer-length-beyond-body": (bundle_of(b"{}", [b"abc"], lengths=[2**63]), "truncated inside a buffer"),
}


@pytest.mark.parametrize(("payload", "match"), BAD_BUNDLES.values(), ids=BAD_BUNDLES.keys())
def test_decode_bundle_rejects_malformed_bodies(payload, match):
    with pytest.raises(BundleError, match=match):
        decode_bundle(payload)
    with pytest.raises(BundleError):
        parse_bundle(payload, EvaluateRequest)


def test_bundle_refs_are_checked_like_inline_data():
    request = EvaluateRequest.model_validate(body([{"soft_prompt": wire(2, HIDDEN)}]))
    document, buffers = decode_bundle(encode_bundle(request))
    raw = bytes(buffers[0])
    cases = {
        "missing buffer": (bundle_of(document, []), "candidates.0.soft_prompt.ref", "does not exist"),
        "short buffer": (bundle_of(document, [raw[:-4]]), "candidates.0.soft_prompt.ref", "bytes do not match"),
        "long buffer": (bundle_of(document, [raw + bytes(4)]), "candidates.0.soft_prompt.ref", "bytes do not match"),
        "nan": (
            bundle_of(document, [np.full((2, HIDDEN), np.nan, np.float32).tobytes()]),
            "candidates.0.soft_prompt.data",
            "NaN",
        ),
    }
    for name, (payload, param, match) in cases.items():
        with pytest.raises(ValidationError) as caught:
            parse_bundle(payload, EvaluateRequest)
        error = caught.value.errors()[0]
        assert error_param(error) == param, name
        assert match in error_message(error), name
    both = document.replace(b'"ref":0', b'"ref":0,"data":""')
    with pytest.raises(ValidationError) as caught:
        parse_bundle(bundle_of(both, [raw]), EvaluateRequest)
    assert error_param(caught.value.errors()[0]) == "candidates.0.soft_prompt.data"
    # an unused extra buffer is harmless
    assert parse_bundle(bundle_of(document, [raw, b"spare"]), EvaluateRequest).candidates[0].soft_prompt.shape == [
        2,
        HIDDEN,
    ]


def test_a_ref_outside_a_bundle_is_rejected_naming_the_field():
    payload = body([{}, {"soft_prompt": {"dtype": "float32", "shape": [2, HIDDEN], "ref": 0}}])
    assert params_of(payload)[0] == "candidates.1.soft_prompt.ref"
    assert "bundle" in first_message(payload)
    negative = body([{"soft_prompt": {"dtype": "float32", "shape": [2, HIDDEN], "ref": -1}}])
    assert params_of(negative)[0] == "candidates.0.soft_prompt.ref"


# ----------------------------------------------------------------------------------------------- projected tensors


def projected(dim: int = 5, projection="p", z_shape=None, dtype: str = "float32", **spec) -> dict:
    z = wire(*(z_shape or [dim]), dtype=dtype)
    return {"z": z, "projection": projection if projection != "inline" else spec_dict(dim=dim, **spec)}


@pytest.mark.parametrize("where", ["inline", "named"])
def test_z_must_have_the_projections_dim(where):
    spec = {"p": spec_dict(dim=5)}
    bad = projected(dim=5, z_shape=[4], projection="inline" if where == "inline" else "p")
    assert params_of(body([{"soft_prompt": bad}], projections=spec))[0] == "candidates.0.soft_prompt.z.shape"
    assert params_of(body([{}, {"deep_prompt": [None, bad]}], projections=spec))[0] == (
        "candidates.1.deep_prompt.1.z.shape"
    )
    offset = {"a": bad, "b": wire(2, HIDDEN)}
    assert params_of(body([{"embedding_offset": offset}], projections=spec))[0] == (
        "candidates.0.embedding_offset.a.z.shape"
    )
    assert "must be [5]" in first_message(body([{"soft_prompt": bad}], projections=spec))


@pytest.mark.parametrize(
    ("z", "reason"),
    [
        ({"dtype": "int32", "shape": [5], "data": b64(bytes(20))}, "1-D float"),
        ({"dtype": "int64", "shape": [5], "data": b64(bytes(40))}, "1-D float"),
        ({"dtype": "float32", "shape": [5, 1], "data": b64(bytes(20))}, "1-D float"),
        ({"dtype": "float32", "shape": [], "data": b64(bytes(4))}, "1-D float"),
    ],
    ids=["int32", "int64", "2-d", "scalar"],
)
def test_z_must_be_a_1d_float_vector(z, reason):
    payload = body([{"soft_prompt": {"z": z, "projection": spec_dict()}}])
    assert params_of(payload)[0] == "candidates.0.soft_prompt.z"
    assert reason in first_message(payload)


def test_float16_z_is_accepted():
    request = EvaluateRequest.model_validate(body([{"soft_prompt": projected(dtype="float16", projection="inline")}]))
    assert request.candidates[0].soft_prompt.z.dtype == "float16"
    assert request.candidates[0].prompt_length() == 2


def test_unknown_projection_names_are_rejected_naming_the_projection():
    assert params_of(body([{"soft_prompt": projected(projection="nope")}]))[0] == "candidates.0.soft_prompt.projection"
    with_other = body([{}, {"deep_prompt": [projected(projection="nope")]}], projections={"p": spec_dict()})
    assert params_of(with_other)[0] == "candidates.1.deep_prompt.0.projection"
    assert "no projection named 'nope'" in first_message(with_other)
    offset = {"a": wire(4, 2), "b": projected(projection="missing")}
    assert params_of(body([{"embedding_offset": offset}]))[0] == "candidates.0.embedding_offset.b.projection"


def test_named_and_inline_specs_give_the_same_prompt_length_and_checks():
    spec = spec_dict(dim=5, shape=[3, HIDDEN])
    named = EvaluateRequest.model_validate(body([{"soft_prompt": projected(projection="p")}], projections={"p": spec}))
    inline = EvaluateRequest.model_validate(body([{"soft_prompt": {"z": wire(5), "projection": spec}}]))
    assert named.candidates[0].uses_named_projections and not inline.candidates[0].uses_named_projections
    assert named.candidates[0].prompt_length(named.projections) == inline.candidates[0].prompt_length() == 3
    # token ids must agree with the named spec's rows too (checked by the request, which knows the names)
    mismatch = body([{"prompt_token_ids": [1, 2], "soft_prompt": projected(projection="p")}], projections={"p": spec})
    assert params_of(mismatch)[0] == "candidates.0.soft_prompt.shape"


def test_projection_spec_fields_are_validated():
    for field, value in [("dim", 0), ("dim", MAX_PROJECTION_DIM + 1), ("scale", 0), ("scale", -1.0), ("scale", 1e7),
                         ("seed", -1), ("seed", 2**63), ("distribution", "cauchy"), ("shape", []), ("shape", [1, 1, 1, 1])]:  # fmt: skip
        assert params_of(spec_dict(**{field: value}), ProjectionSpec)[0] == field, (field, value)
    for shape in ([0, 4], [2, 0], [-1, 4]):
        assert params_of(spec_dict(shape=shape), ProjectionSpec)[0] == "shape"
        assert ">= 1" in first_message(spec_dict(shape=shape), ProjectionSpec)
    assert params_of({**spec_dict(), "extra": 1}, ProjectionSpec)[0] == "extra"
    assert params_of({"seed": 1, "dim": 5, "shape": [2, 8]}, ProjectionSpec)[0] == "scale"  # scale is required
    spec = ProjectionSpec.model_validate(spec_dict(shape=[2, 3, 4]))
    assert spec.width == 24 and spec.elements == 5 * 24 and spec.distribution == "normal"


def test_a_projected_prompt_must_be_two_dimensional():
    payload = body([{"soft_prompt": {"z": wire(5), "projection": spec_dict(shape=[16])}}])
    assert params_of(payload)[0] == "candidates.0.soft_prompt.shape"
    assert "2-D" in first_message(payload)


@pytest.mark.parametrize(
    "spec", [spec_dict(shape=[2, 0]), spec_dict(dim=0), spec_dict(scale=0)], ids=["shape", "dim", "scale"]
)
def test_inline_spec_errors_name_the_spec_field(spec):
    field = next(k for k in ("shape", "dim", "scale") if spec[k] != spec_dict()[k])
    params = params_of(body([{"soft_prompt": {"z": wire(5), "projection": spec}}]))
    assert params == [f"candidates.0.soft_prompt.projection.{field}"]


def test_projections_dict_is_bounded():
    many = {f"p{i}": spec_dict() for i in range(MAX_PROJECTIONS + 1)}
    assert params_of(body([{}], projections=many))[0] == "projections"
    exactly = {f"p{i}": spec_dict() for i in range(MAX_PROJECTIONS)}
    assert len(EvaluateRequest.model_validate(body([{}], projections=exactly)).projections) == MAX_PROJECTIONS
    assert params_of(body([{}], projections={"p": spec_dict(dim=0)}))[0] == "projections.p.dim"


def test_projection_elements_have_a_protocol_ceiling():
    with pytest.raises(ValidationError):
        ProjectionSpec(seed=0, scale=1.0, dim=MAX_PROJECTION_DIM, shape=[4096, 4096])
    assert MAX_PROJECTION_DIM * 4096 * 4096 > MAX_PROJECTION_ELEMENTS


# ----------------------------------------------------------------------------------------------- candidate shapes


def test_prompt_rows_must_agree_across_token_ids_soft_and_deep_prompts():
    cases = {
        "candidates.0.soft_prompt.shape": {"prompt_token_ids": [1, 2], "soft_prompt": wire(3, HIDDEN)},
        "candidates.0.deep_prompt.1.shape": {"prompt_token_ids": [1, 2], "deep_prompt": [None, wire(3, HIDDEN)]},
        "candidates.0.deep_prompt.0.shape": {"soft_prompt": wire(2, HIDDEN), "deep_prompt": [wire(3, HIDDEN)]},
        "candidates.0.deep_prompt.2.shape": {"deep_prompt": [wire(2, HIDDEN), None, wire(4, HIDDEN)]},
    }
    for param, candidate in cases.items():
        assert params_of(body([candidate]))[0] == param, candidate
        assert "prompt rows" in first_message(body([candidate]))
    ok = Candidate.model_validate(
        {"prompt_token_ids": [1, 2], "soft_prompt": wire(2, HIDDEN), "deep_prompt": [None, wire(2, HIDDEN), None]}
    )
    assert ok.prompt_length() == 2
    assert Candidate.model_validate({"deep_prompt": [None, None]}).prompt_length() == 0
    assert Candidate.model_validate({"deep_prompt": [None, wire(4, HIDDEN)]}).prompt_length() == 4
    # the offset's rows are example positions, not prompt positions: they need not agree
    assert (
        Candidate.model_validate(
            {"prompt_token_ids": [1], "embedding_offset": {"a": wire(7, 2), "b": wire(2, HIDDEN)}}
        ).prompt_length()
        == 1
    )


def test_embedding_offset_factors_must_chain():
    assert params_of(body([{"embedding_offset": {"a": wire(4, 2), "b": wire(3, HIDDEN)}}]))[0] == (
        "candidates.0.embedding_offset.b.shape"
    )
    assert "rank" in first_message(body([{"embedding_offset": {"a": wire(4, 2), "b": wire(3, HIDDEN)}}]))
    assert params_of(body([{"embedding_offset": {"a": wire(4, 2, 1), "b": wire(2, HIDDEN)}}]))[0] == (
        "candidates.0.embedding_offset.a.shape"
    )
    assert params_of(body([{"embedding_offset": {"a": wire(4), "b": wire(2, HIDDEN)}}]))[0] == (
        "candidates.0.embedding_offset.a.shape"
    )
    assert params_of(body([{"embedding_offset": {"a": wire(4, 2)}}]))[0] == "candidates.0.embedding_offset.b"
    assert params_of(body([{"embedding_offset": {"a": wire(4, 2), "b": wire(2, HIDDEN), "scale": 1e7}}]))[0] == (
        "candidates.0.embedding_offset.scale"
    )
    int_a = {"dtype": "int32", "shape": [4, 2], "data": b64(bytes(32))}
    assert params_of(body([{"embedding_offset": {"a": int_a, "b": wire(2, HIDDEN)}}]))[0] == (
        "candidates.0.embedding_offset.a.dtype"
    )
    ok = LowRankOffset.model_validate({"a": wire(4, 2), "b": wire(2, HIDDEN)})
    assert ok.scale == 1.0


def test_prompt_tensors_must_agree_on_the_hidden_size():
    cases = [
        {"soft_prompt": wire(2, HIDDEN), "deep_prompt": [None, wire(2, HIDDEN // 2)]},
        {"deep_prompt": [wire(2, HIDDEN), wire(2, HIDDEN // 2)]},
        {"soft_prompt": wire(2, HIDDEN), "embedding_offset": {"a": wire(4, 2), "b": wire(2, HIDDEN + 1)}},
    ]
    for candidate in cases:
        with pytest.raises(ValidationError, match=r"hidden size .* differs from"):
            EvaluateRequest.model_validate(body([candidate]))
        assert params_of(body([{}, candidate]))[0].startswith("candidates.1")
    # with a named projection the request checks it
    named = body([{"soft_prompt": wire(2, HIDDEN // 2), "deep_prompt": [None, projected(projection="p")]}],
                 projections={"p": spec_dict()})  # fmt: skip
    assert params_of(named)[0].startswith("candidates.0")
    assert "differs from" in first_message(named)


def test_hidden_size_disagreement_param_does_not_depend_on_the_projection_form():
    inline = body([{"deep_prompt": [wire(2, HIDDEN), wire(2, HIDDEN // 2)]}])
    named = body([{"deep_prompt": [projected(projection="p"), wire(2, HIDDEN // 2)]}], projections={"p": spec_dict()})
    assert params_of(inline)[0] == params_of(named)[0]
    assert params_of(inline)[0] != "candidates.0.soft_prompt"  # the candidate has no soft_prompt


def test_deep_prompt_list_bounds_and_entries():
    assert params_of(body([{"deep_prompt": []}]))[0] == "candidates.0.deep_prompt"
    assert params_of(body([{"deep_prompt": [None, {"dtype": "float32", "shape": [1, HIDDEN], "data": "!"}]}]))[0] == (
        "candidates.0.deep_prompt.1.data"
    )
    assert params_of(body([{"deep_prompt": [None, {**wire(2, HIDDEN), "dtype": "int32"}]}]))[0].startswith(
        "candidates.0.deep_prompt.1"
    )
    assert params_of(body([{"soft_prompt": {"z": wire(5)}}]))[0] == "candidates.0.soft_prompt.projection"
    assert params_of(body([{"soft_prompt": {"projection": spec_dict()}}]))[0] == "candidates.0.soft_prompt.z"


def test_a_request_without_a_prompt_slot_rejects_projected_prompts_and_offsets():
    no_slot = "{text_a} . It was {mask} ."
    for candidate in (
        {"soft_prompt": projected(projection="p")},
        {"deep_prompt": [None, projected(projection="p")]},
        {"embedding_offset": {"a": wire(4, 2), "b": wire(2, HIDDEN)}},
    ):
        payload = body([{}, candidate], template=no_slot, projections={"p": spec_dict()})
        assert params_of(payload)[0] == "candidates.1"
    assert EvaluateRequest.model_validate(body([{"deep_prompt": [None, None]}], template=no_slot))
