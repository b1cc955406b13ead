"""The wire protocol on its own (pydantic + numpy, no torch): tensor encoding, template parsing, error paths,
request validators, and that the client side never pulls in torch or transformers."""

from __future__ import annotations

import base64
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from pydantic import ValidationError

from lmaas_protocol import (
    HTTP_STATUS,
    Candidate,
    ErrorCode,
    ErrorResponse,
    EvaluateRequest,
    Example,
    FieldError,
    Segment,
    Tensor,
    TokenizeRequest,
    error_message,
    error_param,
    parse_template,
)
from lmaas_protocol.templates import MAX_TEMPLATE_CHARS, mask_ends_template, template_slots
from lmaas_protocol.tensors import MAX_TENSOR_ELEMENTS, WIRE_DTYPES


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def first_error(exc_info) -> dict:
    return exc_info.value.errors()[0]


# ----------------------------------------------------------------------------------------------- tensors

SAMPLES = {
    "float32": np.array([[0.0, -1.5, 3.25e-8], [1e30, -2.0, 7.0]], dtype=np.float32),
    "float16": np.array([[0.0, -1.5, 65504.0], [6.1e-5, -2.0, 7.0]], dtype=np.float16),
    "int32": np.array([[0, -1, 2**31 - 1], [-(2**31), 5, 7]], dtype=np.int32),
    "int64": np.array([[0, -1, 2**62], [-(2**63), 5, 7]], dtype=np.int64),
}


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_tensor_roundtrips_every_wire_dtype_through_json(dtype):
    array = SAMPLES[dtype]
    tensor = Tensor.from_numpy(array)
    assert tensor.dtype == dtype and tensor.shape == [2, 3]
    assert tensor.nbytes == array.nbytes == len(base64.b64decode(tensor.data))
    decoded = Tensor.model_validate_json(tensor.model_dump_json()).to_numpy()
    assert decoded.dtype == WIRE_DTYPES[dtype] and decoded.shape == (2, 3)
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize(
    ("dtype", "value", "raw"),
    [
        ("float32", 1.0, b"\x00\x00\x80\x3f"),
        ("float16", 1.0, b"\x00\x3c"),
        ("int32", 1, b"\x01\x00\x00\x00"),
        ("int64", 258, b"\x02\x01\x00\x00\x00\x00\x00\x00"),
        ("int32", -2, b"\xfe\xff\xff\xff"),
    ],
)
def test_tensor_bytes_are_explicitly_little_endian(dtype, value, raw):
    assert Tensor.from_numpy(np.array([value]), dtype=dtype).data == b64(raw)
    decoded = Tensor(dtype=dtype, shape=[1], data=b64(raw)).to_numpy()
    assert decoded.tolist() == [value]


def test_big_endian_input_is_encoded_little_endian():
    big = np.array([1.0, 2.0], dtype=">f4")
    tensor = Tensor.from_numpy(big)
    assert tensor.dtype == "float32"
    assert base64.b64decode(tensor.data) == b"\x00\x00\x80\x3f\x00\x00\x00\x40"


def test_tensor_from_numpy_casts_and_names_dtypes():
    assert Tensor.from_numpy(np.zeros(2, np.float64)).dtype == "float32"  # float64 has no wire dtype
    cast = Tensor.from_numpy(np.array([1, 2, 3]), dtype="float16")
    assert cast.dtype == "float16" and cast.to_numpy().tolist() == [1.0, 2.0, 3.0]
    empty = Tensor.from_numpy(np.zeros((0, 4), np.float32))
    assert empty.shape == [0, 4] and empty.data == "" and empty.to_numpy().shape == (0, 4)
    for unsupported in (np.zeros(2, bool), np.zeros(2, np.uint8), np.zeros(2, np.complex64)):
        with pytest.raises(ValueError, match="no wire encoding"):
            Tensor.from_numpy(unsupported)


def test_zero_dim_wire_tensors_decode_to_scalars():
    scalar = Tensor(dtype="float32", shape=[], data=b64(b"\x00\x00\x20\x40"))
    assert scalar.to_numpy().shape == () and scalar.to_numpy() == np.float32(2.5)


def test_zero_dim_arrays_roundtrip_with_an_empty_shape():
    scalar = Tensor.from_numpy(np.array(2.5, dtype=np.float32))
    assert scalar.shape == []
    assert scalar.to_numpy().shape == ()


