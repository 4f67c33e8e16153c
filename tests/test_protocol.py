"""The update topic's protocol: its messages, the fold, and serving and batch reading it alike."""
from __future__ import annotations

from app.errors import StratumError

import json
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np
import pytest

from serving.model_manager import ModelManager
from batch.active import update_state
from models.errors import ArtifactError, MessageError
from models.registry import Registry
from devstack.harness import publish_small_model
from transport import protocol
from transport.protocol import (Ledger, ModelRef, ModelUpdate, Pin, Record, UnknownType, decode,
                                encode, fold, refuse, replay, settle, should_serve, step)

MODEL = "default"
FEATURES = ["x", "y"]
CLASSES = ["neg", "pos"]
SHA = "a" * 64


def ref(version: str, model: str = MODEL) -> dict[str, Any]:
    return {"type": "MODEL-REF", "model": model, "version": version,
            "manifest": f"s3://b/models/{model}/{version}/manifest.json", "sha256": SHA,
            "metrics": {"accuracy": 0.9}}


def pin(version: str | None, **extra: Any) -> dict[str, Any]:
    return {"type": "PIN", "model": MODEL, "version": version, **extra}


def up(base: str, seq: int) -> dict[str, Any]:
    rng = np.random.default_rng(seq)
    return ModelUpdate(model=MODEL, base_version=base, seq=seq,
                       weight=rng.normal(size=(2, 3)).astype(np.float32),
                       bias=rng.normal(size=2).astype(np.float32), n_examples=10,
                       created_at="2026-11-23T10:00:00Z",
                       extra={"fit": {"seconds": 0.1}}).to_message()


def records(*values: Any, timestamps: Iterable[int] | None = None) -> list[Record]:
    """Update-topic records at offsets 0, 1, ...; ``timestamps`` are the producers' clocks."""
    stamps = list(timestamps) if timestamps is not None else [1000 * i for i in
                                                              range(len(values))]
    return [Record(i, v if isinstance(v, bytes) else json.dumps(v).encode(), stamps[i])
            for i, v in enumerate(values)]


# -- messages -----------------------------------------------------------------------------------

def test_a_model_ref_round_trips_through_its_bytes() -> None:
    message = ref("v1")
    decoded = decode(json.dumps(message).encode())
    assert isinstance(decoded, ModelRef)
    assert (decoded.name, decoded.version, decoded.manifest_uri, decoded.sha256,
            decoded.metrics) == (MODEL, "v1", message["manifest"], SHA, {"accuracy": 0.9})
    assert json.loads(encode(decoded)) == message
    assert ModelRef.from_message(decoded.to_message()) == decoded


def test_a_pin_round_trips_and_null_lifts_it() -> None:
    message = protocol.pin_message(MODEL, "v1", at=123, rollback_from="v2")
    assert message == {"type": "PIN", "model": MODEL, "version": "v1", "at": 123,
                       "rollback_from": "v2"}
    assert decode(encode(decode(json.dumps(message)))) == Pin(model=MODEL, version="v1",
                                                             at=123, rollback_from="v2")
    lifted = decode(json.dumps(protocol.pin_message(MODEL, None)))
    assert isinstance(lifted, Pin) and lifted.version is None
    assert "rollback_from" not in protocol.pin_message(MODEL, None)


def test_an_update_round_trips_with_its_layer_and_extra_fields() -> None:
    message = up("v1", 3)
    decoded = decode(json.dumps(message).encode())
    assert isinstance(decoded, ModelUpdate) and decoded.version == "v1+3"
    assert decoded.weight.shape == (2, 3) and decoded.extra == {"fit": {"seconds": 0.1}}
    again = json.loads(encode(decoded))
    assert again == message
    np.testing.assert_array_equal(decode(again).weight, decoded.weight)


