"""Input validation and the contract message formats."""
from __future__ import annotations

import base64
import json
import math

import numpy as np
import orjson
import pytest

from transport.schemas import (DEAD_LETTER_RAW_PREFIX, MAX_DEAD_LETTER_RAW_BYTES, MAX_REASON_CHARS,
                         InvalidEvent, decode_events, dead_letter_message, parse_event,
                         prediction_message, validate_event, validate_value,
                         value_prediction_message)

FEATURES = ["a", "b", "c"]
CLASSES = ["b", "s"]


def check(raw: bytes | None) -> object:
    return validate_event(parse_event(raw), FEATURES, CLASSES)


def test_features_by_name_in_any_order() -> None:
    e = check(b'{"id": "x1", "features": {"c": 3, "a": 1.5, "b": -999.0}, "label": "s", "ts": 5}')
    assert e.id == "x1" and e.label == "s" and e.ts == 5
    assert e.features.tolist() == [1.5, -999.0, 3.0]


def test_features_as_list_and_null_is_missing() -> None:
    e = check(b'{"id": "x2", "features": [1, null, 2]}')
    assert e.label is None and e.ts is None
    assert e.features[0] == 1.0 and math.isnan(e.features[1])


def test_integer_classes() -> None:
    e = validate_event({"id": "i", "features": [1, 2, 3], "label": 1}, FEATURES, [0, 1])
    assert e.label == 1
    with pytest.raises(InvalidEvent, match="unknown label"):
        validate_event({"id": "i", "features": [1, 2, 3], "label": "1"}, FEATURES, [0, 1])


MALFORMED = [
    (b"\xff\xfe not utf8", "not UTF-8"),
    (b"", "empty"),
    (None, "null value"),
    (b"{not json", "not JSON"),
    (b"[1, 2, 3]", "not a JSON object"),
    (b'{"features": [1, 2, 3]}', "missing field 'id'"),
    (b'{"id": 7, "features": [1, 2, 3]}', "'id' must be a string"),
    (b'{"id": "", "features": [1, 2, 3]}', "'id' must have"),
    (b'{"id": "x"}', "missing field 'features'"),
    (b'{"id": "x", "features": "1,2,3"}', "must be an object or a list"),
    (b'{"id": "x", "features": [1, 2]}', "has 2 values, the model expects 3"),
    (b'{"id": "x", "features": {"a": 1, "b": 2}}', "missing features 'c'"),
    (b'{"id": "x", "features": {"a": 1, "b": 2, "c": 3, "d": 4}}', "unknown features 'd'"),
    (b'{"id": "x", "features": [1, "two", 3]}', "feature 'b' is not a number"),
    (b'{"id": "x", "features": [1, true, 3]}', "feature 'b' is not a number"),
    (b'{"id": "x", "features": [1, 2, Infinity]}', "not JSON"),
    (b'{"id": "x", "features": [1, 2, 1e999]}', "number is infinity"),
    (b'{"id": "x", "features": [1, 2, 3], "label": "maybe"}', "unknown label"),
    (b'{"id": "x", "features": [1, 2, 3], "ts": "yesterday"}', "'ts' must be epoch"),
    (b'{"id": "x", "features": [1, 2, 3], "lable": "s"}', "unknown fields"),
]


@pytest.mark.parametrize("raw, reason", MALFORMED)
def test_malformed_event_has_a_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason.replace("(", r"\(")):
        check(raw)


def test_infinite_value_from_a_decoded_object() -> None:
    with pytest.raises(InvalidEvent, match="feature 'c' is infinite"):
        validate_event({"id": "x", "features": [1, 2, math.inf]}, FEATURES, CLASSES)


VALID = [
    b'{"id": "x1", "features": {"c": 3, "a": 1.5, "b": -999.0}, "label": "s", "ts": 5}',
    b'{"id": "x2", "features": [1, null, 2]}',
    b' {"id":"x3","features":[0,0,0],"label":null,"ts":null}\n',
    b'{"id": "x4", "features": {"a": 1, "a": 2, "b": 3, "c": 4}}',
    b'{"id": "x5", "features": [1, 2, 3], "ts": 9223372036854775808}',
    b'{"id": "%s", "features": [1, 2, 3]}' % (b"\xc3\xa9" * 256),
]


def test_a_micro_batch_decodes_as_validating_each_message_would() -> None:
    """The batch decoder is a fast path: its answer for every message is exactly what
    parse_event + validate_event give, valid rows in order and every reason word for word."""
    batch: list[bytes | None] = []
    for k, (raw, _) in enumerate(MALFORMED):
        batch += [VALID[k % len(VALID)], raw]
    columns = decode_events(batch, FEATURES, CLASSES)
    expected_rows, expected_rejected = [], []
    for i, raw in enumerate(batch):
        try:
            expected_rows.append((i, check(raw)))
        except InvalidEvent as exc:
            expected_rejected.append((i, str(exc)))
    assert columns.rejected == expected_rejected
    assert columns.positions == [i for i, _ in expected_rows]
    assert columns.ids == [e.id for _, e in expected_rows]
    assert columns.labels == [e.label for _, e in expected_rows]
    assert columns.ts == [e.ts for _, e in expected_rows]
    np.testing.assert_array_equal(columns.features,
                                  np.stack([e.features for _, e in expected_rows]))
    assert len(columns) == len(MALFORMED) and len(columns.rejected) == len(MALFORMED)