def test_decoded_array_is_read_only():
    array = Tensor.from_numpy(np.ones((2, 2), np.float32)).to_numpy()
    assert not array.flags.writeable
    with pytest.raises(ValueError):
        array[0, 0] = 5.0


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_tensor_rejects_non_finite_floats(dtype, bad):
    raw = np.array([1.0, bad], dtype=WIRE_DTYPES[dtype]).tobytes()
    with pytest.raises(ValidationError) as caught:
        Tensor(dtype=dtype, shape=[2], data=b64(raw))
    assert error_param(first_error(caught)) == "data"
    assert error_message(first_error(caught)) == "contains NaN or Inf"


def test_integer_tensors_have_no_finiteness_check():
    raw = np.array([-1, 2**31 - 1], dtype="<i4").tobytes()  # bit patterns that would be NaN as floats
    assert Tensor(dtype="int32", shape=[2], data=b64(raw)).to_numpy().tolist() == [-1, 2**31 - 1]


@pytest.mark.parametrize(
    ("shape", "raw"),
    [([2], bytes(4)), ([2], bytes(12)), ([1, 3], bytes(8)), ([], b""), ([0], bytes(4))],
    ids=["short", "long", "2d-short", "scalar-empty", "empty-with-data"],
)
def test_tensor_rejects_length_mismatch(shape, raw):
    with pytest.raises(ValidationError) as caught:
        Tensor(dtype="float32", shape=shape, data=b64(raw))
    assert error_param(first_error(caught)) == "data"
    assert "bytes do not match shape" in error_message(first_error(caught))


@pytest.mark.parametrize(
    "data",
    ["!!!!", "AAA", "AAAA AAA=", "AAAA\nAAA=", "AA=A", "AAAAAAA\u00e9", "AAAA-_AA"],
    ids=["symbols", "bad-padding", "space", "newline", "inner-padding", "non-ascii", "urlsafe-alphabet"],
)
def test_tensor_rejects_bad_base64(data):
    with pytest.raises(ValidationError) as caught:
        Tensor(dtype="float32", shape=[1], data=data)
    assert error_param(first_error(caught)) == "data"
    assert "not valid base64" in error_message(first_error(caught))


@pytest.mark.parametrize("shape", [[-1], [2, -2], [-4, -1]])
def test_tensor_rejects_negative_dims(shape):
    with pytest.raises(ValidationError) as caught:
        Tensor(dtype="float32", shape=shape, data=b64(bytes(16)))
    assert error_param(first_error(caught)) == "shape"
    assert ">= 0" in error_message(first_error(caught))


def test_tensor_rejects_too_many_dims_elements_and_unknown_dtypes():
    with pytest.raises(ValidationError) as caught:
        Tensor(dtype="float32", shape=[1, 1, 1, 1, 1], data=b64(bytes(4)))
    assert error_param(first_error(caught)) == "shape"
    with pytest.raises(ValidationError) as caught:  # rejected from the shape alone, before decoding
        Tensor(dtype="float32", shape=[MAX_TENSOR_ELEMENTS + 1], data="")
    assert error_param(first_error(caught)) == "shape"
    with pytest.raises(ValidationError) as caught:
        Tensor(dtype="float64", shape=[1], data=b64(bytes(8)))
    assert error_param(first_error(caught)) == "dtype"
    with pytest.raises(ValidationError) as caught:
        Tensor(dtype="float32", shape=[1], data=b64(bytes(4)), order="F")
    assert error_param(first_error(caught)) == "order"


# ----------------------------------------------------------------------------------------------- templates

BBT_TEMPLATES = [
    "{text_a} . It was {mask} .",  # SST-2
    "It was {mask} . {text_a}",  # Yelp polarity
    "{mask} News: {text_a}",  # AG's News
    "[ Category: {mask} ] {text_a}",  # DBPedia
    "{text_a} ? {mask} , {text_b}",  # MRPC, RTE, SNLI
    "{prompt} . {text_a} . It was {mask} .",
    "{text_a} . {prompt} It was {mask} .",
    "{prompt}Review: {text_a}\nSentiment:{mask}",
    "{prompt} {text_a} ? {mask} , {text_b}",
]


@pytest.mark.parametrize("template", BBT_TEMPLATES)
def test_bbt_templates_parse(template):
    segments = parse_template(template)
    assert "".join(s.value if s.kind == "literal" else "{" + s.value + "}" for s in segments) == template
    assert {"text_a", "mask"} <= template_slots(template)


