"""The update topic (``model-updates``): its messages and what a history of them means.

Every message is one UTF-8 JSON object with a ``"type"`` (formats in the project's contract):

``MODEL-REF`` (:class:`ModelRef`)
    The batch layer announces a published base version: model, version, the URI and sha256 of
    its ``manifest.json``, its test metrics.
``UP`` (:class:`Up` on the wire, :class:`ModelUpdate` decoded)
    The speed layer's new output layer for one base version, numbered ``seq`` from 1.
``PIN`` (:class:`Pin`)
    An operator's choice: serve ``version`` whatever is announced later, until a PIN with
    ``"version": null``. A PIN names its model like every other message; one without
    ``"model"`` is malformed.
``PROMOTE`` and ``ABORT`` (:class:`Decision`)
    The end of a rollout (see below): the candidate in rollout serves from now on, or never
    serves (until it is announced again). ``by`` says who decided (``"policy"``, the speed
    layer's, or ``"operator"``), with the ``reason`` and the ``figures`` it decided on.

Rollouts
--------
A ``MODEL-REF`` may carry ``"rollout": {"mode": "shadow"|"canary"|"immediate", "share": s}``;
without one the ledger's default (``ROLLOUT_MODE``, ``ROLLOUT_CANARY_SHARE``) applies. An
``immediate`` version is the newest announced and serves, as it always did. A ``shadow`` or
``canary`` version becomes the ledger's :attr:`Ledger.candidate` instead, *held* from
:func:`should_serve` (the version serving goes on serving) until a ``PROMOTE`` of it (it then
counts as the newest announcement, so it serves) or an ``ABORT`` (it stays held: it never
serves, unless a ``MODEL-REF`` announces it again, which starts a new rollout). A decision
about any other version than the candidate changes nothing. A rollout needs a version to
compare with: when no announced version could serve (the first announcement), the version
serves at once. A newer announcement ends the rollout in progress (the old candidate stays
held). :func:`candidate` names the version in rollout that serving should route to: none while
a pin holds or when the candidate was refused.

:func:`decode` validates a message into its typed struct (msgspec), or raises
:class:`MessageError` naming the field; :func:`encode` is the inverse. A message of another
type raises :class:`UnknownType` (the contract says such messages are logged and ignored).

The ledger
----------
The topic has one partition and is kept forever: its records *in offset order* are the whole
truth about a model, and every reader that folds them with :func:`fold` gets the same
:class:`Ledger`: the announced versions (newest announcement last; a re-announcement counts as
the newest), the pin, the newest valid update per base version, and the offset folded up to.
Producer timestamps play no part (clocks skew; offsets do not). :func:`fold` is pure: it
returns a new ledger and never touches the one it was given; a record at an offset already
folded changes nothing, so a re-delivered record is harmless.

What serves is a function of the ledger alone, :func:`should_serve`: the pinned version if it
was announced and is neither refused nor aborted, else the newest announced version that is
neither refused nor held by a rollout (see Rollouts).

Refusals
--------
A version is refused when its artifact does not verify: the manifest is missing or its sha256
differs from the announcement, the manifest names another version than the announcement (a
MODEL-REF ``v9`` pointing at ``v3``'s manifest is refused, not served as ``v3``), a file's
sha256 differs from the manifest, the weights do not reproduce the reference rows. The topic
does not carry refusals: serving writes nothing to it but operators' PINs and decisions, as in
Oryx, where the update topic flows from the batch and speed layers to serving only. Instead
every reader verifies for itself, with the same registry check
(:meth:`models.registry.Registry.load_ref`), and folds what it found into its ledger with
:func:`refuse`. :func:`settle` does exactly that for the version :func:`should_serve` names,
until one verifies or none is left; serving workers refuse a version when loading it fails, the
batch layer settles its ledger before it compares with or prunes around the active version.
Since the artifact is immutable and the check is the same, both reach the same refusals.

Two refusals stay local to a worker, because they depend on more than the topic and the
artifact: a version whose features or classes differ from what that worker is serving at that
moment, and a version the registry could not be read for (store unreachable). For the second,
:func:`protected` keeps from pruning what the topic alone names as well as what verification
settled on, so a version the batch job could not read but a worker serves is never deleted.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Annotated, Any, Callable, Final, Iterable, Literal, Mapping, NamedTuple, Union

import msgspec
import numpy as np

from app.errors import StratumError

__all__ = [
    "MODEL_REF", "UP", "PIN", "PROMOTE", "ABORT", "TYPES", "MANIFEST_FILE", "MessageError",
    "UnknownType", "IMMEDIATE", "SHADOW", "CANARY", "MODES", "Rollout", "Candidate",
    "ModelRef", "Up", "ModelUpdate", "Pin", "Decision", "Message", "pin_message",
    "decision_message", "candidate",
    "decode", "decode_message", "encode",
    "Record", "Note", "Ledger", "step", "fold", "replay", "refuse", "should_serve",
    "fallback", "protected", "settle",
]

#: ``"type"`` of the batch layer's announcement of a base version.
MODEL_REF = "MODEL-REF"
#: ``"type"`` of the speed layer's incremental update.
UP = "UP"
#: ``"type"`` of an operator's pin (or, with a null version, its release).
PIN = "PIN"
#: ``"type"`` of a rollout's promotion of its candidate.
PROMOTE = "PROMOTE"
#: ``"type"`` of a rollout's abort: the candidate never serves.
ABORT = "ABORT"
#: Every type this protocol knows.
TYPES = (MODEL_REF, UP, PIN, PROMOTE, ABORT)
#: Rollout modes of a new base version.
IMMEDIATE: Final = "immediate"
SHADOW: Final = "shadow"
CANARY: Final = "canary"
MODES = (IMMEDIATE, SHADOW, CANARY)
#: File name a MODEL-REF's manifest URI ends with.
MANIFEST_FILE = "manifest.json"
#: The only layer an update replaces today.
OUTPUT_LAYER: Literal["output"] = "output"

_SEGMENT = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_SHA256 = r"^[0-9a-f]{64}$"
_SEGMENT_RULE = "(letters, digits, '.', '_', '-'; no '/' or '..')"
# Bounds a malicious or corrupted message cannot push memory past (1000 outputs x 100k units).
_MAX_OUTPUTS, _MAX_HIDDEN = 1000, 100_000
# float32, little-endian: the wire format of weight and bias, whatever the host's byte order.
_WIRE_DTYPE = np.dtype("<f4")

#: A name or version: one safe path segment of a registry URI.
Segment = Annotated[str, msgspec.Meta(pattern=_SEGMENT)]
Sha256 = Annotated[str, msgspec.Meta(pattern=_SHA256)]


class MessageError(StratumError):
    """A message on the update topic is malformed (a MODEL-REF, an UP or a PIN)."""


class UnknownType(MessageError):
    """A value on the update topic that is not a message of a type this protocol knows."""


# -- messages -----------------------------------------------------------------------------------

class Rollout(msgspec.Struct, frozen=True, kw_only=True):
    """How a new base version goes live: ``mode`` (``immediate``, ``shadow`` or ``canary``)
    and, for a canary, the ``share`` of ids (0 < share < 1) its candidate serves."""

    mode: Literal["immediate", "shadow", "canary"] = IMMEDIATE
    share: Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)] = 0.1


class ModelRef(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=MODEL_REF):
    """A pointer to one published model version, as the ``MODEL-REF`` message announces it.

    Attributes
    ----------
    name, version : str
        Model name (``"model"`` on the wire) and version id.
    manifest_uri : str
        Full URI of the version's ``manifest.json`` (``"manifest"`` on the wire).
    sha256 : str
        sha256 of the manifest's bytes: pins the manifest, which pins every other file.
    metrics : dict
        Test metrics copied from the manifest, so consumers can log them without loading.
    """

    name: Segment = msgspec.field(name="model")
    version: Segment
    manifest_uri: str = msgspec.field(name="manifest")
    sha256: Sha256
    metrics: dict[str, Any] = msgspec.field(default_factory=dict)
    #: How the version goes live; None: the reader's default (``ROLLOUT_MODE``).
    rollout: Union[Rollout, None] = None

    def to_message(self) -> dict[str, Any]:
        """The contract's ``MODEL-REF`` message (a JSON-ready dict); ``rollout`` only when
        set."""
        message: dict[str, Any] = msgspec.to_builtins(self)
        if self.rollout is None:
            message.pop("rollout", None)
        return message

    @classmethod
    def from_message(cls, message: Any) -> "ModelRef":
        """Validate a decoded ``MODEL-REF`` message; :class:`MessageError` names what is
        wrong."""
        ref: ModelRef = _convert(message, cls, MODEL_REF, _REF_REASONS)
        uri = ref.manifest_uri
        if "://" not in uri or not uri.endswith("/" + MANIFEST_FILE):
            raise MessageError(f"MODEL-REF manifest {uri!r} is not a URI of a {MANIFEST_FILE}")
        return ref


class Pin(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=PIN):
    """An operator's pin of ``version`` for ``model`` (``version`` None lifts the pin).

    ``at`` is when it was sent (epoch ms) and ``rollback_from`` the version a rollback left.
    """

    model: Segment
    version: Union[Segment, None]
    at: Union[int, None] = None
    rollback_from: Union[Segment, None] = None

    def to_message(self) -> dict[str, Any]:
        """The ``PIN`` message (a JSON-ready dict); ``rollback_from`` only when set."""
        message: dict[str, Any] = msgspec.to_builtins(self)
        if self.rollback_from is None:
            message.pop("rollback_from", None)
        return message

    @classmethod
    def from_message(cls, message: Any) -> "Pin":
        """Validate a decoded ``PIN`` message; :class:`MessageError` names what is wrong."""
        pin: Pin = _convert(message, cls, PIN, _PIN_REASONS)
        return pin


def pin_message(model: str, version: str | None, *, at: int | None = None,
                rollback_from: str | None = None) -> dict[str, Any]:
    """The ``PIN`` message that pins ``version`` of ``model`` (None lifts the pin)."""
    return Pin(model=model, version=version, at=at, rollback_from=rollback_from).to_message()


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """The end of a rollout: ``PROMOTE`` (``kind``) the candidate ``version``, or ``ABORT``
    it; ``by`` ``"policy"`` (the speed layer) or ``"operator"``, with the ``reason`` and the
    ``figures`` decided on, and ``at`` (epoch ms) when it was sent."""

    kind: Literal["PROMOTE", "ABORT"] = msgspec.field(name="type")
    model: Segment
    version: Segment
    by: Literal["policy", "operator"]
    reason: str = ""
    figures: dict[str, Any] = msgspec.field(default_factory=dict)
    at: Union[int, None] = None

    def to_message(self) -> dict[str, Any]:
        """The ``PROMOTE`` or ``ABORT`` message (a JSON-ready dict)."""
        message: dict[str, Any] = msgspec.to_builtins(self)
        return message

    @classmethod
    def from_message(cls, message: Any) -> "Decision":
        """Validate a decoded ``PROMOTE`` or ``ABORT``; :class:`MessageError` names what is
        wrong."""
        kind = message.get("type") if isinstance(message, Mapping) else None
        decision: Decision = _convert(message, cls, kind if kind in (PROMOTE, ABORT)
                                      else PROMOTE, _DECISION_REASONS)
        return decision


def decision_message(kind: str, model: str, version: str, by: str, reason: str = "",
                     figures: Mapping[str, Any] | None = None,
                     at: int | None = None) -> dict[str, Any]:
    """A ``PROMOTE`` or ``ABORT`` message (validated: :class:`MessageError` when malformed)."""
    message = {"type": kind, "model": model, "version": version, "by": by, "reason": reason,
               "figures": dict(figures or {}), "at": at}
    return Decision.from_message(message).to_message()


class Up(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=UP):
    """The ``UP`` message as it travels: weight and bias are base64 of little-endian float32.

    Decoded and checked (sizes, checksum, finite values) it becomes a :class:`ModelUpdate`.
    """

    model: Segment
    base_version: Segment
    seq: Annotated[int, msgspec.Meta(ge=1)]
    layer: Literal["output"]
    # Outputs: one per class, or one for a regression.
    shape: tuple[Annotated[int, msgspec.Meta(ge=1, le=_MAX_OUTPUTS)],
                 Annotated[int, msgspec.Meta(ge=1, le=_MAX_HIDDEN)]]
    weight: str
    bias: str
    sha256: Sha256
    n_examples: Annotated[int, msgspec.Meta(ge=0)]
    created_at: str


_UP_FIELDS = frozenset(f.encode_name for f in msgspec.structs.fields(Up)) | {"type"}


@dataclass(frozen=True)
class ModelUpdate:
    """A new output layer for one base version, as the speed layer publishes it (``UP``).

    Attributes
    ----------
    model : str
        Registry model name.
    base_version : str
        The batch-built version the update applies to; never applied to another.
    seq : int
        Position in the base version's chain of updates, from 1; serving applies only a seq
        greater than the last one it applied.
    weight : numpy.ndarray
        ``float32`` ``(n_outputs, last_hidden)``: the weight of the last linear layer (one
        row per class, or one row for a regression).
    bias : numpy.ndarray
        ``float32`` ``(n_outputs,)``: its bias.
    n_examples : int
        Labelled examples the fit used.
    created_at : str
        ISO 8601 UTC time of the fit.
    extra : dict
        Free JSON carried along in the message (fit figures, refreshed feature statistics).
    """

    model: str
    base_version: str
    seq: int
    weight: np.ndarray
    bias: np.ndarray
    n_examples: int
    created_at: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        """The version a model with this update applied reports: ``<base_version>+<seq>``."""
        return f"{self.base_version}+{self.seq}"

    def to_message(self) -> dict[str, Any]:
        """The contract's ``UP`` message (a JSON-ready dict)."""
        weight = np.ascontiguousarray(self.weight, dtype=_WIRE_DTYPE).tobytes()
        bias = np.ascontiguousarray(self.bias, dtype=_WIRE_DTYPE).tobytes()
        wire = Up(model=self.model, base_version=self.base_version, seq=self.seq,
                  layer=OUTPUT_LAYER, shape=tuple(self.weight.shape),
                  weight=base64.b64encode(weight).decode("ascii"),
                  bias=base64.b64encode(bias).decode("ascii"),
                  sha256=hashlib.sha256(weight + bias).hexdigest(),
                  n_examples=self.n_examples, created_at=self.created_at)
        message = {k: v for k, v in self.extra.items() if k not in _UP_FIELDS}
        message.update(msgspec.to_builtins(wire))
        message["shape"] = list(wire.shape)
        return message

    @classmethod
    def from_message(cls, message: Any) -> "ModelUpdate":
        """Validate a decoded ``UP`` message and decode its layer.

        Raises
        ------
        MessageError
            The message is not an object, not an ``UP``, or a field is absent or malformed
            (types, shape, base64, checksum, non-finite values); the reason names the field.
        """
        wire = _convert(message, Up, UP, _UP_REASONS)
        n_outputs, hidden = wire.shape
        weight_bytes = _b64("weight", wire.weight, n_outputs * hidden)
        bias_bytes = _b64("bias", wire.bias, n_outputs)
        if hashlib.sha256(weight_bytes + bias_bytes).hexdigest() != wire.sha256:
            raise MessageError("UP weight and bias do not match their sha256: the message was "
                               "altered or corrupted")
        weight = np.frombuffer(weight_bytes, dtype=_WIRE_DTYPE).astype(np.float32)
        bias = np.frombuffer(bias_bytes, dtype=_WIRE_DTYPE).astype(np.float32)
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise MessageError("UP weight and bias must be finite numbers")
        if not _is_iso_time(wire.created_at):
            raise MessageError(_UP_REASONS["created_at"](wire.created_at))
        extra = {k: v for k, v in message.items() if k not in _UP_FIELDS}
        return cls(model=wire.model, base_version=wire.base_version, seq=wire.seq,
                   weight=weight.reshape(n_outputs, hidden), bias=bias,
                   n_examples=wire.n_examples, created_at=wire.created_at, extra=extra)