@pytest.mark.parametrize("message, reason", [
    ({**ref("v1"), "version": ""}, "'version' must be a non-empty string"),
    ({k: v for k, v in ref("v1").items() if k != "model"}, "'model' must be a non-empty"),
    ({**ref("v1"), "version": "../v1"}, "not a valid name"),
    ({**ref("v1"), "manifest": "s3://b/models/default/v1/weights.pt"}, "is not a URI of a"),
    ({**ref("v1"), "sha256": "A" * 64}, "64 lowercase hex"),
    ({**ref("v1"), "metrics": [1]}, "metrics must be an object"),
    ({k: v for k, v in pin("v1").items() if k != "model"}, "PIN field 'model' must be"),
    ({k: v for k, v in pin("v1").items() if k != "version"}, "'version' is required"),
    (pin(7), "'version' must be a version string or null, got 7"),
    (pin("a/b"), "PIN version 'a/b' is not a valid name"),
    (pin("v1", at="now"), "'at' must be an integer"),
    ({**up("v1", 1), "seq": 0}, "'seq' must be an integer >= 1, got 0"),
    ({**up("v1", 1), "seq": True}, "'seq' must be an integer >= 1"),
    ({**up("v1", 1), "shape": [2, 4]}, "'weight' holds 24 bytes; shape says 8"),
    ({**up("v1", 1), "layer": "hidden"}, "'layer' must be 'output'"),
    ({**up("v1", 1), "sha256": "0" * 64}, "do not match their sha256"),
    ({**up("v1", 1), "created_at": "yesterday"}, "'created_at' must be an ISO 8601 time"),
])
def test_a_malformed_message_is_refused_with_the_field_named(message: dict[str, Any],
                                                             reason: str) -> None:
    with pytest.raises(MessageError) as caught:
        decode(json.dumps(message).encode())
    assert reason in str(caught.value) and not isinstance(caught.value, UnknownType)
    assert isinstance(caught.value, StratumError)  # one base for every error Stratum raises


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"type": "SOMETHING"}', None,
                                 b"\xff\xfe"])
def test_a_value_of_no_known_type_is_an_unknown_type(raw: bytes | None) -> None:
    with pytest.raises(UnknownType, match="unknown message type"):
        decode(raw)


# -- the fold -----------------------------------------------------------------------------------

def test_fold_is_pure_and_a_redelivered_record_changes_nothing() -> None:
    empty = Ledger(MODEL)
    history = records(ref("v1"), ref("v2"), up("v1", 1), pin("v1"))
    ledger = replay(history, MODEL)
    assert empty == Ledger(MODEL) and empty.announced == {}  # untouched
    assert list(ledger.announced) == ["v1", "v2"] and ledger.pinned == "v1"
    assert ledger.position == 4 and ledger.updates["v1"].seq == 1
    with pytest.raises(TypeError):
        ledger.announced["v3"] = ledger.announced["v1"]  # type: ignore[index]
    again, note = step(ledger, history[1])
    assert again is ledger and note.kind == "seen"


def test_updates_keep_the_newest_per_base_and_drop_stale_ones() -> None:
    ledger = replay(records(ref("v1"), up("v1", 2), up("v1", 1), up("v0", 5), up("v1", 2)),
                    MODEL)
    assert {b: u.seq for b, u in ledger.updates.items()} == {"v1": 2, "v0": 5}
    assert ledger.stale == 2


def test_a_reannouncement_counts_as_newest_and_other_models_are_skipped() -> None:
    ledger = replay(records(ref("v1"), ref("v2"), ref("v1"), ref("v9", model="other"),
                            {**up("v2", 1), "model": "other"}), MODEL)
    assert list(ledger.announced) == ["v2", "v1"] and should_serve(ledger) == "v1"
    assert ledger.updates == {}


def test_should_serve_the_pin_unless_refused_else_the_newest_not_refused() -> None:
    ledger = replay(records(ref("v1"), ref("v2"), ref("v3"), pin("v1")), MODEL)
    assert should_serve(ledger) == "v1"
    assert should_serve(refuse(ledger, "v1", "bad")) == "v3"
    assert should_serve(refuse(refuse(ledger, "v1", "bad"), "v3", "bad")) == "v2"
    assert should_serve(fold(ledger, Record(4, json.dumps(pin(None))))) == "v3"
    assert should_serve(fold(ledger, Record(4, json.dumps(pin("v7"))))) == "v3"  # unknown
    assert should_serve(Ledger(MODEL)) is None
    assert protocol.protected(ledger) == {"v1", "v3"}



# -- rollouts -----------------------------------------------------------------------------------

def rolled(version: str, mode: str, share: float = 0.25) -> dict[str, Any]:
    return {**ref(version), "rollout": {"mode": mode, "share": share}}