def test_template_segments_and_literal_braces():
    assert parse_template("{prompt} . {text_a} . It was {mask} .") == [
        Segment("slot", "prompt"),
        Segment("literal", " . "),
        Segment("slot", "text_a"),
        Segment("literal", " . It was "),
        Segment("slot", "mask"),
        Segment("literal", " ."),
    ]
    literal = parse_template("{{json}} {text_a} {mask}")
    assert literal[0] == Segment("literal", "{")
    assert "".join(s.value for s in literal if s.kind == "literal") == "{json}  "
    assert template_slots("{{text_b}} {text_a} {mask}") == {"text_a", "mask"}  # an escaped slot is literal text


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{text_a} {foo} {mask}", r"unknown slot \{foo\}"),
        ("{text_a} {} {mask}", "unknown slot"),
        ("{text_a} {0} {mask}", "unknown slot"),
        ("{text_a.upper} {mask}", "unknown slot"),
        ("{text_a[0]} {mask}", "unknown slot"),
        ("{TEXT_A} {mask}", "unknown slot"),
        ("{text_a} {mask} {mask}", r"\{mask\} exactly once \(found 2\)"),
        ("{text_a} it was", r"\{mask\} exactly once \(found 0\)"),
        ("{text_b} {mask}", r"must contain \{text_a\}"),
        ("{prompt} {text_a} {prompt} {mask}", r"\{prompt\} at most once \(found 2\)"),
        ("{text_a:>10} {mask}", "format spec"),
        ("{text_a} {mask:s}", "format spec"),
        ("{text_a!r} {mask}", "conversion"),
        ("{text_a} {mask", "malformed"),
        ("{text_a} } {mask}", "malformed"),
        ("{text_a} {mask}" + "x" * MAX_TEMPLATE_CHARS, "longer than"),
    ],
)
def test_bad_templates_are_rejected_with_a_reason(template, match):
    with pytest.raises(ValueError, match=match):
        parse_template(template)


@pytest.mark.parametrize(
    ("template", "ends"),
    [
        ("{prompt}Review: {text_a}\nSentiment:{mask}", True),
        ("{text_a} It was{mask}  \n", True),
        ("{text_a} . It was {mask} .", False),
        ("{mask} News: {text_a}", False),
        ("{text_a} {mask}{prompt}", False),
    ],
)
def test_mask_ends_template(template, ends):
    assert mask_ends_template(parse_template(template)) is ends


# ----------------------------------------------------------------------------------------------- error paths

LABELS = [[5], [6]]


def evaluate(**overrides) -> dict:
    body = {
        "template": "{prompt} . {text_a} . It was {mask} .",
        "examples": [{"text_a": "good", "label": 1}, {"text_a": "bad", "label": 0}],
        "verbalizer": LABELS,
        "candidates": [{}],
    }
    return {**body, **overrides}


def soft_prompt(rows: int = 2, cols: int = 4, fill: float = 0.5, dtype: str = "float32", shape=None) -> dict:
    raw = np.full((rows, cols), fill, dtype=WIRE_DTYPES[dtype]).tobytes()
    return {"dtype": dtype, "shape": shape if shape is not None else [rows, cols], "data": b64(raw)}


def params_of(body: dict) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        EvaluateRequest.model_validate(body)
    return [error_param(e) for e in caught.value.errors()]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # field validators: the field's own loc plus the FieldError's path, the field name not doubled
        (evaluate(template="{text_a} {foo} {mask}"), "template"),
        (evaluate(verbalizer=[[5], []]), "verbalizer.1"),
        (evaluate(verbalizer=[[5], [6, -1]]), "verbalizer.1.1"),
        # model validators of nested models: their location plus the FieldError's path
        (evaluate(candidates=[{}, {"soft_prompt": soft_prompt(fill=np.nan)}]), "candidates.1.soft_prompt.data"),
        (evaluate(candidates=[{"soft_prompt": soft_prompt(shape=[2, -4])}]), "candidates.0.soft_prompt.shape"),
        (
            evaluate(candidates=[{"soft_prompt": soft_prompt(rows=1, shape=[1, 1, 4])}]),
            "candidates.0.soft_prompt.shape",
        ),
        (evaluate(candidates=[{"soft_prompt": soft_prompt(dtype="int32")}]), "candidates.0.soft_prompt.dtype"),
        (evaluate(candidates=[{"prompt_token_ids": [1, -3]}]), "candidates.0.prompt_token_ids.1"),
        (
            evaluate(candidates=[{"prompt_token_ids": [1], "soft_prompt": soft_prompt()}]),
            "candidates.0.soft_prompt.shape",
        ),
        # the top-level model validator: only the FieldError's path
        (evaluate(examples=[{"text_a": "a", "label": 1}, {"text_a": "b"}]), "examples.1.label"),
        (evaluate(examples=[{"text_a": "a", "label": 0}, {"text_a": "b", "label": 2}]), "examples.1.label"),
        # pydantic's own errors
        (evaluate(foo=1), "foo"),
        ({k: v for k, v in evaluate().items() if k != "template"}, "template"),
        (evaluate(examples=[{"text_a": 3}]), "examples.0.text_a"),
        (evaluate(examples=[{"text_a": "a", "label": 256}]), "examples.0.label"),
        (evaluate(verbalizer=[[5], ["x"]]), "verbalizer.1.0"),
        (
            evaluate(candidates=[{"soft_prompt": {**soft_prompt(), "dtype": "bfloat16"}}]),
            "candidates.0.soft_prompt.dtype",
        ),
        (evaluate(candidates=[{"soft_prompt": {**soft_prompt(), "extra": 1}}]), "candidates.0.soft_prompt.extra"),
    ],
)
def test_error_param_names_the_bad_field(body, param):
    assert params_of(body)[0] == param


