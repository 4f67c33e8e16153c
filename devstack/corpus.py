"""Hostile input for the serving path: Kafka records no well-behaved producer would write.

Shared by ``tests/test_hostile.py`` and ``bench/hostile.py``. Each :class:`HostileRecord` is
one record of the input topic (key and value as raw bytes, either may be null). A *malformed*
record is one the event schema of docs/contract.md refuses (as :func:`transport.schemas.validate_event`
words it): it must reach the dead-letter topic with a reason and nothing else. An *edge*
record is unusual but valid: it must get exactly one prediction, for :attr:`expect_id`.

Records are built for a model's ``features`` and ``classes`` (a wrong feature count or an
unknown label depends on them) and carry ``tag`` in every id they hold, so that a run can tell
its records from any other's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["HostileRecord", "malformed_records", "edge_records", "hostile_records",
           "NEAR_MAX_BYTES", "DEEP"]

#: Size of the largest records: close to the broker's default limit on a message
#: (``message.max.bytes``, 1,000,012 bytes), under librdkafka's own (1,000,000).
NEAR_MAX_BYTES = 950_000
#: Nesting depth of the deeply nested records.
DEEP = 10_000


@dataclass(frozen=True)
class HostileRecord:
    """One input record and what serving must make of it."""

    kind: str
    key: bytes | None
    value: bytes | None
    #: The id of the one prediction a valid record gets; None: it must be dead-lettered.
    expect_id: str | None = None

    @property
    def malformed(self) -> bool:
        return self.expect_id is None


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def malformed_records(features: Sequence[str], classes: Sequence[Any],
                      tag: str) -> list[HostileRecord]:
    """Every kind of record the event schema refuses, one record each."""
    n = len(features)
    good = [1.5] * n
    by_name = {name: 1.0 for name in features}

    def event(kind: str, **fields: Any) -> bytes:
        return _dumps({"id": f"{tag}-{kind}", "features": good, **fields})

    def text(kind: str, template: str) -> bytes:
        # An event written by hand, for what json.dumps cannot write.
        return template.replace("ID", f"{tag}-{kind}").replace(
            "FEATURES", json.dumps(good)).encode()

    def number_at_last(kind: str, literal: str) -> bytes:
        return text(kind, '{"id": "ID", "features": [' + ", ".join(["1"] * (n - 1) + [literal])
                    + "]}")

    def with_features(kind: str, value: Any) -> bytes:
        return _dumps({"id": f"{tag}-{kind}", "features": value})

    deep = "[" * DEEP + "]" * DEEP
    cases: list[tuple[str, bytes | None, Callable[[str], bytes | None]]] = [
        # -- not a JSON object at all
        ("empty_value", b"k", lambda k: b""),
        ("whitespace_only", b"k", lambda k: b" \n\t\r "),
        ("tombstone", b"k", lambda k: None),
        ("tombstone_without_key", None, lambda k: None),
        ("not_utf8", b"k", lambda k: b"\xff\xfe\xfa not UTF-8 " + k.encode()),
        ("utf16_json", b"k", lambda k: json.dumps({"id": f"{tag}-{k}",
                                                    "features": good}).encode("utf-16")),
        ("utf8_bom", b"k", lambda k: b"\xef\xbb\xbf" + event(k)),
        ("encoded_surrogate_bytes", b"k",
         lambda k: b'{"id": "\xed\xa0\x80' + f'{tag}-{k}'.encode() + b'", "features": '
         + _dumps(good) + b"}"),
        ("overlong_utf8", b"k", lambda k: event(k).replace(b'"id"', b'"i\xc0\xe4"')),
        ("truncated_json", b"k", lambda k: event(k)[:-3]),
        ("plain_text", b"k", lambda k: f"hello {k}".encode()),
        ("json_list", b"k", lambda k: _dumps([f"{tag}-{k}", good])),
        ("json_string", b"k", lambda k: _dumps(f"{tag}-{k}")),
        ("json_number", b"k", lambda k: b"42"),
        ("json_null", b"k", lambda k: b"null"),
        ("json_true", b"k", lambda k: b"true"),
        ("single_quotes", b"k", lambda k: event(k).replace(b'"', b"'")),
        ("trailing_comma", b"k", lambda k: event(k)[:-1] + b",}"),
        ("trailing_garbage", b"k", lambda k: event(k) + b" {}"),
        ("two_objects", b"k", lambda k: event(k) + b"\n" + event(k)),
        ("comment", b"k", lambda k: b"/* hi */" + event(k)),
        ("raw_control_character", b"k",
         lambda k: text(k, '{"id": "ID\x01\x07", "features": FEATURES}')),
        ("deeply_nested_array", b"k", lambda k: deep.encode()),
        ("deeply_nested_object", b"k", lambda k: ('{"a":' * DEEP + "1" + "}" * DEEP).encode()),
        # -- numbers JSON does not have, or float64 cannot hold
        ("nan_literal", b"k", lambda k: number_at_last(k, "NaN")),
        ("infinity_literal", b"k", lambda k: number_at_last(k, "Infinity")),
        ("minus_infinity_literal", b"k", lambda k: number_at_last(k, "-Infinity")),
        ("overflow_1e400", b"k", lambda k: number_at_last(k, "1e400")),
        ("overflow_minus_1e400", b"k", lambda k: number_at_last(k, "-1e400")),
        ("integer_of_400_digits", b"k", lambda k: number_at_last(k, "1" + "0" * 400)),
        ("hex_number", b"k", lambda k: number_at_last(k, "0x10")),
        ("leading_zero", b"k", lambda k: number_at_last(k, "007")),
        ("leading_plus", b"k", lambda k: number_at_last(k, "+1")),
        ("bare_fraction", b"k", lambda k: number_at_last(k, ".5")),
        # -- the id
        ("missing_id", b"k", lambda k: _dumps({"features": good, "label": k})),
        ("id_null", b"k", lambda k: _dumps({"id": None, "features": good, "label": k})),
        ("id_number", b"k", lambda k: _dumps({"id": 12345, "features": good})),
        ("id_negative_zero", b"k", lambda k: text(k, '{"id": -0, "features": FEATURES}')),
        ("id_bool", b"k", lambda k: _dumps({"id": True, "features": good})),
        ("id_list", b"k", lambda k: _dumps({"id": [f"{tag}-{k}"], "features": good})),
        ("id_object", b"k", lambda k: _dumps({"id": {"id": f"{tag}-{k}"}, "features": good})),
        ("id_empty", b"k", lambda k: _dumps({"id": "", "features": good})),
        ("id_too_long", b"k", lambda k: _dumps({"id": f"{tag}-{k}-" + "x" * 300,
                                                 "features": good})),
        ("id_lone_high_surrogate", b"k",
         lambda k: text(k, '{"id": "ID\\ud800", "features": FEATURES}')),
        ("id_lone_low_surrogate", b"k",
         lambda k: text(k, '{"id": "ID\\udc00x", "features": FEATURES}')),
        ("id_bad_escape", b"k", lambda k: text(k, '{"id": "ID\\x41", "features": FEATURES}')),
        # -- the features
        ("missing_features", b"k", lambda k: _dumps({"id": f"{tag}-{k}"})),
        ("features_null", b"k", lambda k: with_features(k, None)),
        ("features_string", b"k", lambda k: with_features(k, ",".join(map(str, good)))),
        ("features_number", b"k", lambda k: with_features(k, 1.5)),
        ("features_empty_list", b"k", lambda k: with_features(k, [])),
        ("features_empty_object", b"k", lambda k: with_features(k, {})),
        ("features_one_too_few", b"k", lambda k: with_features(k, good[:-1])),
        ("features_one_too_many", b"k", lambda k: with_features(k, good + [1.0])),
        ("features_by_name_missing_one", b"k",
         lambda k: with_features(k, dict(list(by_name.items())[:-1]))),
        ("features_by_name_unknown_one", b"k",
         lambda k: with_features(k, {**by_name, "not-a-feature": 1.0})),
        ("feature_bool", b"k", lambda k: with_features(k, [True] + good[1:])),
        ("feature_string", b"k", lambda k: with_features(k, ["1.5"] + good[1:])),
        ("feature_list", b"k", lambda k: with_features(k, [[1.5]] + good[1:])),
        ("feature_object", b"k", lambda k: with_features(k, [{"v": 1.5}] + good[1:])),
        ("feature_nested_1000_deep", b"k",
         lambda k: text(k, '{"id": "ID", "features": [' + "[" * 1000 + "]" * 1000
                        + ", 1" * (n - 1) + "]}")),
        # -- label, ts, other fields
        ("unknown_label", b"k", lambda k: event(k, label=f"no-such-class-{k}")),
        ("label_bool", b"k", lambda k: event(k, label=True)),
        ("label_float", b"k", lambda k: event(k, label=0.5)),
        ("label_list", b"k", lambda k: event(k, label=list(classes[:1]))),
        ("label_object", b"k", lambda k: event(k, label={"class": classes[0]})),
        ("label_nested_1000_deep", b"k",
         lambda k: text(k, '{"id": "ID", "features": FEATURES, "label": ' + "[" * 1000
                        + "]" * 1000 + "}")),
        ("ts_string", b"k", lambda k: event(k, ts="2026-11-30T00:00:00Z")),
        ("ts_negative", b"k", lambda k: event(k, ts=-1)),
        ("ts_float", b"k", lambda k: event(k, ts=1.5)),
        ("ts_beyond_uint64", b"k", lambda k: event(k, ts=2 ** 64)),
        ("unknown_field", b"k", lambda k: event(k, lable=classes[0])),
        ("many_unknown_fields", b"k",
         lambda k: event(k, **{f"field{i}": i for i in range(10_000)})),
        # -- near the broker's limit, each quoted whole would overflow a dead letter
        ("huge_not_utf8", b"k",
         lambda k: bytes(range(128, 256)) * (NEAR_MAX_BYTES // 128)),
        ("huge_control_characters", b"k", lambda k: b"\x01" * NEAR_MAX_BYTES),
        ("huge_quotes_in_unknown_field", b"k",
         lambda k: event(k)[:-1] + b', "pad": "' + b'\\"' * (NEAR_MAX_BYTES // 2 - 64) + b'"}'),
        ("huge_unknown_label", b"k",
         lambda k: event(k, label="L" * (NEAR_MAX_BYTES - 200))),
        ("huge_ts_string", b"k", lambda k: event(k, ts="9" * (NEAR_MAX_BYTES - 200))),
        ("huge_unknown_feature_name", b"k",
         lambda k: with_features(k, {**by_name, "f" * (NEAR_MAX_BYTES - 200): 1.0})),
        ("huge_id", b"k", lambda k: _dumps({"id": f"{tag}-{k}" + "i" * (NEAR_MAX_BYTES - 200),
                                            "features": good})),
    ]
    out = []
    for kind, key, make in cases:
        out.append(HostileRecord(kind, None if key is None else f"{tag}-{kind}".encode(),
                                 make(kind)))
    return out


def edge_records(features: Sequence[str], classes: Sequence[Any],
                 tag: str) -> list[HostileRecord]:
    """Unusual records the schema accepts, one each; each must get one prediction."""
    n = len(features)
    good = [1.5] * n
    records: list[HostileRecord] = []

    def add(kind: str, value: bytes, event_id: str | None = None,
            key: bytes | None = b"") -> None:
        records.append(HostileRecord(kind, f"{tag}-{kind}".encode() if key == b"" else key,
                                     value, event_id or f"{tag}-{kind}"))

    def event(kind: str, features: Any = None, **fields: Any) -> bytes:
        return _dumps({"id": f"{tag}-{kind}", "features": good if features is None
                       else features, **fields})

    add("null_key", event("null_key"), key=None)
    add("non_utf8_key", event("non_utf8_key"), key=b"\xff\xfe\x00")
    add("negative_zero", event("negative_zero", [-0.0] * n))
    add("integer_negative_zero", f'{{"id": "{tag}-integer_negative_zero", "features": '
        f'[{", ".join(["-0"] * n)}]}}'.encode())
    add("all_missing", event("all_missing", [None] * n))
    add("missing_markers", event("missing_markers", [-999.0] * n))
    add("largest_floats", event("largest_floats",
                                [1.7976931348623157e308 * (-1) ** i for i in range(n)],
                                label=classes[0]))
    add("smallest_floats", event("smallest_floats", [5e-324 * (-1) ** i for i in range(n)]))
    add("underflow_to_zero", f'{{"id": "{tag}-underflow_to_zero", "features": '
        f'[{", ".join(["1e-400"] * n)}]}}'.encode())
    add("uint64_integers", event("uint64_integers", [2 ** 64 - 1] * n))
    add("features_by_name_reversed", event(
        "features_by_name_reversed", {name: 2.0 for name in reversed(features)}))
    add("duplicate_feature_key", (f'{{"id": "{tag}-duplicate_feature_key", "features": '
                                  f'{{"{features[0]}": "x", '
                                  + ", ".join(f'"{f}": 1' for f in features) + "}}").encode())
    add("label_and_ts_null", event("label_and_ts_null", label=None, ts=None))
    add("ts_zero", event("ts_zero", ts=0))
    add("ts_largest", event("ts_largest", ts=2 ** 64 - 1, label=classes[-1]))
    add("escaped_key_names", (f'{{"\\u0069d": "{tag}-escaped_key_names", '
                              f'"\\u0066eatures": {json.dumps(good)}}}').encode())
    add("escaped_control_characters_in_id", _dumps({
        "id": f"{tag}-escaped_control_characters_in_id\u0000\n\t", "features": good}),
        f"{tag}-escaped_control_characters_in_id\u0000\n\t")
    add("surrogate_pair_in_id", f'{{"id": "{tag}-surrogate_pair_in_id\\ud83d\\ude00", '
        f'"features": {json.dumps(good)}}}'.encode(), f"{tag}-surrogate_pair_in_id\U0001F600")
    longest = f"{tag}-longest_id-"
    longest += "\u00e9" * (256 - len(longest))
    add("longest_id", _dumps({"id": longest, "features": good}), longest)
    add("whitespace_around", b"\n\t " + event("whitespace_around") + b" \r\n")
    padded = event("padded_near_broker_limit")
    add("padded_near_broker_limit",
        padded[:-1] + b" " * (NEAR_MAX_BYTES - len(padded)) + b"}")
    return records


def hostile_records(features: Sequence[str], classes: Sequence[Any],
                    tag: str) -> list[HostileRecord]:
    """:func:`malformed_records` followed by :func:`edge_records`."""
    return malformed_records(features, classes, tag) + edge_records(features, classes, tag)