def decision(kind: str, version: str, by: str = "policy") -> dict[str, Any]:
    return protocol.decision_message(kind, MODEL, version, by, reason="test",
                                     figures={"n_candidate": 500}, at=1)


def test_rollout_and_decision_messages_round_trip_and_are_validated() -> None:
    message = rolled("v2", "canary", 0.1)
    decoded = decode(json.dumps(message).encode())
    assert isinstance(decoded, ModelRef) and decoded.rollout == protocol.Rollout(
        mode="canary", share=0.1)
    assert json.loads(encode(decoded)) == message
    assert "rollout" not in ModelRef.from_message(ref("v1")).to_message()
    for kind in (protocol.PROMOTE, protocol.ABORT):
        d = decode(json.dumps(decision(kind, "v2", "operator")))
        assert isinstance(d, protocol.Decision) and (d.kind, d.version, d.by) == (
            kind, "v2", "operator")
        assert json.loads(encode(d)) == decision(kind, "v2", "operator")
    for bad, field in [({**ref("v2"), "rollout": {"mode": "blue-green"}}, "rollout"),
                       ({**ref("v2"), "rollout": {"mode": "canary", "share": 1.5}}, "rollout"),
                       ({**decision("PROMOTE", "v2"), "by": "someone"}, "by"),
                       ({**decision("ABORT", "v2"), "version": "../x"}, "version"),
                       ({k: v for k, v in decision("ABORT", "v2").items() if k != "model"},
                        "model"),
                       ({**decision("PROMOTE", "v2"), "figures": [1]}, "figures")]:
        with pytest.raises(MessageError, match=field):
            decode(json.dumps(bad))
    # A malformed decision on the topic is a note, not an exception, and changes nothing.
    ledger, note = step(Ledger(MODEL), Record(0, json.dumps({**decision("ABORT", "v"),
                                                             "by": 3})))
    assert note.kind == "malformed" and note.message_type == "ABORT"


@pytest.mark.parametrize("mode", ["shadow", "canary"])
def test_a_candidate_is_held_until_promoted_and_the_ledger_replays_it(mode: str) -> None:
    history = records(ref("v1"), up("v1", 1), rolled("v2", mode))
    ledger = replay(history, MODEL)
    assert should_serve(ledger) == "v1" and list(ledger.announced) == ["v1", "v2"]
    current = protocol.candidate(ledger)
    assert current is not None and (current.version, current.mode, current.share,
                                     current.since) == ("v2", mode, 0.25, 2)
    assert protocol.protected(ledger) == {"v1", "v2"}
    # A decision about another version than the candidate changes nothing.
    same, note = step(ledger, Record(3, json.dumps(decision("PROMOTE", "v1"))))
    assert note.kind == "stale-decision" and not note.changed
    assert protocol.candidate(same) == current and should_serve(same) == "v1"
    promoted = replay(records(ref("v1"), up("v1", 1), rolled("v2", mode),
                              decision("PROMOTE", "v2")), MODEL)
    assert should_serve(promoted) == "v2" and promoted.candidate is None
    assert [d.kind for d in promoted.decisions] == ["PROMOTE"]
    # Replayed from scratch, or folded on from where a reader stopped: the same ledger.
    tail = Record(3, json.dumps(decision("PROMOTE", "v2")).encode())
    folded = fold(ledger, tail)
    assert [(list(x.announced), x.held, x.candidate, x.decisions, x.position)
            for x in (folded, promoted)] == 2 * [(list(promoted.announced), promoted.held,
                                                  None, promoted.decisions, 4)]


def test_an_aborted_candidate_never_serves_until_announced_again() -> None:
    ledger = replay(records(ref("v1"), rolled("v2", "shadow"), decision("ABORT", "v2")),
                    MODEL)
    assert should_serve(ledger) == "v1" and protocol.candidate(ledger) is None
    assert ledger.aborted == {"v2": "test"}
    # Promoting it later, or pinning it, does not make it serve.
    later = replay(records(decision("PROMOTE", "v2"), pin("v2")), MODEL, ledger=ledger)
    assert should_serve(later) == "v1"
    # Refusing the serving version falls back past the aborted one.
    assert should_serve(refuse(ledger, "v1", "bad")) is None
    # Announced again: a new rollout (here the default, immediate: it serves).
    again = fold(ledger, Record(3, json.dumps(ref("v2"))))
    assert should_serve(again) == "v2" and again.aborted == {}
    restarted = fold(ledger, Record(3, json.dumps(rolled("v2", "canary"))))
    assert should_serve(restarted) == "v1" and restarted.candidate is not None