def test_error_param_drops_fastapis_body_prefix_and_message_prefers_the_reason():
    field = {
        "loc": ("body", "template"),
        "msg": "Value error, template: x",
        "ctx": {"error": FieldError("template", "x")},
    }
    assert error_param(field) == "template" and error_message(field) == "x"
    nested = {"loc": ("body", "candidates", 0), "ctx": {"error": FieldError("soft_prompt.shape", "bad")}}
    assert error_param(nested) == "candidates.0.soft_prompt.shape"
    model = {"loc": ("body",), "ctx": {"error": FieldError("examples.3.label", "bad")}}  # top-level model validator
    assert error_param(model) == "examples.3.label"
    plain = {"loc": ("body", "examples", 2, "text_a"), "msg": "Input should be a valid string", "type": "string_type"}
    assert error_param(plain) == "examples.2.text_a" and error_message(plain) == "Input should be a valid string"
    assert error_param({"loc": ("body",), "msg": "Field required"}) == ""
    assert error_message({}) == "invalid value"


def test_tokenize_request_names_the_over_long_text():
    with pytest.raises(ValidationError) as caught:
        TokenizeRequest(texts=["ok", "x" * 32_769])
    assert error_param(first_error(caught)) == "texts.1"
    with pytest.raises(ValidationError) as caught:
        TokenizeRequest(texts=[])
    assert error_param(first_error(caught)) == "texts"


# ----------------------------------------------------------------------------------------------- request validators


def test_labels_are_all_or_none():
    assert EvaluateRequest.model_validate(evaluate()).inline_inputs().has_labels
    unlabelled = evaluate(examples=[{"text_a": "a"}, {"text_a": "b"}])
    assert not EvaluateRequest.model_validate(unlabelled).inline_inputs().has_labels
    for examples, missing in (
        ([{"text_a": "a", "label": 0}, {"text_a": "b"}], "examples.1.label"),
        ([{"text_a": "a"}, {"text_a": "b", "label": 1}], "examples.0.label"),
    ):
        with pytest.raises(ValidationError, match="every example has a label or none") as caught:
            EvaluateRequest.model_validate(evaluate(examples=examples))
        assert error_param(first_error(caught)) == missing


def test_label_must_be_a_class_of_the_verbalizer():
    three = [[5], [6], [7]]
    assert EvaluateRequest.model_validate(evaluate(verbalizer=three, examples=[{"text_a": "a", "label": 2}]))
    with pytest.raises(ValidationError, match="not a class of the 2-class verbalizer") as caught:
        EvaluateRequest.model_validate(evaluate(examples=[{"text_a": "a", "label": 2}]))
    assert error_param(first_error(caught)) == "examples.0.label"
    with pytest.raises(ValidationError) as caught:
        EvaluateRequest.model_validate(evaluate(examples=[{"text_a": "a", "label": -1}]))
    assert error_param(first_error(caught)) == "examples.0.label"


