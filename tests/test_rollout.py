"""A rollout's pure parts: stable canary routing and the policy's statistical decisions."""
from __future__ import annotations

import math

import numpy as np
import pytest

from transport.rollout import Quality, canary_position, decide, log_mixture_ratio, to_candidate


def test_an_id_always_gets_the_same_version_and_the_share_is_respected() -> None:
    ids = [f"user-{i}" for i in range(20_000)]
    routed = to_candidate(ids, 0.1)
    assert (routed == to_candidate(ids, 0.1)).all()  # stable, call after call
    assert canary_position("user-7") == canary_position("user-7")
    assert 0.0 <= min(map(canary_position, ids[:100])) < 1.0
    # 2,000 expected; 4 standard deviations is about 170.
    assert abs(int(routed.sum()) - 2000) < 170
    # Raising the share only moves ids to the candidate.
    wider = to_candidate(ids, 0.3)
    assert (wider | ~routed).all() and abs(int(wider.sum()) - 6000) < 260


def test_the_mixture_ratio_grows_with_the_evidence() -> None:
    # No difference: the ratio is below 1 (the mixture spreads over alternatives).
    assert log_mixture_ratio(0.0, 0.02, 0.05) == pytest.approx(0.5 * math.log(4e-4 / 29e-4))
    assert log_mixture_ratio(3.0, 0.02, 0.05) == log_mixture_ratio(-3.0, 0.02, 0.05)
    assert log_mixture_ratio(2.0, 0.02, 0.05) < log_mixture_ratio(4.0, 0.02, 0.05)
    # The same z is weaker evidence with more events: a z of 2 stays under 1/0.05 for ever.
    assert log_mixture_ratio(4.0, 0.002, 0.05) < log_mixture_ratio(4.0, 0.02, 0.05)
    assert max(log_mixture_ratio(2.0, se, 0.05) for se in (0.1, 0.01, 0.001)) < math.log(20)


def quality(losses: np.ndarray) -> Quality:
    q = Quality()
    q.add(losses)
    return q


def misses(n: int, accuracy: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(n) >= accuracy).astype(np.float64)


SETTINGS = {"min_events": 200, "margin": 0.01, "alpha": 0.05, "effect": 0.05}


def test_classification_waits_for_enough_events_then_promotes_or_aborts() -> None:
    serving = quality(misses(150, 0.7, 1))
    better = quality(misses(150, 0.9, 2))
    verdict = decide(serving, better, "classification", **SETTINGS)
    assert verdict.action == "wait" and verdict.figures["n_candidate"] == 150
    serving.add(misses(350, 0.7, 3))
    better.add(misses(350, 0.9, 4))
    verdict = decide(serving, better, "classification", **SETTINGS)
    assert verdict.action == "promote", verdict
    assert verdict.figures["test"] == "two-proportion-z"
    assert verdict.figures["accuracy_candidate"] > verdict.figures["accuracy_serving"]
    assert verdict.figures["p_not_worse"] < 0.05
    worse = decide(serving, quality(misses(500, 0.5, 5)), "classification", **SETTINGS)
    assert worse.action == "abort" and worse.figures["p_worse"] < 0.05
    # Equal within noise, with no margin: no evidence either way.
    same = decide(quality(misses(500, 0.8, 6)), quality(misses(500, 0.8, 6)),
                  "classification", min_events=200, margin=0.0, alpha=0.05, effect=0.05)
    assert same.action == "wait"
    # A margin lets an equal candidate through once the evidence is there.
    tolerant = decide(quality(misses(5000, 0.8, 7)), quality(misses(5000, 0.8, 7)),
                      "classification", min_events=200, margin=0.03, alpha=0.05,
                      effect=0.05)
    assert tolerant.action == "promote"


def fixed_sample_p(serving: Quality, candidate: Quality, margin: float) -> tuple[float, float]:
    """One-sided p-values of a fixed-sample two-proportion z-test: (worse, not worse)."""
    p_s, p_c = 1 - serving.mean, 1 - candidate.mean
    se = math.sqrt(p_s * (1 - p_s) / serving.n + p_c * (1 - p_c) / candidate.n)
    worse = p_s - p_c
    tail = lambda z: 0.5 * math.erfc(z / math.sqrt(2))  # noqa: E731
    return tail(worse / se), tail((margin - worse) / se)


