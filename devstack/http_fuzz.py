"""A fuzzer for a running worker's HTTP endpoints.

Shared by ``tests/test_hostile.py`` (a few hundred requests with a fixed seed) and
``bench/fuzz_http.py`` (as many as asked). Requests are written on raw sockets, so that they
can be anything a client may send: any method, real and made-up paths with odd ids (very long,
percent-encoded, non-UTF-8, unicode), broken or huge headers, wrong or lying Content-Length,
bodies up to several MB (random bytes, 100,000 ``[``, huge arrays, invalid UTF-8, requests of
the right shape with the wrong types), sent at once or byte by byte with pauses, completed or
abandoned half-way.

The worker must answer every request it can parse with a status below 500, and every refusal
of a well-formed request with a JSON ``{"error": ...}`` (docs/contract.md, HTTP).
"""
from __future__ import annotations

import asyncio
import gzip
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence
from urllib.parse import quote, urlsplit

__all__ = ["FuzzRequest", "FuzzAnswer", "FuzzReport", "make_requests", "send", "fuzz"]

#: Routes of serving/web.py, with ``{name}`` and ``{id}`` filled in by the generator.
ROUTES = ["/", "/plain", "/dashboard.json", "/static/{name}", "/ready", "/tables/",
          "/tables/{name}/", "/predictions/{id}/", "/predict", "/models/", "/models/rollback",
          "/models/pin", "/metrics"]