#: A decoded update-topic message.
Message = Union[ModelRef, ModelUpdate, Pin, Decision]

_DECODERS: dict[str, Callable[[Any], Message]] = {
    MODEL_REF: ModelRef.from_message, UP: ModelUpdate.from_message, PIN: Pin.from_message,
    PROMOTE: Decision.from_message, ABORT: Decision.from_message}


def _parse(raw: bytes | str | Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The JSON object a record's value holds; :class:`UnknownType` when it holds none."""
    if isinstance(raw, Mapping):
        return raw
    try:
        value = msgspec.json.decode(raw or b"")
    except (msgspec.DecodeError, UnicodeDecodeError, TypeError):
        raise UnknownType("unknown message type: the value is not JSON") from None
    if not isinstance(value, dict):
        raise UnknownType("unknown message type: the value is not a JSON object")
    return value


def decode_message(message: Mapping[str, Any]) -> Message:
    """Validate a parsed message (a JSON object) into its typed form."""
    kind = message.get("type")
    decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
    if decoder is None:
        raise UnknownType(f"unknown message type {kind!r}")
    return decoder(message)


def decode(raw: bytes | str | Mapping[str, Any] | None) -> Message:
    """A record value (bytes, text or an already parsed object) as its typed message.

    Raises
    ------
    UnknownType
        The value is not a JSON object, or its ``"type"`` is not one of :data:`TYPES`.
    MessageError
        A field is absent or malformed; the reason names it.
    """
    return decode_message(_parse(raw))


def encode(message: Message) -> bytes:
    """A message's record value: UTF-8 JSON of its ``to_message()``."""
    return msgspec.json.encode(message.to_message())


# -- wording of validation errors ---------------------------------------------------------------

_MISSING: Any = object()


def _shown(value: Any) -> str:
    return "nothing" if value is _MISSING else repr(value)


def _segment(kind: str, key: str) -> Callable[[Any], str]:
    def reason(value: Any) -> str:
        if not isinstance(value, str) or not value:
            return f"{kind} field {key!r} must be a non-empty string"
        return f"{kind} {key} {value!r} is not a valid name {_SEGMENT_RULE}"
    return reason


def _fixed(text: str) -> Callable[[Any], str]:
    return lambda value: text


def _got(text: str) -> Callable[[Any], str]:
    return lambda value: f"{text}, got {_shown(value)}"[:200]


def _pin_version(value: Any) -> str:
    if value is _MISSING:
        return "PIN field 'version' is required (a version, or null to lift the pin)"
    if isinstance(value, str):
        return _segment(PIN, "version")(value)
    return f"PIN field 'version' must be a version string or null, got {value!r}"[:200]


_REF_REASONS: dict[str, Callable[[Any], str]] = {
    "model": _segment(MODEL_REF, "model"), "version": _segment(MODEL_REF, "version"),
    "manifest": _fixed("MODEL-REF field 'manifest' must be a non-empty string"),
    "sha256": _fixed("MODEL-REF sha256 must be 64 lowercase hex digits"),
    "metrics": _fixed("MODEL-REF metrics must be an object"),
    "rollout": _got('MODEL-REF rollout must be {"mode": "immediate"|"shadow"|"canary", '
                    '"share": 0 < share < 1}'),
}
_DECISION_REASONS: dict[str, Callable[[Any], str]] = {
    "model": _segment("decision", "model"), "version": _segment("decision", "version"),
    "by": _got("decision field 'by' must be \"policy\" or \"operator\""),
    "reason": _got("decision field 'reason' must be a string"),
    "figures": _got("decision field 'figures' must be an object"),
    "at": _got("decision field 'at' must be an integer (epoch ms) or null"),
}
_PIN_REASONS: dict[str, Callable[[Any], str]] = {
    "model": _segment(PIN, "model"), "version": _pin_version,
    "at": _got("PIN field 'at' must be an integer (epoch ms) or null"),
    "rollback_from": _segment(PIN, "rollback_from"),
}
_UP_REASONS: dict[str, Callable[[Any], str]] = {
    "model": _segment(UP, "model"), "base_version": _segment(UP, "base_version"),
    "seq": _got("UP field 'seq' must be an integer >= 1"),
    "layer": _got(f"UP field 'layer' must be {OUTPUT_LAYER!r}"),
    "shape": _got("UP field 'shape' must be [n_outputs >= 1, hidden >= 1]"),
    "weight": _fixed("UP field 'weight' must be a base64 string"),
    "bias": _fixed("UP field 'bias' must be a base64 string"),
    "sha256": _fixed("UP field 'sha256' must be 64 lowercase hex digits"),
    "n_examples": _got("UP field 'n_examples' must be an integer >= 0"),
    "created_at": _got("UP field 'created_at' must be an ISO 8601 time"),
}
_AT_FIELD = re.compile(r"at `\$\.([A-Za-z_][A-Za-z0-9_]*)")
_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")


def _convert(message: Any, cls: type, kind: str,
             reasons: Mapping[str, Callable[[Any], str]]) -> Any:
    """``message`` as a ``cls`` struct, or a :class:`MessageError` worded for its field."""
    if not isinstance(message, Mapping):
        raise MessageError(f"{kind} must be a JSON object")
    if message.get("type") != kind:
        article = "an" if kind[:1] in "AEIOU" else "a"
        raise MessageError(f"not {article} {kind}: type {message.get('type')!r}")
    try:
        return msgspec.convert(dict(message), cls, strict=True)
    except msgspec.ValidationError as exc:
        text = str(exc)
        found = _AT_FIELD.search(text) or _MISSING_FIELD.search(text)
        key = found.group(1) if found else None
        if key is not None and key in reasons:
            raise MessageError(reasons[key](message.get(key, _MISSING))) from None
        raise MessageError(f"{kind} is malformed: {text}"[:200]) from None


def _b64(name: str, text: str, n_values: int) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MessageError(f"UP field {name!r} is not valid base64") from None
    if len(raw) != 4 * n_values:
        raise MessageError(f"UP field {name!r} holds {len(raw)} bytes; shape says {n_values} "
                           f"float32 values ({4 * n_values} bytes)")
    return raw


def _is_iso_time(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


# -- the ledger ---------------------------------------------------------------------------------

class Record(NamedTuple):
    """One record of the update topic: its offset and value (the producer's timestamp is
    carried for logs only; order is the offset's)."""

    offset: int
    value: bytes | str | Mapping[str, Any] | None
    timestamp: int | None = None


@dataclass(frozen=True)
class Note:
    """What folding one record did, for the reader's logs and counters.

    ``kind`` is ``"announced"``, ``"pinned"``, ``"update"`` (kept as the newest of its base),
    ``"stale"`` (an update not newer than the one kept), ``"other-model"``, ``"unknown"`` (not
    a message of a known type: ignored), ``"malformed"`` (a known type that does not validate;
    ``message_type`` says which), ``"candidate"`` (an announcement that starts a rollout),
    ``"promoted"`` and ``"aborted"`` (a decision that ended it), ``"stale-decision"`` (a
    decision about another version than the candidate: ignored), or ``"seen"`` (an offset
    already folded). ``changed`` is True
    when what should serve, or the update to apply, may differ.
    """

    kind: str
    changed: bool = False
    version: str | None = None
    message_type: str | None = None
    reason: str | None = None
    message: Message | None = None


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Ledger:
    """What the update topic, folded up to :attr:`position`, says about one model.

    Attributes
    ----------
    model : str
        The model this ledger follows; other models' messages are skipped.
    position : int
        Offset of the next record to fold.
    announced : mapping of version to ModelRef
        Announced versions, oldest announcement first (a re-announcement moves to the end).
    pinned : str or None
        The version of the newest PIN, None when there is none or it was lifted.
    refused : mapping of version to reason
        Versions whose artifact did not verify for this reader (see :func:`refuse`).
    updates : mapping of base version to ModelUpdate
        The newest valid update of each base version.
    stale : int
        Updates dropped because they were not newer than the one kept.
    rollout : Rollout
        How an announcement without a ``rollout`` goes live (the reader's default; every
        reader of a deployment has the same settings).
    candidate : Candidate or None
        The version in rollout, None when no rollout is in progress.
    held : frozenset of str
        Versions announced under a rollout and not promoted: never what
        :func:`should_serve` names (the candidate, aborted ones, superseded ones).
    aborted : mapping of version to reason
        Versions an ``ABORT`` ended the rollout of (until announced again).
    decisions : tuple of Decision
        The decisions folded, oldest first (the last few only).
    """

    model: str
    position: int = 0
    announced: Mapping[str, ModelRef] = field(default_factory=lambda: _frozen({}))
    pinned: str | None = None
    refused: Mapping[str, str] = field(default_factory=lambda: _frozen({}))
    updates: Mapping[str, ModelUpdate] = field(default_factory=lambda: _frozen({}))
    stale: int = 0
    rollout: Rollout = field(default_factory=Rollout)
    candidate: "Candidate | None" = None
    held: frozenset[str] = frozenset()
    aborted: Mapping[str, str] = field(default_factory=lambda: _frozen({}))
    decisions: tuple[Decision, ...] = ()


@dataclass(frozen=True)
class Candidate:
    """The version in rollout: its ``mode`` and canary ``share``, the offset of the
    announcement that started the rollout (``since``) and its producer timestamp
    (``since_ms``, for display only)."""

    version: str
    mode: str
    share: float
    since: int
    since_ms: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"candidate": self.version, "mode": self.mode, "share": self.share,
                "since": self.since, "since_ms": self.since_ms}


#: Decisions a ledger keeps for display.
_DECISIONS_KEPT = 10


def step(ledger: Ledger, record: Record) -> tuple[Ledger, Note]:
    """Fold one record into ``ledger``: the new ledger and a :class:`Note` of what happened.

    Records must come in offset order; one at an offset below :attr:`Ledger.position` was
    folded already and changes nothing.
    """
    if record.offset < ledger.position:
        return ledger, Note("seen")
    moved = dataclasses.replace(ledger, position=record.offset + 1)
    try:
        parsed = _parse(record.value)
    except UnknownType as exc:
        return moved, Note("unknown", reason=str(exc))
    kind = parsed.get("type")
    if kind not in TYPES:
        version = parsed.get("version")
        return moved, Note("unknown", version=version if isinstance(version, str) else None,
                           reason=f"unknown message type {kind!r}")
    model = parsed.get("model")
    if isinstance(model, str) and model != ledger.model:
        return moved, Note("other-model", message_type=kind)
    try:
        message = decode_message(parsed)
    except MessageError as exc:
        version = parsed.get("version") if kind != UP else (
            f"{parsed.get('base_version', '?')}+{parsed.get('seq', '?')}")
        return moved, Note("malformed", version=str(version) if version is not None else "?",
                           message_type=kind, reason=str(exc))
    if isinstance(message, ModelRef):
        return _announce(ledger, moved, message, record)
    if isinstance(message, Decision):
        return _decide(moved, message)
    if isinstance(message, Pin):
        return (dataclasses.replace(moved, pinned=message.version),
                Note("pinned", True, message.version, PIN, message=message))
    known = ledger.updates.get(message.base_version)
    if known is not None and message.seq <= known.seq:
        return (dataclasses.replace(moved, stale=ledger.stale + 1),
                Note("stale", False, message.version, UP,
                     reason=f"not newer than +{known.seq}", message=message))
    updates = {**ledger.updates, message.base_version: message}
    return (dataclasses.replace(moved, updates=_frozen(updates)),
            Note("update", True, message.version, UP, message=message))


def _announce(ledger: Ledger, moved: Ledger, message: ModelRef,
              record: Record) -> tuple[Ledger, Note]:
    version = message.version
    announced = {v: r for v, r in ledger.announced.items() if v != version}
    announced[version] = message
    rollout = message.rollout or ledger.rollout
    # A version announced again starts afresh: its abort and hold are forgotten.
    held = ledger.held - {version}
    aborted = {v: r for v, r in ledger.aborted.items() if v != version}
    # Something to compare with: a version the topic lets serve (refusals are local).
    incumbent = any(v not in held for v in ledger.announced if v != version)
    candidate: Candidate | None = None
    if rollout.mode != IMMEDIATE and incumbent:
        candidate = Candidate(version, rollout.mode, rollout.share, record.offset,
                              record.timestamp)
        held = held | {version}
    # A newer announcement ends the rollout in progress; its candidate stays held.
    return (dataclasses.replace(moved, announced=_frozen(announced), held=held,
                                aborted=_frozen(aborted), candidate=candidate),
            Note("announced" if candidate is None else "candidate", True, version, MODEL_REF,
                 message=message))


def _decide(moved: Ledger, message: Decision) -> tuple[Ledger, Note]:
    current = moved.candidate
    if current is None or current.version != message.version:
        return moved, Note("stale-decision", False, message.version, message.kind,
                           reason="not the candidate in rollout", message=message)
    decisions = (moved.decisions + (message,))[-_DECISIONS_KEPT:]
    version = message.version
    if message.kind == PROMOTE:
        # Promoted: it counts as the newest announcement, so it serves.
        announced = {v: r for v, r in moved.announced.items() if v != version}
        announced[version] = moved.announced[version]
        return (dataclasses.replace(moved, announced=_frozen(announced),
                                    held=moved.held - {version}, candidate=None,
                                    decisions=decisions),
                Note("promoted", True, version, PROMOTE, message=message))
    aborted = {**moved.aborted, version: message.reason or f"aborted by {message.by}"}
    return (dataclasses.replace(moved, aborted=_frozen(aborted), candidate=None,
                                decisions=decisions),
            Note("aborted", True, version, ABORT, message=message))


def fold(ledger: Ledger, record: Record) -> Ledger:
    """The ledger after ``record`` (see :func:`step`)."""
    return step(ledger, record)[0]


def replay(records: Iterable[Record], model: str,
           ledger: Ledger | None = None) -> Ledger:
    """Fold ``records`` (one partition's, in offset order) into ``ledger`` (a new one for
    ``model`` when None)."""
    result = ledger if ledger is not None else Ledger(model)
    for record in records:
        result = fold(result, record)
    return result


def refuse(ledger: Ledger, version: str, reason: str) -> Ledger:
    """The ledger with ``version`` refused: its artifact failed verification for ``reason``."""
    return dataclasses.replace(ledger, refused=_frozen({**ledger.refused, version: reason}))


def fallback(ledger: Ledger) -> str | None:
    """The newest announced version that is not refused nor held by a rollout: what serves
    when nothing is pinned."""
    for version in reversed(list(ledger.announced)):
        if version not in ledger.refused and version not in ledger.held:
            return str(version)
    return None


def should_serve(ledger: Ledger) -> str | None:
    """The version that should serve: the pinned one if it was announced and is neither
    refused nor aborted, else :func:`fallback`; None when no version qualifies. The candidate
    of a rollout is never named here (see :func:`candidate`)."""
    pinned = ledger.pinned
    if pinned is not None and pinned in ledger.announced and pinned not in ledger.refused \
            and pinned not in ledger.aborted:
        return pinned
    return fallback(ledger)


def candidate(ledger: Ledger) -> Candidate | None:
    """The rollout serving routes to alongside :func:`should_serve`: the candidate, unless a
    pin holds (the operator's choice serves alone) or the candidate was refused."""
    current = ledger.candidate
    if current is None or current.version in ledger.refused:
        return None
    if ledger.pinned is not None and should_serve(ledger) == ledger.pinned:
        return None
    return current


def protected(ledger: Ledger) -> frozenset[str]:
    """Versions generation clean-up must keep: the one that should serve, the pinned one, the
    one that serves once the pin is lifted, and the candidate in rollout."""
    rolling = ledger.candidate.version if ledger.candidate is not None else None
    return frozenset(v for v in (should_serve(ledger), ledger.pinned, fallback(ledger),
                                 rolling) if v)


def settle(ledger: Ledger, verify: Callable[[ModelRef], Any]) -> Ledger:
    """Verify the version :func:`should_serve` names with ``verify`` (which raises when the
    artifact does not verify) and refuse it if it fails, until one verifies or none is left.

    Returns the ledger with the refusals found; its :func:`should_serve` is verified (or None).
    """
    while True:
        version = should_serve(ledger)
        if version is None:
            return ledger
        try:
            verify(ledger.announced[version])
        except Exception as exc:  # noqa: BLE001 - any failure refuses, as serving does
            ledger = refuse(ledger, version, describe_error(exc))
        else:
            return ledger


def describe_error(exc: BaseException) -> str:
    """A refusal's reason: the message of one of Stratum's own errors
    (:class:`app.errors.StratumError`), else the exception's type and first line."""
    if isinstance(exc, StratumError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