def test_a_micro_batch_of_one_feature_and_integer_classes() -> None:
    columns = decode_events([b'{"id": "a", "features": {"only": 2}, "label": 1}',
                             b'{"id": "b", "features": [3], "label": "1"}',
                             b'{"id": "c", "features": [true]}'], ["only"], [0, 1])
    assert columns.ids == ["a"] and columns.labels == [1]
    assert columns.features.tolist() == [[2.0]]
    assert [(i, r.split(";")[0]) for i, r in columns.rejected] == [
        (1, "unknown label '1'"), (2, "feature 'only' is not a number: True")]


REGRESSION_LABELS = [
    # (label as sent, what validation keeps, or the reason of its refusal)
    (b"2.5", 2.5, None),
    (b"-3", -3.0, None),
    (b"0", 0.0, None),
    (b"1e300", 1e300, None),
    (b"123456789012345678901234567890", 1.2345678901234568e29, None),
    (b"null", None, None),
    (b'"2.5"', None, "'label' must be a number for a regression model, got a string '2.5'"),
    (b"true", None, "'label' must be a number for a regression model, got a boolean True"),
    (b"[1]", None, "'label' must be a number for a regression model, got a list [1]"),
    (b"1e999", None, "not JSON"),
    (b"NaN", None, "not JSON"),
]


@pytest.mark.parametrize("label, kept, reason", REGRESSION_LABELS)
def test_a_regression_label_is_a_finite_number(label: bytes, kept: float | None,
                                               reason: str | None) -> None:
    raw = b'{"id": "r", "features": [1, 2, 3], "label": %s}' % label
    # The fast path of a micro-batch and the full validation agree, reason for reason.
    columns = decode_events([raw], FEATURES, [], task="regression")
    if reason is None:
        event = validate_event(parse_event(raw), FEATURES, [], task="regression")
        assert event.label == kept and columns.labels == [kept]
        assert kept is None or type(event.label) is float
    else:
        with pytest.raises(InvalidEvent) as caught:
            validate_event(parse_event(raw), FEATURES, [], task="regression")
        assert str(caught.value).startswith(reason)
        assert columns.rejected == [(0, str(caught.value))] and not columns.ids


def test_a_label_that_is_not_finite_is_refused_whatever_gave_it() -> None:
    """POST /predict items and other decoded values may hold floats JSON cannot."""
    for value in (math.nan, math.inf, -math.inf, 10 ** 400):
        with pytest.raises(InvalidEvent, match="'label' must be a finite number for a "
                                               "regression model"):
            validate_value({"id": "r", "features": [1, 2, 3], "label": value}, FEATURES, [],
                           "regression")
    # A classification's label is a class as before: a number is an unknown label there.
    with pytest.raises(InvalidEvent, match="unknown label 2.5"):
        validate_value({"id": "r", "features": [1, 2, 3], "label": 2.5}, FEATURES, CLASSES)
    with pytest.raises(ValueError, match="unknown task 'ranking'"):
        validate_value({"id": "r", "features": [1, 2, 3]}, FEATURES, CLASSES, "ranking")


def test_a_micro_batch_of_a_regression_keeps_its_numeric_labels_in_order() -> None:
    batch = [b'{"id": "a", "features": [1, 2, 3], "label": 4}',
             b'{"id": "b", "features": {"c": 1, "b": 2, "a": 3}}',
             b'{"id": "c", "features": [1, 2, 3], "label": "s"}',
             b'{"id": "d", "features": [1, 2, 3], "label": -0.125, "ts": 9}']
    columns = decode_events(batch, FEATURES, [], task="regression")
    assert columns.ids == ["a", "b", "d"] and columns.labels == [4.0, None, -0.125]
    assert columns.ts == [None, None, 9] and columns.positions == [0, 1, 3]
    assert [i for i, _ in columns.rejected] == [2]
    # The same messages for a classification: numbers are not its classes.
    columns = decode_events(batch, FEATURES, CLASSES)
    assert columns.ids == ["b", "c"] and columns.labels == [None, "s"]


def test_a_regression_prediction_is_a_number_without_probabilities() -> None:
    assert value_prediction_message("x", "v1+2", 41.5, 123) == {
        "id": "x", "model_version": "v1+2", "predicted": 41.5, "ts": 123}


def test_prediction_message_picks_most_probable() -> None:
    m = prediction_message("x", "v1", ["b", "s"], [0.25, 0.75], 123)
    assert m == {"id": "x", "model_version": "v1", "predicted": "s",
                 "probabilities": [0.25, 0.75], "ts": 123}


