"""A synthetic dataset in the schema of the ATLAS Higgs boson machine learning challenge.

The real challenge data (H -> tau tau signal against Z -> tau tau, W and top backgrounds) cannot
be downloaded on an offline machine, so this module simulates events with the same columns:
``EventId``, the 30 ``DER_*``/``PRI_*`` features with their real names and meaning, and
``Label`` (``"s"`` signal, ``"b"`` background). As in the real data:

* jet features are ``-999.0`` when undefined for the event's ``PRI_jet_num`` (leading-jet
  features for 0 jets, the di-jet features for fewer than 2), ``PRI_jet_all_pt`` is 0 without
  jets, and ``DER_mass_MMC`` is sometimes ``-999.0`` (the mass estimator did not converge);
* the derived features are computed from the primitive ones with the challenge's formulas
  (visible mass, transverse mass, centralities, vector sums of transverse momenta, ...);
* about a third of the events are signal and values are rounded to three decimals.

The physics is a caricature (massless visible decay products, a latent resonance mass, a few
hand-tuned distributions), tuned so that a good classifier reaches an AUC of about 0.9 and a
trivial one does not. Everything is vectorised numpy and deterministic given the seed; the
module imports numpy and pandas only, so the demo feed can use it cheaply.

Examples
--------
>>> frame = generate(1000, seed=1)
>>> list(frame.columns[:2]), frame.shape
(['EventId', 'DER_mass_MMC'], (1000, 32))
"""
from __future__ import annotations

import logging
import uuid
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping

import numpy as np
import pandas as pd

__all__ = [
    "FEATURES", "MISSING", "SIGNAL", "BACKGROUND", "generate", "to_lake_frame", "write_lake",
    "lake_partition", "event_messages", "iter_event_messages",
]

log = logging.getLogger(__name__)

#: The 30 features of the challenge, in the challenge's column order.
FEATURES: list[str] = [
    "DER_mass_MMC", "DER_mass_transverse_met_lep", "DER_mass_vis", "DER_pt_h",
    "DER_deltaeta_jet_jet", "DER_mass_jet_jet", "DER_prodeta_jet_jet", "DER_deltar_tau_lep",
    "DER_pt_tot", "DER_sum_pt", "DER_pt_ratio_lep_tau", "DER_met_phi_centrality",
    "DER_lep_eta_centrality", "PRI_tau_pt", "PRI_tau_eta", "PRI_tau_phi", "PRI_lep_pt",
    "PRI_lep_eta", "PRI_lep_phi", "PRI_met", "PRI_met_phi", "PRI_met_sumet", "PRI_jet_num",
    "PRI_jet_leading_pt", "PRI_jet_leading_eta", "PRI_jet_leading_phi",
    "PRI_jet_subleading_pt", "PRI_jet_subleading_eta", "PRI_jet_subleading_phi",
    "PRI_jet_all_pt",
]
#: The challenge's marker for an undefined value.
MISSING = -999.0
#: Label values, as in the challenge.
SIGNAL, BACKGROUND = "s", "b"

#: Features undefined (-999) when PRI_jet_num is below the given count.
_NEEDS_ONE_JET = ["PRI_jet_leading_pt", "PRI_jet_leading_eta", "PRI_jet_leading_phi"]
_NEEDS_TWO_JETS = ["DER_deltaeta_jet_jet", "DER_mass_jet_jet", "DER_prodeta_jet_jet",
                   "DER_lep_eta_centrality", "PRI_jet_subleading_pt", "PRI_jet_subleading_eta",
                   "PRI_jet_subleading_phi"]

# Process mix: signal H->tautau, background Z->tautau, background W/top (fake taus).
_SIGNAL_FRACTION = 0.34
_Z_FRACTION_OF_BACKGROUND = 0.45
# P(PRI_jet_num = 0, 1, 2, 3) per process: Higgs production via VBF brings more jets.
_JET_PROBS = {0: [0.30, 0.34, 0.23, 0.13], 1: [0.50, 0.31, 0.13, 0.06],
              2: [0.36, 0.31, 0.20, 0.13]}
# P(DER_mass_MMC undefined) per process.
_MMC_UNDEFINED = {0: 0.05, 1: 0.08, 2: 0.25}


