"""The demo generator reproduces the Higgs challenge schema and its missing-value pattern."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from demo import data as demo_data
from demo.data import FEATURES, MISSING, event_messages, generate, to_lake_frame
from batch.evaluate import roc_auc

HIGGS_FEATURES = (
    "DER_mass_MMC DER_mass_transverse_met_lep DER_mass_vis DER_pt_h DER_deltaeta_jet_jet "
    "DER_mass_jet_jet DER_prodeta_jet_jet DER_deltar_tau_lep DER_pt_tot DER_sum_pt "
    "DER_pt_ratio_lep_tau DER_met_phi_centrality DER_lep_eta_centrality PRI_tau_pt PRI_tau_eta "
    "PRI_tau_phi PRI_lep_pt PRI_lep_eta PRI_lep_phi PRI_met PRI_met_phi PRI_met_sumet "
    "PRI_jet_num PRI_jet_leading_pt PRI_jet_leading_eta PRI_jet_leading_phi "
    "PRI_jet_subleading_pt PRI_jet_subleading_eta PRI_jet_subleading_phi PRI_jet_all_pt"
).split()
LEADING = ["PRI_jet_leading_pt", "PRI_jet_leading_eta", "PRI_jet_leading_phi"]
DIJET = ["DER_deltaeta_jet_jet", "DER_mass_jet_jet", "DER_prodeta_jet_jet",
         "DER_lep_eta_centrality", "PRI_jet_subleading_pt", "PRI_jet_subleading_eta",
         "PRI_jet_subleading_phi"]


@pytest.fixture(scope="module")
def frame():
    return generate(20_000, seed=7, start_id=100_000)


def test_the_30_features_have_the_challenge_names_in_order(frame) -> None:
    assert FEATURES == HIGGS_FEATURES
    assert list(frame.columns) == ["EventId", *HIGGS_FEATURES, "Label"]
    assert frame["EventId"].tolist()[:2] == [100_000, 100_001]
    assert frame["EventId"].is_unique


def test_the_same_seed_gives_the_same_events_and_another_seed_others(frame) -> None:
    again = generate(20_000, seed=7, start_id=100_000)
    assert again.equals(frame)
    assert not generate(1000, seed=8)[FEATURES].equals(generate(1000, seed=7)[FEATURES])


def test_undefined_values_follow_the_jet_multiplicity(frame) -> None:
    jets = frame["PRI_jet_num"].to_numpy()
    assert set(np.unique(jets)) == {0, 1, 2, 3}
    for name in LEADING:
        assert np.all((frame[name] == MISSING) == (jets == 0)), name
    for name in DIJET:
        assert np.all((frame[name] == MISSING) == (jets < 2)), name
    assert np.all(frame.loc[jets == 0, "PRI_jet_all_pt"] == 0.0)
    mmc_missing = (frame["DER_mass_MMC"] == MISSING).mean()
    assert 0.05 < mmc_missing < 0.25
    others = [f for f in FEATURES if f not in LEADING + DIJET + ["DER_mass_MMC"]]
    assert not (frame[others] == MISSING).any().any()
    assert not frame[FEATURES].isna().any().any()


def test_labels_are_balanced_like_the_challenge_and_learnable_but_not_trivially(frame) -> None:
    assert set(frame["Label"]) == {"s", "b"}
    signal = (frame["Label"] == "s").to_numpy()
    assert 0.28 < signal.mean() < 0.40
    # One strong feature separates the classes somewhat, no feature does it alone.
    mmc = frame["DER_mass_MMC"].to_numpy()
    defined = mmc != MISSING
    assert 0.65 < roc_auc(signal[defined], mmc[defined]) < 0.85
    for name in FEATURES:
        values = frame[name].to_numpy()
        auc = roc_auc(signal, values)
        assert max(auc, 1 - auc) < 0.85, name


def test_physical_ranges(frame) -> None:
    assert frame["PRI_tau_pt"].min() >= 20.0 and frame["PRI_lep_pt"].min() >= 26.0
    assert frame["PRI_tau_eta"].abs().max() <= 2.5
    assert frame["PRI_met_phi"].abs().max() <= np.pi + 1e-3
    centrality = frame["DER_met_phi_centrality"]
    assert centrality.min() >= -np.sqrt(2) - 1e-3 and centrality.max() <= np.sqrt(2) + 1e-3


def test_lake_frame_has_the_lake_columns(frame) -> None:
    lake = to_lake_frame(frame.head(10), 1_700_000_000_000)
    assert list(lake.columns) == ["id", *FEATURES, "label", "ts"]
    assert lake["id"].tolist()[0] == "100000"
    assert all(lake[f].dtype == np.float64 for f in FEATURES)
    assert lake["ts"].dtype == np.int64 and lake["ts"].iloc[-1] == 1_700_000_000_000


def test_write_lake_uses_the_contract_partitions(tmp_path: Path) -> None:
    when = datetime(2026, 11, 23, 14, 5, tzinfo=timezone.utc)
    files = demo_data.write_lake(f"file://{tmp_path}/lake", None, 2500, seed=3, when=when,
                                 rows_per_file=1000)
    assert len(files) == 3
    assert all("/lake/dt=2026-11-23/hour=14/part-" in f and f.endswith(".parquet")
               for f in files)
    table = pq.read_table(files[0][len("file://"):])
    assert table.column_names == ["id", *FEATURES, "label", "ts"]
    ts = table.column("ts").to_numpy()
    hour_ms = int(when.replace(minute=0).timestamp() * 1000)
    assert ts.min() >= hour_ms and ts.max() < hour_ms + 3_600_000


def test_event_messages_follow_the_input_contract() -> None:
    messages = event_messages(200, seed=1, labelled_fraction=0.5, start_id=10, ts_ms=123)
    assert [m["id"] for m in messages[:2]] == ["10", "11"]
    first = messages[0]
    assert set(first) <= {"id", "features", "label", "ts"} and first["ts"] == 123
    assert list(first["features"]) == FEATURES
    assert all(isinstance(v, float) for v in first["features"].values())
    labelled = sum("label" in m for m in messages)
    assert 60 < labelled < 140
    assert {m["label"] for m in messages if "label" in m} <= {"s", "b"}
    assert not any("label" in m for m in event_messages(50, labelled_fraction=0.0))
    assert all("label" in m for m in event_messages(50, labelled_fraction=1.0))
    assert any(v == MISSING for m in messages for v in m["features"].values())


def test_the_endless_feed_never_repeats_an_id() -> None:
    feed = demo_data.iter_event_messages(seed=2, chunk=64)
    ids = [next(feed)["id"] for _ in range(300)]
    assert len(set(ids)) == 300