def test_the_default_rollout_applies_and_the_first_version_serves_at_once() -> None:
    shadowing = Ledger(MODEL, rollout=protocol.Rollout(mode="shadow"))
    first = replay(records(ref("v1")), MODEL, ledger=shadowing)
    assert should_serve(first) == "v1" and first.candidate is None  # nothing to compare with
    second = replay(records(ref("v1"), ref("v2")), MODEL, ledger=shadowing)
    assert should_serve(second) == "v1" and second.candidate is not None
    assert second.candidate.mode == "shadow"
    # The announcement's own rollout wins over the default.
    third = fold(second, Record(2, json.dumps({**ref("v3"),
                                                "rollout": {"mode": "immediate"}})))
    assert should_serve(third) == "v3" and third.candidate is None
    # v2's rollout ended with the newer announcement: v2 stays held.
    assert should_serve(refuse(third, "v3", "bad")) == "v1"


def test_a_pin_or_a_refusal_suspends_the_candidate() -> None:
    ledger = replay(records(ref("v1"), rolled("v2", "canary")), MODEL)
    pinned = fold(ledger, Record(2, json.dumps(pin("v1"))))
    assert should_serve(pinned) == "v1" and protocol.candidate(pinned) is None
    lifted = fold(pinned, Record(3, json.dumps(pin(None))))
    assert protocol.candidate(lifted) is not None
    assert protocol.candidate(refuse(ledger, "v2", "bad")) is None

def test_settle_refuses_what_does_not_verify_until_one_does() -> None:
    ledger = replay(records(ref("v1"), ref("v2"), ref("v3")), MODEL)
    tried: list[str] = []

    def verify(r: ModelRef) -> None:
        tried.append(r.version)
        if r.version != "v1":
            raise ArtifactError(f"{r.version} is damaged")

    settled = settle(ledger, verify)
    assert tried == ["v3", "v2", "v1"] and should_serve(settled) == "v1"
    assert dict(settled.refused) == {"v3": "v3 is damaged", "v2": "v2 is damaged"}
    assert ledger.refused == {}


# -- serving and batch read the same history alike ----------------------------------------------

class View(NamedTuple):
    active: str | None
    pinned: str | None
    refused: frozenset[str]


async def serving_view(history: list[Record], registry: Registry | None = None) -> View:
    """What a serving worker makes of ``history``: with a registry it loads what it should
    serve after each message, as it does following the topic."""
    manager = ModelManager()
    if registry is not None:
        manager.registry = registry
    for record in history:
        if manager._record(record.value, record.offset) and registry is not None:
            await manager._converge()
    ledger = manager.ledger
    if registry is not None:
        active = manager.active.version if manager.active is not None else None
    else:
        active = manager.should_serve()
    return View(active, ledger.pinned, frozenset(ledger.refused))


def batch_view(history: list[Record], registry: Registry | None = None) -> View:
    """What the batch job makes of ``history`` (the records as its reader hands them over)."""
    state = update_state(history, MODEL, registry.load_ref if registry is not None else None)
    return View(state.active_version, state.pinned, frozenset(state.refused))


async def test_skewed_producer_timestamps_do_not_reorder_the_history() -> None:
    # v2 was announced after v1 (higher offset) by a producer whose clock runs behind, and
    # the pin was lifted after it was set, again by a clock behind.
    history = records(ref("v1"), ref("v2"), pin("v1"), pin(None), ref("v3"), pin("v2"),
                      timestamps=[5000, 1000, 9000, 2000, 3000, 2500])
    expected = View("v2", "v2", frozenset())
    assert await serving_view(history) == expected
    assert batch_view(history) == expected
    assert batch_view(history[:4]) == await serving_view(history[:4]) == View(
        "v2", None, frozenset())