@pytest.mark.parametrize("candidate_accuracy, wrong", [
    (0.79, "promote"),  # worse by exactly the margin: H0 of the promotion holds
    (0.80, "abort"),  # as good: H0 of the abort holds
])
def test_looking_after_every_batch_keeps_the_error_at_alpha(candidate_accuracy: float,
                                                           wrong: str) -> None:
    """300 rollouts, each looked at every 50 labelled events from 200 to 5,000 a side: the
    sequential test decides wrongly in at most alpha of them; a fixed-sample test asked as
    often would in several times as many."""
    rng = np.random.default_rng(0)
    runs, n_max = 300, 5000
    sequential = fixed = 0
    for _ in range(runs):
        serving_misses = np.cumsum(rng.random(n_max) >= 0.80)
        candidate_misses = np.cumsum(rng.random(n_max) >= candidate_accuracy)
        wrong_sequential = wrong_fixed = False
        for n in range(200, n_max + 1, 50):
            s = Quality(n, float(serving_misses[n - 1]), float(serving_misses[n - 1]))
            c = Quality(n, float(candidate_misses[n - 1]), float(candidate_misses[n - 1]))
            verdict = decide(s, c, "classification", **SETTINGS)
            wrong_sequential |= verdict.action == wrong
            p_worse, p_fine = fixed_sample_p(s, c, SETTINGS["margin"])
            wrong_fixed |= (p_fine if wrong == "promote" else p_worse) < SETTINGS["alpha"]
        sequential += wrong_sequential
        fixed += wrong_fixed
    assert sequential / runs <= SETTINGS["alpha"]
    assert fixed / runs > 2 * SETTINGS["alpha"]


def test_regression_compares_squared_errors_with_welch() -> None:
    rng = np.random.default_rng(0)
    serving = quality(np.square(rng.normal(0, 1.0, 400)))
    better = quality(np.square(rng.normal(0, 0.5, 400)))
    worse = quality(np.square(rng.normal(0, 2.0, 400)))
    promote = decide(serving, better, "regression", **SETTINGS)
    assert promote.action == "promote" and promote.figures["test"] == "welch-squared-error"
    assert promote.figures["mse_candidate"] < promote.figures["mse_serving"]
    # Squared errors are noisy (their spread is about twice the MSE): four times the MSE is
    # not yet beyond doubt after 400 events a side, and is after 1,000.
    assert decide(serving, worse, "regression", **SETTINGS).action == "wait"
    serving.add(np.square(rng.normal(0, 1.0, 600)))
    worse.add(np.square(rng.normal(0, 2.0, 600)))
    aborted = decide(serving, worse, "regression", **SETTINGS)
    assert aborted.action == "abort" and aborted.figures["p_worse"] < SETTINGS["alpha"]


# -- serving ------------------------------------------------------------------------------------

def test_shadow_scores_every_event_with_both_and_canary_splits_by_id() -> None:
    from serving.scoring import split_rows

    ids = [f"id-{i}" for i in range(5000)]
    served, tried = split_rows(ids, "shadow", 0.1)
    assert served.tolist() == tried.tolist() == list(range(5000))
    served, tried = split_rows(ids, None, 0.1)
    assert len(served) == 5000 and len(tried) == 0
    served, tried = split_rows(ids, "canary", 0.2)
    assert sorted(served.tolist() + tried.tolist()) == list(range(5000))
    assert abs(len(tried) - 1000) < 120  # 4 standard deviations
    # The same id goes to the same side in any micro-batch, at any position.
    again_ids = ids[::-1][:2000]
    _, again = split_rows(again_ids, "canary", 0.2)
    assert {again_ids[k] for k in again.tolist()} == {ids[k] for k in tried.tolist()
                                                      if ids[k] in set(again_ids)}


def test_a_shadow_summary_counts_nothing_but_carries_the_labelled_events() -> None:
    from transport.summary import parse_summary, summary_messages

    class Model:
        version = base_version = "v2"
        classes = ["no", "yes"]
        task = "classification"

    outputs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]], dtype=np.float32)
    raw = summary_messages(Model(), ["no", "yes", "yes"], ["a", "b", "c"], ["no", None, "no"],
                           np.zeros((3, 2)), outputs, [1, 2, 3], shadow=True)
    summary = parse_summary(raw[0])
    assert summary.shadow and summary.scored == 0 and summary.classes == {}
    assert summary.labelled is not None and summary.labelled.correct.tolist() == [True, False]
    served = parse_summary(summary_messages(Model(), ["no", "yes", "yes"], ["a", "b", "c"],
                                            ["no", None, "no"], np.zeros((3, 2)), outputs,
                                            [1, 2, 3])[0])
    assert not served.shadow and served.scored == 3