def test_dead_letter_keeps_original_bytes() -> None:
    m = dead_letter_message("not UTF-8", b"\xff\x00", "events", 2, 41)
    assert m["source"] == {"topic": "events", "partition": 2, "offset": 41}
    assert base64.b64decode(m["raw"]) == b"\xff\x00" and m["raw_encoding"] == "base64"
    text = dead_letter_message("bad", b'{"id": 1}', "events", 0, 0)
    assert json.loads(text["raw"]) == {"id": 1} and "raw_encoding" not in text


@pytest.mark.parametrize("field", ["features-list", "features-object", "label", "ts"])
def test_a_value_nested_a_thousand_deep_is_refused_not_a_recursion_error(field: str) -> None:
    """JSON allows 1,024 levels; repr() of a value nested that deep raised RecursionError,
    which stopped the serving loop at the same message on every restart."""
    deep = "[" * 1000 + "]" * 1000
    raw = {"features-list": '{"id": "x", "features": [%s, 1, 2]}' % deep,
           "features-object": '{"id": "x", "features": {"a": %s, "b": 1, "c": 2}}' % deep,
           "label": '{"id": "x", "features": [1, 2, 3], "label": %s}' % deep,
           "ts": '{"id": "x", "features": [1, 2, 3], "ts": %s}' % deep}[field].encode()
    with pytest.raises(InvalidEvent, match="nested too deeply to show"):
        check(raw)
    columns = decode_events([raw, VALID[0]], FEATURES, CLASSES)
    assert columns.positions == [1] and "nested too deeply" in columns.rejected[0][1]


@pytest.mark.parametrize("raw", [
    b'{"id": "x", "features": [1, 2, 3], "label": "%s"}' % (b"L" * 900_000),
    b'{"id": "x", "features": [1, 2, 3], "ts": "%s"}' % (b"9" * 900_000),
    b'{"id": "x", "features": {"a": 1, "b": 2, "c": 3, "%s": 4}}' % (b"f" * 900_000),
    b'{"id": "x", "features": [%s, 2, 3]}' % b",".join([b"[1]"] * 100_000),
    b'{"id": "x", "features": [1, 2, 3], %s}' % b", ".join(
        b'"f%d": 1' % i for i in range(10_000)),
])
def test_a_reason_quotes_a_huge_value_briefly(raw: bytes) -> None:
    with pytest.raises(InvalidEvent) as refused:
        check(raw)
    assert len(str(refused.value)) < 700


def test_validate_value_refuses_what_is_not_an_object() -> None:
    assert validate_value({"id": "v", "features": [1, 2, 3]}, FEATURES, CLASSES).id == "v"
    for value, kind in (([], "a list"), ("s", "a string"), (None, "null"), (1.5, "a number")):
        with pytest.raises(InvalidEvent, match=f"not a JSON object but {kind}"):
            validate_value(value, FEATURES, CLASSES)


@pytest.mark.parametrize("raw, encoding", [
    (b"\x01" * 950_000, None),  # each control character is quoted as six
    (bytes(range(128, 256)) * 7400, "base64"),  # base64 is a third longer
    ('{"id": "\u00e9\u00e9' + '\\"' * 450_000 + '"}', None),
])
def test_a_dead_letter_always_fits_in_a_kafka_message(raw: bytes | str, encoding: str | None
                                                      ) -> None:
    raw = raw.encode() if isinstance(raw, str) else raw
    m = dead_letter_message("not JSON", raw, "events", 1, 7)
    assert len(orjson.dumps(m)) <= MAX_DEAD_LETTER_RAW_BYTES + 1000
    assert m["raw_truncated"] is True and m["raw_size"] == len(raw)
    assert m.get("raw_encoding") == encoding
    kept = base64.b64decode(m["raw"]) if encoding else m["raw"].encode()
    assert raw.startswith(kept) and len(kept) > DEAD_LETTER_RAW_PREFIX - 4
    assert m["source"] == {"topic": "events", "partition": 1, "offset": 7}


def test_a_dead_letter_keeps_a_text_prefix_whole_characters() -> None:
    raw = "\u00e9".encode() * 600_000  # two bytes each: the prefix would split one
    m = dead_letter_message("bad", raw, "events", 0, 0)
    assert "raw_encoding" not in m and m["raw_truncated"]
    assert set(m["raw"]) == {"\u00e9"} and len(m["raw"]) == DEAD_LETTER_RAW_PREFIX // 2


def test_a_dead_letter_that_fits_is_whole_and_a_long_reason_is_cut() -> None:
    raw = b'{"id": "x", "pad": "%s"}' % (b"p" * 800_000)
    m = dead_letter_message("r" * 10_000, raw, "events", 0, 0)
    assert m["raw"].encode() == raw and "raw_truncated" not in m
    assert len(m["error"]) <= MAX_REASON_CHARS + 3
