"""The worker's HTTP endpoints, as a small synchronous client with one-line errors."""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from app.errors import StratumError

DEFAULT_URL = "http://127.0.0.1:6066"
TIMEOUT_S = 60.0


class CliError(StratumError):
    """A command failed; ``str(err)`` is the one line printed after ``stratum: error:``."""


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, JSON body (or text when not JSON)."""

    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def error_line(self) -> str:
        """The answer as one line: ``HTTP 404: <error> (...)``."""
        body = self.body
        if isinstance(body, dict) and "error" in body:
            reason = str(body["error"])
            errors = body.get("errors")
            if isinstance(errors, list) and errors:
                shown = "; ".join(f"#{e.get('index')}: {e.get('error')}" for e in errors[:3]
                                  if isinstance(e, dict))
                more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
                reason = f"{reason}: {shown}{more}"
        else:
            reason = " ".join(str(body).split())[:300] or "(empty body)"
        return f"HTTP {self.status}: {reason}"


class Client:
    """Requests to one worker at ``url``."""

    def __init__(self, url: str, token: str | None = None, timeout: float = TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Answer:
        """Send one request; raise :class:`CliError` when the worker cannot be reached."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
        except urllib.error.URLError as exc:
            raise CliError(f"cannot reach the worker at {self.url}: {_reason(exc.reason)} "
                           "(is it running? set --url or STRATUM_URL)") from None
        except (socket.timeout, TimeoutError):
            raise CliError(f"the worker at {self.url} did not answer {method} {path} "
                           f"within {self.timeout:g}s") from None
        except OSError as exc:
            raise CliError(f"cannot reach the worker at {self.url}: {_reason(exc)}") from None
        text = payload.decode("utf-8", "replace")
        try:
            return Answer(status, json.loads(text))
        except ValueError:
            return Answer(status, text)

    def get(self, path: str) -> Any:
        """GET ``path``; the body of a 2xx answer, else :class:`CliError`."""
        return self.expect(self.request("GET", path))

    def post(self, path: str, body: Any = None) -> Any:
        """POST ``body`` as JSON; the body of a 2xx answer, else :class:`CliError`."""
        return self.expect(self.request("POST", path, body))

    @staticmethod
    def expect(answer: Answer) -> Any:
        if not answer.ok:
            raise CliError(answer.error_line())
        return answer.body


def _reason(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"unknown host ({reason.strerror})"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason)