TABLES = ["latest_predictions", "class_counts", "scored_by_version", "quality_by_version"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
#: Rarer methods aiohttp's HTTP parser knows.
ODD_METHODS = ["SEARCH", "TRACE", "PROPFIND", "MKCOL", "PURGE", "REPORT", "LINK"]
#: Methods the parser refuses before any view sees them: not HTTP tokens at all, and tokens
#: it does not know (RFC 9110 allows any, but aiohttp's parser has a fixed list), and CONNECT
#: to a path.
BAD_METHODS = ["G ET", "GET\x00", "(POST)", "G\u00c9T", "CONNECT", "BREW", "X-STRATUM", "get",
               "PoSt"]
#: Bodies are sent slowly only below this size (a slow megabyte would take hours).
SLOW_MAX_BYTES = 2048
#: How long an answer to a request may take (pins wait for the worker, up to 30 s).
ANSWER_TIMEOUT_S = 40.0
#: How long an answer is waited for when the request lied about its length: the server is
#: right to wait for the rest, so no answer is not a failure there.
SHORT_BODY_WAIT_S = 1.0


@dataclass
class FuzzRequest:
    """One request: a description and the bytes to send, and how to send them."""

    kind: str
    method: str
    target: str
    data: bytes
    #: "normal", "slow" (in small pieces with pauses, then read the answer) or "abandon"
    #: (part of it slowly, then hang up).
    pace: str = "normal"
    #: Whether the HTTP message itself is valid: then any refusal must be a JSON error.
    well_formed: bool = True
    #: The request announced more body than it sends: the server may wait for the rest.
    short_body: bool = False

    def describe(self) -> str:
        head = self.data.split(b"\r\n\r\n", 1)[0]
        shown = head if len(head) <= 400 else head[:400] + b"..."
        return (f"{self.kind} ({len(self.data)} bytes, {self.pace}): "
                f"{shown.decode('utf-8', 'backslashreplace')}")


@dataclass
class FuzzAnswer:
    """What came back: a status (None: no answer), content type and body."""

    status: int | None
    content_type: str = ""
    body: bytes = b""
    error: str = ""


@dataclass
class FuzzReport:
    requests: int = 0
    by_class: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    #: Refusals of well-formed requests that were not a JSON ``{"error": ...}``.
    not_json_errors: list[dict[str, Any]] = field(default_factory=list)
    #: Refusals of malformed HTTP (answered by the HTTP parser, before any view).
    protocol_errors: int = 0
    #: Requests with no answer that should have had one.
    unanswered: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    alive_after: bool = False

    def summary(self) -> dict[str, Any]:
        return {"requests": self.requests, "by_class": dict(sorted(self.by_class.items())),
                "by_status": {str(k): v for k, v in sorted(self.by_status.items(),
                                                           key=lambda kv: str(kv[0]))},
                "server_errors": len(self.server_errors),
                "server_error_examples": self.server_errors[:5],
                "not_json_errors": len(self.not_json_errors),
                "not_json_error_examples": self.not_json_errors[:5],
                "protocol_errors": self.protocol_errors,
                "unanswered": len(self.unanswered),
                "unanswered_examples": self.unanswered[:5],
                "seconds": round(self.seconds, 1), "alive_after": self.alive_after}


# -- generating requests ----------------------------------------------------------------------

class _Generator:
    def __init__(self, rng: random.Random, host: str, token: str | None,
                 known_ids: Sequence[str], valid_event: dict[str, Any]) -> None:
        self.rng = rng
        self.host = host
        self.token = token
        self.known_ids = list(known_ids) or ["some-id"]
        self.valid_event = valid_event

    # pieces

    def an_id(self) -> str:
        r = self.rng
        choice = r.randrange(12)
        if choice == 0:
            return quote(r.choice(self.known_ids), safe="")
        if choice == 1:
            return "x" * r.choice([257, 2000, 7000])
        if choice == 2:
            length = r.randrange(1, 40)
            return quote("".join(chr(r.randrange(0x80, 0x2FFF)) for _ in range(length)))
        if choice == 3:
            return r.choice(["%ED%A0%80", "%FF%FE", "%C0%AF", "%00", "%2F", "%2e%2e", "%25",
                             "%", "%zz", "%E2%82"])
        if choice == 4:
            return r.choice(["..", ".", "%2F..%2F..%2Fetc%2Fpasswd", "a%20b", "a+b", "a;b=c",
                             quote("\U0001F600"), quote("é"), quote("ü")])
        if choice == 5:
            return "".join(r.choice("abc-_.~!$&'()*+,;=:@") for _ in range(r.randrange(1, 30)))
        if choice == 6:
            return quote("".join(chr(r.randrange(0, 0x80)) for _ in range(r.randrange(1, 20))),
                         safe="")
        return f"id-{r.randrange(10**6)}"

    def a_query(self) -> str:
        r = self.rng
        if r.random() < 0.5:
            return ""
        value = r.choice(["1", "0", "1000", "1001", "-1", "", "lots", "9" * 5000, "1e3",
                          "0x10", "\u00b2", "\u0661\u0662", "\U0001F600", "%00", "%ff",
                          "00000000000000000000010", "100&limit=2", "3.5", "+5", "5 "])
        name = r.choice(["limit", "limit", "LIMIT", "x", "", "limit[]", "%ff"])
        return f"?{name}={quote(value, safe='%&=')}"

    def a_path(self) -> tuple[str, bool]:
        """A request target, and whether it is valid in a request line."""
        r = self.rng
        choice = r.randrange(10)
        if choice < 7:
            route = r.choice(ROUTES)
            path = route.replace("{id}", self.an_id()).replace(
                "{name}", r.choice(TABLES) if r.random() < 0.6 else self.an_id())
            if r.random() < 0.15 and len(path) > 1:  # without the trailing slash, or two
                path = path[:-1] if path.endswith("/") else path + "//"
            return path + self.a_query(), True
        if choice == 7:
            # Paths no view serves (Faust's own /router/, /table/, ... among them).
            return r.choice(["/router/", "/router/topics", "/router/nope/",
                             "/router/latest_predictions/", "/router/nope/key/", "/table/",
                             "/graph/", "/stats/", "/nope", "//", "/predictions/",
                             "/predictions//", "/tables", "/models", "/ready/",
                             "/../../etc/passwd", "/%00", "/%ff", "/static/../app",
                             "http://elsewhere.example/ready", "/predict?" + "a=1&" * 500]), True
        if choice == 8:
            return "/" + "a" * r.choice([5000, 9000, 20000]), True  # over aiohttp's 8190
        # Not valid in a request line: raw non-ASCII bytes, spaces, controls, no slash.
        return r.choice(["/predictions/\u00e9/", "/tab les/", "/ready\x00", "/\x7f", "*",
                         "ready", "", "?limit=1"]), False

    def content_type(self) -> str | None:
        return self.rng.choice([None, "application/json", "application/json",
                                "application/json; charset=latin-1", "text/plain",
                                "application/x-www-form-urlencoded",
                                "multipart/form-data; boundary=xyz", "application/octet-stream",
                                "garbage", "application/json; charset=\u00e9", ""])

    def authorization(self) -> str | None:
        r = self.rng
        return r.choice([None, None, f"Bearer {self.token}" if self.token else None,
                         f"bearer  {self.token}" if self.token else None, "Bearer wrong",
                         "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer " + "t" * 6000,
                         f"Bearer {self.token}x" if self.token else "Bearer x",
                         # UTF-8, and bytes that are not UTF-8 (written as they are)
                         "Bearer \u00e9\u00e9", "Bearer \udce9\udcff", "Token abc"])

    def body(self) -> tuple[bytes, str]:
        r = self.rng
        choice = r.randrange(22)
        event = dict(self.valid_event)
        if choice == 0:
            return b"", "empty body"
        if choice == 1:
            return r.randbytes(r.choice([1, 100, 5000, 200_000])), "random bytes"
        if choice == 2:
            return r.randbytes(r.choice([1_100_000, 3_000_000])), "random MB"
        if choice == 3:
            return b"[" * 100_000, "100,000 ["
        if choice == 4:
            depth = r.choice([100, 254, 255, 900, 990, 1000, 1024, 1025, 5000])
            return (b'{"a":' * depth + b"1" + b"}" * depth), f"object nested {depth} deep"
        if choice == 5:
            depth = r.choice([254, 255, 900, 990, 1023, 1100])
            return json.dumps({**event, "features": "PLACE"}).replace(
                '"PLACE"', "[" * depth + "1" + "]" * depth).encode(), f"features {depth} deep"
        if choice == 6:
            n = r.choice([1024, 1025, 100_000, 400_000])
            return (b"[" + b",".join([b"1"] * n) + b"]"), f"array of {n}"
        if choice == 7:
            n = r.choice([2, 1024, 1025])
            return json.dumps([{**event, "id": f"fuzz-{i}"} for i in range(n)]).encode(), \
                f"{n} valid events"
        if choice == 8:
            return json.dumps(event).encode()[:-1] + b"\xff\xfe}", "invalid UTF-8"
        if choice == 9:
            return b"\xef\xbb\xbf" + json.dumps(event).encode(), "BOM"
        if choice == 10:
            literal = r.choice(["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400,
                                "-0", "1e-400", "1.7976931348623157e308"])
            return json.dumps({**event, "features": "PLACE"}).replace(
                '"PLACE"', "[" + ",".join([literal] * len(event["features"])) + "]"
            ).encode(), f"features of {literal[:10]}"
        if choice == 11:
            wrong = r.choice([{"id": 5}, {"id": None}, {"id": ""}, {"id": "x" * 300},
                              {"id": ["a"]}, {"features": "1,2,3"}, {"features": None},
                              {"features": []}, {"features": [True] * 3}, {"label": {"x": 1}},
                              {"label": "nope"}, {"ts": -5}, {"ts": "now"}, {"extra": 1},
                              {"features": {"zz": 1}}, {"label": [[[[]]]]}])
            return json.dumps({**event, **wrong}).encode(), f"wrong type {sorted(wrong)}"
        if choice == 12:
            return json.dumps(r.choice([None, 1, "s", True, [], {}, [None], [1, 2], [[]],
                                        {"version": None}, {"version": 5},
                                        {"version": "no-such-version"}, {"version": []},
                                        {"version": "x" * 5000}, {"version": "\ud800"},
                                        {"versions": "a"}])).encode(), "odd JSON"
        if choice == 13:
            return (b'{"id": "\\ud800", "features": ' + json.dumps(event["features"]).encode()
                    + b"}"), "lone surrogate"
        if choice == 14:
            return b'{"version": "\\udc00"}', "lone surrogate version"
        if choice == 15:
            return json.dumps({**event, "id": "\u0000\u0001" + "\U0001F600"}).encode(), \
                "controls in id"
        if choice == 16:
            return b" " * r.choice([1_048_576, 1_048_577, 2_000_000]), "whitespace MB"
        if choice == 17:
            return json.dumps(event).encode() + b"garbage", "trailing garbage"
        if choice == 18:
            return b'{"id": "a", "id": "b", "features": ' + json.dumps(
                event["features"]).encode() + b"}", "duplicate keys"
        return json.dumps(event).encode(), "valid event"

    # whole requests

    def request(self) -> FuzzRequest:
        r = self.rng
        roll = r.random()
        method = (r.choice(METHODS) if roll < 0.85 else r.choice(ODD_METHODS) if roll < 0.95
                  else r.choice(BAD_METHODS))
        well_formed = method not in BAD_METHODS
        target, target_ok = self.a_path()
        well_formed &= target_ok and len(target) < 8000
        has_body = method not in ("GET", "HEAD", "OPTIONS") or r.random() < 0.15
        body, what = self.body() if has_body else (b"", "no body")
        headers: list[tuple[str, str]] = [("Host", self.host)]
        ctype = self.content_type() if has_body else None
        if ctype is not None:
            headers.append(("Content-Type", ctype))
        auth = self.authorization()
        if auth is not None:
            headers.append(("Authorization", auth))
            well_formed &= len(auth) < 8000
        length: str | None = str(len(body)) if has_body else None
        short_body = False
        chunked = False
        mangle = r.random()
        kind = what
        if mangle < 0.04:
            length, kind = r.choice(["abc", "-1", "1.5", "99999999999999999999999", "0x10",
                                     " 5"]), f"bad Content-Length ({what})"
            well_formed = False
        elif mangle < 0.07 and has_body:
            length, short_body, kind = str(len(body) + r.choice([1, 100, 10**6])), True, \
                f"Content-Length over the body ({what})"
        elif mangle < 0.09 and has_body and len(body) > 1:
            length, kind = str(len(body) // 2), f"Content-Length under the body ({what})"
            well_formed = False  # the rest reads as a second, garbage request
        elif mangle < 0.12 and has_body:
            chunked, kind = True, f"chunked ({what})"
        elif mangle < 0.13 and has_body:
            headers.append(("Content-Length", str(len(body))))
            kind = f"two Content-Length ({what})"
            well_formed = False
        elif mangle < 0.14 and has_body:
            headers.append(("Transfer-Encoding", "chunked"))
            kind = f"Content-Length and chunked ({what})"
            well_formed = False
        elif mangle < 0.17:
            headers.append(("X-Huge", "h" * r.choice([4000, 9000, 70000])))
            well_formed &= len(headers[-1][1]) < 8000
            kind = f"huge header ({what})"
        elif mangle < 0.19:
            many = r.choice([100, 200])
            headers += [(f"X-Many-{i}", "v") for i in range(many)]
            kind = f"many headers ({what})"
            well_formed &= many < 120  # aiohttp's parser takes 128 at most
        elif mangle < 0.21:
            value = r.choice(["a\x00b", "line\rbreak", "\u00e9\u00e8", "\udce9\udcff"])
            headers.append(("X-Odd", value))
            kind = f"odd header value ({what})"
            well_formed &= "\x00" not in value and "\r" not in value
        elif mangle < 0.22:
            headers.append(("Bad Name", "x"))
            kind = f"bad header name ({what})"
            well_formed = False
        elif mangle < 0.24:
            headers.append(("Expect", "100-continue"))
            kind = f"expect 100-continue ({what})"
        elif mangle < 0.26:
            encoding = r.choice(["gzip", "deflate", "br", "zstd"])
            headers.append(("Content-Encoding", encoding))
            if encoding == "gzip" and has_body and r.random() < 0.5:
                body = gzip.compress(body)
                length = str(len(body))
                kind = f"gzip ({what})"
            else:
                # Not what it claims (or an encoding aiohttp cannot decode): the parser may
                # refuse it before a view sees it, depending on when the body arrives.
                kind = f"claims {encoding} ({what})"
                well_formed = False
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
            pieces = [body[i:i + 65536] for i in range(0, len(body), 65536)]
            payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
            if r.random() < 0.3:
                payload = b"zz\r\n" + payload  # not a chunk size
                well_formed = False
                kind = f"bad chunk ({what})"
        else:
            payload = body
            if length is not None:
                headers.append(("Content-Length", length))
        headers.append(("Connection", "close"))
        head = f"{method} {target} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        data = head.encode("utf-8", "surrogateescape") + payload
        pace = "normal"
        if len(data) <= SLOW_MAX_BYTES and r.random() < 0.15:
            pace = r.choice(["slow", "slow", "abandon"])
        return FuzzRequest(kind, method, target, data, pace, well_formed, short_body)


def make_requests(n: int, seed: int, host: str, token: str | None = None,
                  known_ids: Sequence[str] = (),
                  valid_event: dict[str, Any] | None = None) -> list[FuzzRequest]:
    """``n`` requests, the same for the same ``seed``."""
    generator = _Generator(random.Random(seed), host, token, known_ids,
                           valid_event or {"id": "fuzz", "features": [1.0, 2.0, 3.0]})
    return [generator.request() for _ in range(n)]


# -- sending them -----------------------------------------------------------------------------

async def send(host: str, port: int, request: FuzzRequest, rng: random.Random) -> FuzzAnswer:
    """Send one request on a fresh connection and read the answer (if any)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (OSError, asyncio.TimeoutError) as exc:
        return FuzzAnswer(None, error=f"cannot connect: {exc!r}")
    try:
        try:
            if request.pace == "normal":
                writer.write(request.data)
                await writer.drain()
            else:
                stop = (len(request.data) if request.pace == "slow"
                        else rng.randrange(1, max(2, len(request.data))))
                sent = 0
                while sent < stop:
                    step = min(rng.randrange(1, 24), stop - sent)
                    writer.write(request.data[sent:sent + step])
                    await writer.drain()
                    sent += step
                    # The client's pace is what is tested: a pause between pieces.
                    await asyncio.sleep(rng.uniform(0.0005, 0.01))
                if request.pace == "abandon":
                    return FuzzAnswer(None, error="abandoned")
        except (ConnectionError, OSError):
            pass  # the server may answer and close before reading everything
        wait = SHORT_BODY_WAIT_S if request.short_body else ANSWER_TIMEOUT_S
        try:
            return await asyncio.wait_for(_read_answer(reader, request.method), wait)
        except asyncio.TimeoutError:
            return FuzzAnswer(None, error=f"no answer within {wait}s")
        except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            return FuzzAnswer(None, error=f"connection: {exc!r}")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def _read_answer(reader: asyncio.StreamReader, method: str) -> FuzzAnswer:
    status_line = await reader.readline()
    if not status_line:
        return FuzzAnswer(None, error="closed without an answer")
    parts = status_line.decode("latin-1").split(" ", 2)
    status = int(parts[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if status == 100:  # "Expect: 100-continue" answered; the real answer follows
        return await _read_answer(reader, method)
    body = b""
    if method != "HEAD" and status not in (204, 304):
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await reader.readline()
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readline()
            body = b"".join(chunks)
        else:
            body = await reader.read()
    return FuzzAnswer(status, headers.get("content-type", ""), body)


def _is_json_error(answer: FuzzAnswer) -> bool:
    if not answer.content_type.startswith("application/json"):
        return False
    try:
        payload = json.loads(answer.body)
    except ValueError:
        return False
    return isinstance(payload, dict) and isinstance(payload.get("error"), str) and bool(
        payload["error"])


async def fuzz(url: str, requests: Sequence[FuzzRequest], seed: int = 0,
               concurrency: int = 8) -> FuzzReport:
    """Send ``requests`` to the worker at ``url``, ``concurrency`` at a time; then check that
    it still answers ``GET /ready``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    rng = random.Random(seed + 1)
    report = FuzzReport(requests=len(requests))
    limit = asyncio.Semaphore(concurrency)
    started = time.monotonic()

    async def one(request: FuzzRequest) -> None:
        async with limit:
            answer = await send(host, port, request, random.Random(rng.random()))
        example = {"request": request.describe(), "status": answer.status,
                   "content_type": answer.content_type,
                   "body": answer.body[:300].decode("utf-8", "replace"),
                   "error": answer.error}
        if answer.status is None:
            report.by_class["none"] += 1
            report.by_status["none"] += 1
            # A server may close on malformed HTTP before reading it all; the client then
            # gets a reset instead of the answer.
            if request.pace != "abandon" and not request.short_body and request.well_formed:
                report.unanswered.append(example)
            return
        report.by_class[f"{answer.status // 100}xx"] += 1
        report.by_status[answer.status] += 1
        if answer.status >= 500:
            report.server_errors.append(example)
        elif answer.status >= 400:
            if not request.well_formed:
                report.protocol_errors += 1
            elif request.method != "HEAD" and not _is_json_error(answer):
                report.not_json_errors.append(example)

    await asyncio.gather(*(one(r) for r in requests))
    report.seconds = time.monotonic() - started
    ready = await send(host, port, FuzzRequest(
        "ready", "GET", "/ready",
        f"GET /ready HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()), rng)
    report.alive_after = ready.status == 200
    return report