async def test_a_pin_without_a_model_pins_nothing_in_either_view() -> None:
    history = records(ref("v1"), ref("v2"), {"type": "PIN", "version": "v1"})
    assert await serving_view(history) == batch_view(history) == View("v2", None, frozenset())


def test_serving_reports_a_pin_without_a_model_as_malformed() -> None:
    manager = ModelManager()
    assert manager._record(json.dumps({"type": "PIN", "version": "v1"}).encode(), 0) is False
    reason = manager.ledger.last_refusal.reason
    assert "bad pin" in reason and "'model' must be a non-empty string" in reason


@pytest.fixture()
def registry(tmp_path: Path) -> Registry:
    return Registry(f"file://{tmp_path}/registry")


def damage(registry: Registry, version: ModelRef) -> None:
    """Flip the weights of a published version, as a corrupted upload would."""
    path = Path(registry.manifest_uri(version.name, version.version)[len("file://"):])
    weights = path.parent / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)


async def test_a_version_whose_artifact_is_bad_is_refused_by_both(registry: Registry) -> None:
    good, bad = (publish_small_model(registry, MODEL, FEATURES, CLASSES, seed=i)
                 for i in range(2))
    damage(registry, bad)
    history = records(good.to_message(), bad.to_message())
    expected = View(good.version, None, frozenset({bad.version}))
    assert await serving_view(history, registry) == expected
    assert batch_view(history, registry) == expected
    # Pinning the bad version changes nothing that serves, in either view.
    pinned = [*history, Record(2, json.dumps(pin(bad.version)).encode())]
    expected = View(good.version, bad.version, frozenset({bad.version}))
    assert await serving_view(pinned, registry) == batch_view(pinned, registry) == expected
    state = update_state(pinned, MODEL, registry.load_ref)
    assert state.active == good and good.version in state.protected()


async def test_an_announcement_pointing_at_another_versions_manifest_is_refused(
        registry: Registry) -> None:
    first, third = (publish_small_model(registry, MODEL, FEATURES, CLASSES, seed=i)
                    for i in range(2))
    v9 = ModelRef(name=MODEL, version="v9", manifest_uri=third.manifest_uri,
                  sha256=third.sha256)
    with pytest.raises(ArtifactError, match=f"MODEL-REF says {MODEL}/v9 but the manifest is"):
        registry.load_ref(v9)
    history = records(first.to_message(), v9.to_message())
    expected = View(first.version, None, frozenset({"v9"}))
    assert await serving_view(history, registry) == expected
    assert batch_view(history, registry) == expected
    # What serves is kept by generation clean-up, whatever the topic names.
    assert first.version in update_state(history, MODEL, registry.load_ref).protected()


async def test_serving_loads_the_candidate_routes_to_it_and_swaps_on_promotion(
        registry: Registry) -> None:
    v1, v2, v3 = (publish_small_model(registry, MODEL, FEATURES, CLASSES, seed=i)
                  for i in range(3))
    manager = ModelManager()
    manager.registry = registry

    async def feed(offset: int, message: dict[str, Any]) -> None:
        if manager._record(json.dumps(message).encode(), offset):
            await manager._converge()

    await feed(0, v1.to_message())
    await feed(1, {**v2.to_message(), "rollout": {"mode": "canary", "share": 0.3}})
    routing = manager.routing()
    assert routing.model.version == v1.version and routing.candidate is not None
    assert (routing.candidate.version, routing.mode, routing.share) == (v2.version, "canary",
                                                                         0.3)
    rollout = manager.describe()["rollout"]
    assert rollout["candidate"] == v2.version and rollout["loaded"] and "decision" not in rollout
    candidate = routing.candidate
    await feed(2, decision("PROMOTE", v2.version))
    assert manager.active is candidate and manager.routing().candidate is None  # no reload
    assert manager.describe()["rollout"]["decision"]["type"] == "PROMOTE"
    # The next rollout is aborted: the candidate is dropped, the promoted version serves on.
    await feed(3, {**v3.to_message(), "rollout": {"mode": "shadow"}})
    assert manager.routing().mode == "shadow"
    await feed(4, decision("ABORT", v3.version, by="operator"))
    assert manager.active is candidate and manager.routing().candidate is None
    assert manager.describe()["rollout"]["candidate"] is None
    assert manager.ledger.topic.aborted == {v3.version: "test"}
