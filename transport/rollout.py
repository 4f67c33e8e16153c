"""A rollout's pure parts: which ids a canary routes to its candidate, and the policy that
ends a rollout on live quality.

Routing
    :func:`canary_position` maps an id to a number in [0, 1) by its sha256, the same on every
    worker and across restarts: an id goes to the candidate when its position is below the
    canary share, so an id always gets the same version and raising the share only moves ids
    from the serving version to the candidate.

Policy
    :func:`decide` compares the candidate's live quality with the serving version's, both
    measured since the rollout began (:class:`Quality`: labelled events, hits of a
    classification, squared errors of a regression). After ``min_events`` labelled events of
    each, it

    * aborts when the candidate is significantly worse (one-sided, level ``alpha``, H0:
      candidate at least as good);
    * promotes when the candidate is significantly *not worse by more than* ``margin``
      (non-inferiority, one-sided, level ``alpha``, H0: candidate worse by ``margin`` or more);
    * else waits for more events.

    The difference is estimated as a two-proportion difference of accuracies (unpooled
    standard error; ``margin`` in accuracy points) or, for a regression, a Welch difference of
    mean squared errors (``margin`` relative to the serving version's MSE), both taken as
    normal: with ``min_events`` of 30 or more the approximation holds.

    The policy looks after every labelled micro-batch, so a fixed-sample test would find a
    difference that is not there far more often than ``alpha`` (each look is another chance).
    Each hypothesis is therefore tested sequentially, with the mixture sequential probability
    ratio test (mSPRT; Robbins 1970, as in Johari et al., "Always valid inference", 2017): the
    likelihood ratio of a normal mixture of alternatives, of scale ``effect``, against H0 at its
    boundary. Under H0 it exceeds ``1 / alpha`` *ever*, over all looks, with probability at most
    ``alpha`` (Ville's inequality), so deciding the first time it does keeps the error at
    ``alpha`` however long the rollout runs. ``p_worse`` and ``p_not_worse`` in the figures are
    these always-valid p-values (``1 / ratio``); ``effect`` is the difference the test detects
    soonest (smaller ones take more events, larger ones are found in fewer). The normal tail
    and the ratio need nothing beyond the standard library.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np

__all__ = ["canary_position", "to_candidate", "Quality", "Verdict", "decide",
           "log_mixture_ratio", "Tracker"]


def canary_position(id_: str) -> float:
    """A stable number in [0, 1) for ``id_`` (the first 8 bytes of its sha256)."""
    digest = hashlib.sha256(id_.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def to_candidate(ids: Sequence[str], share: float) -> np.ndarray:
    """Per id, whether a canary of ``share`` serves it with the candidate (bool array)."""
    return np.fromiter((canary_position(i) < share for i in ids), dtype=bool, count=len(ids))


@dataclass
class Quality:
    """One version's live quality since a rollout began: labelled events ``n``, and the sum
    and sum of squares of the per-event loss (a miss, 0 or 1, for a classification; the
    squared error for a regression)."""

    n: int = 0
    loss_sum: float = 0.0
    loss_sq_sum: float = 0.0

    def add(self, losses: np.ndarray) -> None:
        losses = np.asarray(losses, dtype=np.float64)
        self.n += int(losses.size)
        self.loss_sum += float(losses.sum())
        self.loss_sq_sum += float(np.square(losses).sum())

    @property
    def mean(self) -> float:
        return self.loss_sum / self.n if self.n else math.nan

    @property
    def variance(self) -> float:
        """Unbiased sample variance of the losses."""
        if self.n < 2:
            return math.nan
        return max(0.0, (self.loss_sq_sum - self.n * self.mean ** 2) / (self.n - 1))


@dataclass(frozen=True)
class Verdict:
    """What :func:`decide` concluded: ``"promote"``, ``"abort"`` or ``"wait"``, why, and the
    figures (JSON-ready) it decided on."""

    action: Literal["promote", "abort", "wait"]
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


def log_mixture_ratio(z: float, se: float, tau: float) -> float:
    """Log of the mSPRT likelihood ratio for an estimate ``z`` standard errors ``se`` from
    H0's value, mixing alternatives N(H0's value, ``tau``²)."""
    v, t2 = se * se, tau * tau
    return 0.5 * math.log(v / (v + t2)) + z * z * t2 / (2.0 * (v + t2))


def decide(serving: Quality, candidate: Quality, task: str, *, min_events: int,
           margin: float, alpha: float, effect: float) -> Verdict:
    """The policy's verdict on a rollout (see the module's docstring)."""
    regression = task == "regression"
    figures: dict[str, Any] = {"test": "welch-squared-error" if regression else
                               "two-proportion-z", "sequential": "mSPRT",
                               "n_serving": serving.n, "n_candidate": candidate.n,
                               "min_events": min_events, "margin": margin, "alpha": alpha,
                               "effect": effect}
    if min(serving.n, candidate.n) < max(min_events, 2):
        return Verdict("wait", f"fewer than {min_events} labelled events", figures)
    if regression:
        s_loss, c_loss = serving.mean, candidate.mean
        figures.update(mse_serving=s_loss, mse_candidate=c_loss)
        se = math.sqrt(serving.variance / serving.n + candidate.variance / candidate.n)
        allowed, tau = margin * s_loss, effect * s_loss
    else:
        p_s, p_c = 1.0 - serving.mean, 1.0 - candidate.mean
        figures.update(accuracy_serving=p_s, accuracy_candidate=p_c)
        se = math.sqrt(p_s * (1 - p_s) / serving.n + p_c * (1 - p_c) / candidate.n)
        s_loss, c_loss = 1.0 - p_s, 1.0 - p_c
        allowed, tau = margin, effect
    # Worse = a larger loss (a miss rate, or an MSE).
    worse = c_loss - s_loss
    se = max(se, 1e-12)
    tau = max(tau, 1e-12)
    z_worse = worse / se
    z_fine = (allowed - worse) / se
    # Each one-sided: only evidence in its own direction counts.
    log_worse = log_mixture_ratio(z_worse, se, tau) if z_worse > 0 else -math.inf
    log_fine = log_mixture_ratio(z_fine, se, tau) if z_fine > 0 else -math.inf
    p_worse, p_fine = min(1.0, math.exp(-log_worse)), min(1.0, math.exp(-log_fine))
    figures.update(se=se, z_worse=z_worse, p_worse=p_worse, z_not_worse=z_fine,
                   p_not_worse=p_fine)
    threshold = math.log(1.0 / alpha)
    if log_worse >= threshold:
        return Verdict("abort", f"candidate significantly worse (p={p_worse:.3g})", figures)
    if log_fine >= threshold:
        return Verdict("promote", f"candidate not worse by the margin {margin:g} "
                       f"(p={p_fine:.3g})", figures)
    return Verdict("wait", "no significant difference yet", figures)


class Tracker:
    """The policy's figures for one rollout: the serving version's and the candidate's
    :class:`Quality` on the labelled events each predicted since the rollout began (the
    serving version's with any of its updates). Starts afresh when the rollout changes."""

    def __init__(self) -> None:
        self.key: tuple[str, int] | None = None
        self.serving_base: str | None = None
        self.task: str | None = None
        self.serving = Quality()
        self.candidate = Quality()
        #: The rollout a decision was published for (none is published twice).
        self.decided: tuple[str, int] | None = None

    def follow(self, candidate: str | None, since: int | None, serving_base: str | None
               ) -> None:
        """Track the rollout of ``candidate`` (announced at offset ``since``) against
        ``serving_base``; a different one starts afresh."""
        key = (candidate, since) if candidate is not None and since is not None else None
        if key != self.key or serving_base != self.serving_base:
            self.key, self.serving_base = key, serving_base
            self.task = None
            self.serving, self.candidate = Quality(), Quality()

    def observe(self, base_version: str, task: str, losses: np.ndarray) -> None:
        """Count one labelled batch predicted by ``base_version`` (per-event losses: a miss
        of a classification, a squared error of a regression)."""
        if self.key is None or (self.task is not None and task != self.task):
            return
        if base_version == self.key[0]:
            self.candidate.add(losses)
        elif base_version == self.serving_base:
            self.serving.add(losses)
        else:
            return
        self.task = task

    def state(self) -> dict[str, Any]:
        """The figures as JSON, for the table that outlives this worker's hold of them."""
        def side(q: Quality) -> list[float]:
            return [q.n, q.loss_sum, q.loss_sq_sum]
        return {"key": list(self.key) if self.key else None, "serving_base": self.serving_base,
                "task": self.task, "serving": side(self.serving),
                "candidate": side(self.candidate), "decided": self.decided == self.key}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take the figures of ``state`` (from :meth:`state`) when they are of the rollout and
        serving base followed now."""
        key = state.get("key")
        if (self.key is None or key is None or tuple(key) != self.key
                or state.get("serving_base") != self.serving_base):
            return
        self.task = state.get("task")
        self.serving = Quality(int(state["serving"][0]), *map(float, state["serving"][1:]))
        self.candidate = Quality(int(state["candidate"][0]),
                                 *map(float, state["candidate"][1:]))
        if state.get("decided"):
            self.decided = self.key