def test_text_b_is_required_by_a_template_that_uses_it():
    pair = "{text_a} ? {mask} , {text_b}"
    ok = EvaluateRequest.model_validate(evaluate(template=pair, examples=[{"text_a": "a", "text_b": "b", "label": 0}]))
    assert ok.examples[0].text_b == "b"
    with pytest.raises(ValidationError, match=r"uses \{text_b\}") as caught:
        EvaluateRequest.model_validate(
            evaluate(template=pair, examples=[{"text_a": "a", "text_b": "", "label": 0}, {"text_a": "c", "label": 1}])
        )
    assert error_param(first_error(caught)) == "examples.1.text_b"
    # text_b without a {text_b} slot is allowed (and ignored)
    assert EvaluateRequest.model_validate(evaluate(examples=[{"text_a": "a", "text_b": "b"}]))


def test_a_prompt_needs_a_prompt_slot():
    no_slot = "{text_a} . It was {mask} ."
    # no prompt, or an empty one, is the manual-prompt baseline and needs no slot
    empty = {"soft_prompt": soft_prompt(rows=0)}
    assert EvaluateRequest.model_validate(evaluate(template=no_slot, candidates=[{}, {"prompt_token_ids": []}, empty]))
    for candidate in ({"prompt_token_ids": [5]}, {"soft_prompt": soft_prompt()}):
        with pytest.raises(ValidationError, match=r"no \{prompt\} slot") as caught:
            EvaluateRequest.model_validate(evaluate(template=no_slot, candidates=[{}, candidate]))
        assert error_param(first_error(caught)) == "candidates.1"


def test_candidate_prompt_length_and_shapes():
    assert Candidate().prompt_length() == 0
    assert Candidate(prompt_token_ids=[1, 2, 3]).prompt_length() == 3
    assert Candidate.model_validate({"soft_prompt": soft_prompt(rows=4)}).prompt_length() == 4
    both = Candidate.model_validate({"soft_prompt": soft_prompt(rows=2), "prompt_token_ids": [1, 2]})
    assert both.prompt_length() == 2
    with pytest.raises(ValidationError, match="2 prompt rows, but the prompt has 3 positions"):
        Candidate.model_validate({"soft_prompt": soft_prompt(rows=2), "prompt_token_ids": [1, 2, 3]})


def test_request_shape_limits():
    assert params_of(evaluate(verbalizer=[[5]]))[0] == "verbalizer"  # at least two classes
    assert params_of(evaluate(candidates=[]))[0] == "candidates"
    assert params_of(evaluate(examples=[]))[0] == "examples"
    assert params_of(evaluate(verbalizer=[[5], list(range(17))]))[0] == "verbalizer.1"
    assert params_of(evaluate(examples=[{"text_a": "x" * 32_769}]))[0] == "examples.0.text_a"


def test_every_error_code_has_one_status_and_the_error_shape_roundtrips():
    assert set(HTTP_STATUS) == set(ErrorCode)
    assert all(400 <= status < 600 for status in HTTP_STATUS.values())
    assert HTTP_STATUS[ErrorCode.INVALID_REQUEST] == 422 and HTTP_STATUS[ErrorCode.BUDGET_EXHAUSTED] == 402
    body = {
        "error": {"code": "budget_exhausted", "message": "m", "param": None, "request_id": "r", "details": {"a": 1}}
    }
    assert ErrorResponse.model_validate(body).model_dump(mode="json") == body
    with pytest.raises(ValidationError):
        ErrorResponse.model_validate({"error": {**body["error"], "code": "teapot"}})


def test_examples_forbid_unknown_fields():
    with pytest.raises(ValidationError) as caught:
        Example.model_validate({"text_a": "a", "txt_b": "b"})
    assert error_param(first_error(caught)) == "txt_b"


# ----------------------------------------------------------------------------------------------- no torch on the client side


def test_client_and_protocol_import_neither_torch_nor_transformers():
    script = textwrap.dedent(
        """
        import importlib.metadata as md
        import re
        import sys

        import lmaas_protocol, lmaas_runtime.errors, lmaas_runtime.source, lmaas_client, lmaas_client.cli, lmaas_client.run

        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        assert not heavy, heavy
        for dist in ("lmaas-client", "lmaas-protocol"):
            # the core dependencies; torch may appear only behind an extra (the client's optional `local`)
            core = [r for r in md.requires(dist) or [] if "extra ==" not in r]
            names = {re.split(r"[ ;<>=!~\\[(]", r, maxsplit=1)[0].lower() for r in core}
            assert "lmaas-protocol" in names or dist == "lmaas-protocol", (dist, names)
            assert "numpy" in names and "pydantic" in names, (dist, names)
            assert not names & {"torch", "transformers"}, (dist, names)
        print("clean")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"