def generate(n: int, seed: int = 0, start_id: int = 0) -> pd.DataFrame:
    """Simulate ``n`` events in the Higgs challenge schema.

    Parameters
    ----------
    n : int
        Number of events.
    seed : int
        Seed of the random generator: the same ``(n, seed)`` gives the same frame.
    start_id : int
        ``EventId`` of the first event; ids are consecutive.

    Returns
    -------
    pandas.DataFrame
        Columns ``EventId`` (int64), the 30 :data:`FEATURES` (float64, ``PRI_jet_num`` int64,
        ``-999.0`` where undefined) and ``Label`` (``"s"``/``"b"``).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    # 0 = signal, 1 = Z background, 2 = W/top background.
    u = rng.random(n)
    process = np.where(u < _SIGNAL_FRACTION, 0,
                       np.where(u < _SIGNAL_FRACTION + (1 - _SIGNAL_FRACTION)
                                * _Z_FRACTION_OF_BACKGROUND, 1, 2))
    signal, z_bkg, w_bkg = process == 0, process == 1, process == 2
    two_taus = signal | z_bkg

    # Latent resonance mass: 125 GeV Higgs, 91 GeV Z, a broad continuum for W/top.
    mass = np.where(signal, rng.normal(125.0, 12.0, n),
                    np.where(z_bkg, rng.normal(91.2, 9.0, n), 40.0 + rng.gamma(2.5, 30.0, n)))
    visible_fraction = rng.beta(5.0, 3.5, n)
    latent_vis = mass * visible_fraction

    # Tau and lepton directions: back to back for a decaying resonance, loosely for fakes.
    tau_eta = np.clip(rng.normal(0.0, 1.2, n), -2.5, 2.5)
    deta = np.where(two_taus, rng.normal(0.0, 0.9, n), rng.normal(0.0, 1.4, n))
    lep_eta = np.clip(tau_eta + deta, -2.5, 2.5)
    tau_phi = rng.uniform(-np.pi, np.pi, n)
    dphi = np.where(two_taus, np.pi - np.abs(rng.normal(0.0, 0.7, n)),
                    rng.uniform(0.2, np.pi, n)) * rng.choice([-1.0, 1.0], n)
    lep_phi = _wrap(tau_phi + dphi)

    # Transverse momenta that give the latent visible mass, then detector thresholds.
    ratio = np.exp(rng.normal(0.0, 0.45, n))  # lep_pt / tau_pt
    spread = np.cosh(lep_eta - tau_eta) - np.cos(lep_phi - tau_phi)
    tau_pt = latent_vis / np.sqrt(2.0 * ratio * np.maximum(spread, 1e-3))
    tau_pt = np.clip(tau_pt * rng.lognormal(0.0, 0.15, n), 20.0, 400.0)
    tau_pt = np.where(w_bkg, np.maximum(tau_pt, 20.0 + rng.exponential(12.0, n)), tau_pt)
    lep_pt = np.clip(tau_pt * ratio, 26.0, 400.0)

    # Missing transverse energy: neutrinos from the taus (roughly along the visible pair),
    # from the W (hard and anywhere) for fakes.
    nu_pt = np.where(two_taus, np.abs(mass - latent_vis) * rng.uniform(0.3, 0.9, n),
                     rng.gamma(3.0, 13.0, n))
    pair_phi = np.arctan2(np.sin(tau_phi) + np.sin(lep_phi), np.cos(tau_phi) + np.cos(lep_phi))
    met_phi = np.where(two_taus, _wrap(pair_phi + rng.normal(0.0, 0.9, n)),
                       rng.uniform(-np.pi, np.pi, n))
    met = np.abs(nu_pt + rng.normal(0.0, 8.0, n))

    # Jets.
    jet_num = np.empty(n, dtype=np.int64)
    for proc, probs in _JET_PROBS.items():
        mask = process == proc
        jet_num[mask] = rng.choice(4, size=int(mask.sum()), p=probs)
    vbf = signal & (jet_num >= 2)
    lead_pt = 30.0 + rng.gamma(1.6, np.where(signal, 45.0, 35.0), n)
    lead_eta = np.clip(rng.normal(0.0, np.where(vbf, 2.3, 1.7), n), -4.5, 4.5)
    lead_phi = rng.uniform(-np.pi, np.pi, n)
    jj_deta = np.where(vbf, rng.normal(0.0, 3.5, n), rng.normal(0.0, 1.6, n))
    sub_eta = np.clip(lead_eta - jj_deta, -4.5, 4.5)
    sub_pt = 30.0 + (lead_pt - 30.0) * rng.beta(2.0, 3.0, n)
    sub_phi = rng.uniform(-np.pi, np.pi, n)
    extra_pt = np.where(jet_num == 3, 30.0 + rng.gamma(1.5, 15.0, n), 0.0)
    has1, has2 = jet_num >= 1, jet_num >= 2
    jet_all_pt = np.where(has1, lead_pt, 0.0) + np.where(has2, sub_pt, 0.0) + extra_pt
    met_sumet = tau_pt + lep_pt + jet_all_pt + 40.0 + rng.gamma(3.0, 35.0, n)

    # Derived quantities, with the challenge's definitions.
    tau_px, tau_py = tau_pt * np.cos(tau_phi), tau_pt * np.sin(tau_phi)
    lep_px, lep_py = lep_pt * np.cos(lep_phi), lep_pt * np.sin(lep_phi)
    met_px, met_py = met * np.cos(met_phi), met * np.sin(met_phi)
    j1_px, j1_py = (np.where(has1, lead_pt * np.cos(lead_phi), 0.0),
                    np.where(has1, lead_pt * np.sin(lead_phi), 0.0))
    j2_px, j2_py = (np.where(has2, sub_pt * np.cos(sub_phi), 0.0),
                    np.where(has2, sub_pt * np.sin(sub_phi), 0.0))
    mass_vis = _invariant_mass(tau_pt, tau_eta, tau_phi, lep_pt, lep_eta, lep_phi)
    mt = np.sqrt(np.maximum(2.0 * lep_pt * met * (1.0 - np.cos(lep_phi - met_phi)), 0.0))
    pt_h = np.hypot(tau_px + lep_px + met_px, tau_py + lep_py + met_py)
    pt_tot = np.hypot(tau_px + lep_px + met_px + j1_px + j2_px,
                      tau_py + lep_py + met_py + j1_py + j2_py)
    sum_pt = tau_pt + lep_pt + jet_all_pt
    deltar = np.hypot(lep_eta - tau_eta, _wrap(lep_phi - tau_phi))
    mass_jj = _invariant_mass(lead_pt, lead_eta, lead_phi, sub_pt, sub_eta, sub_phi)
    lep_centrality = np.exp(-4.0 / np.maximum((lead_eta - sub_eta) ** 2, 1e-6)
                            * (lep_eta - (lead_eta + sub_eta) / 2.0) ** 2)
    # The MMC estimates the resonance mass from everything; resolution about 18%.
    mmc = np.abs(mass * rng.normal(1.0, 0.18, n) + rng.normal(0.0, 5.0, n))
    mmc_undefined = np.zeros(n, dtype=bool)
    for proc, p in _MMC_UNDEFINED.items():
        mask = process == proc
        mmc_undefined[mask] = rng.random(int(mask.sum())) < p

    columns: dict[str, np.ndarray] = {
        "DER_mass_MMC": np.where(mmc_undefined, MISSING, mmc),
        "DER_mass_transverse_met_lep": mt,
        "DER_mass_vis": mass_vis,
        "DER_pt_h": pt_h,
        "DER_deltaeta_jet_jet": np.abs(lead_eta - sub_eta),
        "DER_mass_jet_jet": mass_jj,
        "DER_prodeta_jet_jet": lead_eta * sub_eta,
        "DER_deltar_tau_lep": deltar,
        "DER_pt_tot": pt_tot,
        "DER_sum_pt": sum_pt,
        "DER_pt_ratio_lep_tau": lep_pt / tau_pt,
        "DER_met_phi_centrality": _phi_centrality(tau_phi, lep_phi, met_phi),
        "DER_lep_eta_centrality": lep_centrality,
        "PRI_tau_pt": tau_pt, "PRI_tau_eta": tau_eta, "PRI_tau_phi": tau_phi,
        "PRI_lep_pt": lep_pt, "PRI_lep_eta": lep_eta, "PRI_lep_phi": lep_phi,
        "PRI_met": met, "PRI_met_phi": met_phi, "PRI_met_sumet": met_sumet,
        "PRI_jet_num": jet_num,
        "PRI_jet_leading_pt": lead_pt, "PRI_jet_leading_eta": lead_eta,
        "PRI_jet_leading_phi": lead_phi,
        "PRI_jet_subleading_pt": sub_pt, "PRI_jet_subleading_eta": sub_eta,
        "PRI_jet_subleading_phi": sub_phi,
        "PRI_jet_all_pt": jet_all_pt,
    }
    for name in FEATURES:
        if name != "PRI_jet_num":
            columns[name] = np.round(columns[name], 3)
    for name in _NEEDS_ONE_JET:
        columns[name] = np.where(has1, columns[name], MISSING)
    for name in _NEEDS_TWO_JETS:
        columns[name] = np.where(has2, columns[name], MISSING)

    frame = pd.DataFrame({"EventId": np.arange(start_id, start_id + n, dtype=np.int64)})
    frame = pd.concat([frame, pd.DataFrame({name: columns[name] for name in FEATURES})], axis=1)
    frame["Label"] = np.where(signal, SIGNAL, BACKGROUND)
    return frame


def to_lake_frame(frame: pd.DataFrame, ts_ms: int | np.ndarray) -> pd.DataFrame:
    """Map a :func:`generate` frame to the lake's columns.

    Parameters
    ----------
    frame : pandas.DataFrame
        Higgs-schema frame.
    ts_ms : int or numpy.ndarray
        Event time(s) in epoch milliseconds.

    Returns
    -------
    pandas.DataFrame
        ``id`` (str), the 30 features (float64), ``label`` (``"s"``/``"b"``), ``ts`` (int64).
    """
    lake = pd.DataFrame({"id": frame["EventId"].astype(str)})
    lake = pd.concat([lake, frame[FEATURES].astype(np.float64)], axis=1)
    lake["label"] = frame["Label"].astype(str)
    lake["ts"] = np.broadcast_to(np.asarray(ts_ms, dtype=np.int64), (len(frame),))
    return lake


def lake_partition(lake_uri: str, when: datetime) -> str:
    """``LAKE_URI/dt=YYYY-MM-DD/hour=HH`` of the UTC hour containing ``when``."""
    when = when.astimezone(timezone.utc)
    return f"{lake_uri.rstrip('/')}/dt={when:%Y-%m-%d}/hour={when:%H}"


def write_lake(lake_uri: str, storage_options: Mapping[str, Any] | None, n: int,
               seed: int = 0, when: datetime | None = None, start_id: int = 0,
               rows_per_file: int = 50_000) -> list[str]:
    """Generate ``n`` events and write them to the lake as Parquet.

    Parameters
    ----------
    lake_uri : str
        ``LAKE_URI`` (``s3://...`` or ``file://...``).
    storage_options : mapping or None
        s3fs options (ignored for local paths).
    n, seed, start_id
        As for :func:`generate`.
    when : datetime, optional
        Event time (default now): selects the ``dt=/hour=`` partition; the events' ``ts`` are
        spread over that hour.
    rows_per_file : int
        Rows per Parquet file, so that readers have several files to share out.

    Returns
    -------
    list of str
        URIs of the files written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from models.storage import ensure_bucket, filesystem

    when = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    hour_start = when.replace(minute=0, second=0, microsecond=0)
    start_ms = int(hour_start.timestamp() * 1000)
    frame = generate(n, seed=seed, start_id=start_id)
    ts = start_ms + (np.arange(n, dtype=np.int64) * 3_600_000) // max(n, 1)
    lake = to_lake_frame(frame, ts)

    partition = lake_partition(lake_uri, when)
    fs, path = filesystem(partition, storage_options)
    ensure_bucket(fs, path)
    fs.makedirs(path, exist_ok=True)
    written = []
    run = uuid.uuid4().hex[:8]
    for i, start in enumerate(range(0, max(n, 1), rows_per_file)):
        chunk = lake.iloc[start:start + rows_per_file]
        table = pa.Table.from_pandas(chunk, preserve_index=False)
        target = f"{path}/part-{run}-{i:05d}.parquet"
        with fs.open(target, "wb") as out:
            pq.write_table(table, out)
        written.append(fs.unstrip_protocol(target))
    log.info("wrote %d demo events (seed %d) in %d files under %s", n, seed, len(written),
             partition)
    return written


def event_messages(n: int, seed: int = 0, labelled_fraction: float = 0.5, start_id: int = 0,
                   ts_ms: int | None = None) -> list[dict[str, Any]]:
    """``n`` input events as the ``events`` topic carries them (docs/contract.md).

    Parameters
    ----------
    n, seed, start_id
        As for :func:`generate`; ``id`` is ``str(EventId)``.
    labelled_fraction : float
        Share of events that carry their ``label`` (deterministic given the seed).
    ts_ms : int, optional
        ``ts`` of every event (default: now).

    Returns
    -------
    list of dict
        ``{"id": str, "features": {name: float}, "label"?: "s"|"b", "ts": int}``; undefined
        features keep the raw ``-999.0`` marker, as in the challenge data.
    """
    if not 0.0 <= labelled_fraction <= 1.0:
        raise ValueError(f"labelled_fraction must be in [0, 1], got {labelled_fraction}")
    frame = generate(n, seed=seed, start_id=start_id)
    ts = int(datetime.now(timezone.utc).timestamp() * 1000) if ts_ms is None else int(ts_ms)
    labelled = np.random.default_rng([seed, 1]).random(n) < labelled_fraction
    values = frame[FEATURES].to_numpy(dtype=np.float64).tolist()
    ids = frame["EventId"].astype(str).tolist()
    labels = frame["Label"].tolist()
    messages = []
    for i in range(n):
        message: dict[str, Any] = {"id": ids[i], "features": dict(zip(FEATURES, values[i]))}
        if labelled[i]:
            message["label"] = labels[i]
        message["ts"] = ts
        messages.append(message)
    return messages


def iter_event_messages(seed: int = 0, labelled_fraction: float = 0.5, start_id: int = 0,
                        chunk: int = 1024) -> Iterator[dict[str, Any]]:
    """An endless stream of :func:`event_messages`, generated ``chunk`` events at a time.

    Each chunk uses its own seed derived from ``seed``, and ids keep counting up from
    ``start_id``, so a feed can run forever without repeating ids. ``ts`` is the time the chunk
    was generated.
    """
    index = 0
    while True:
        yield from event_messages(chunk, seed=seed * 1_000_003 + index,
                                  labelled_fraction=labelled_fraction,
                                  start_id=start_id + index * chunk)
        index += 1


def _wrap(phi: np.ndarray) -> np.ndarray:
    """Angles wrapped into [-pi, pi)."""
    return (phi + np.pi) % (2.0 * np.pi) - np.pi


def _invariant_mass(pt1: np.ndarray, eta1: np.ndarray, phi1: np.ndarray, pt2: np.ndarray,
                    eta2: np.ndarray, phi2: np.ndarray) -> np.ndarray:
    """Invariant mass of two massless particles."""
    m2 = 2.0 * pt1 * pt2 * (np.cosh(eta1 - eta2) - np.cos(phi1 - phi2))
    return np.sqrt(np.maximum(m2, 0.0))


def _phi_centrality(tau_phi: np.ndarray, lep_phi: np.ndarray, met_phi: np.ndarray
                    ) -> np.ndarray:
    """The challenge's DER_met_phi_centrality: sqrt(2) when the MET lies between tau and lepton
    in the transverse plane, decreasing outside."""
    sign = np.sign(np.sin(tau_phi - lep_phi))
    sign = np.where(sign == 0, 1.0, sign)
    a = np.sin(met_phi - lep_phi) * sign
    b = np.sin(tau_phi - met_phi) * sign
    norm = np.sqrt(a * a + b * b)
    return np.where(norm > 0, (a + b) / np.where(norm > 0, norm, 1.0), 0.0)
