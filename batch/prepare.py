"""Dataset steps of the batch job: pick features, clean, split, fit preprocessing, collect.

Every step is a function of DataFrames and parameters. Preprocessing is applied inside Spark
tasks with :class:`models.preprocessing.Preprocessor`, the very code the serving layer runs, so
training data and live data are transformed identically.
"""
from __future__ import annotations

import functools
import logging
import re
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch.errors import DataError
from models.preprocessing import MISSING_MARKER, Preprocessor
from models.preprocessing import constant_features as _constant_features

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

__all__ = [
    "METADATA_COLUMNS", "SPLIT_COL", "TRAIN", "VALIDATION", "TEST",
    "feature_columns", "label_kind", "clean", "split_thresholds", "assign_splits",
    "add_split", "split_class_counts", "feature_statistics", "collect_preprocessed",
    "reference_rows", "check_splits", "filter_since", "collect_raw", "constant_features",
]

log = logging.getLogger(__name__)

#: Columns that are never features: event time and the lake's partition columns.
METADATA_COLUMNS: tuple[str, ...] = ("ts", "dt", "hour")
#: Name of the split column the job adds (odd on purpose: it must not collide with data).
SPLIT_COL = "__split"
TRAIN, VALIDATION, TEST = "train", "val", "test"
_SPLITS = (TRAIN, VALIDATION, TEST)

_NUMERIC_RE = re.compile(r"^(tinyint|smallint|int|bigint|float|double|decimal\(\d+,\d+\))$")
_INTEGRAL = ("tinyint", "smallint", "int", "bigint")
# Hash resolution of the split: one part in a million is plenty for fractions like 0.1.
_SPLIT_BUCKETS = 1_000_000
# Repeated ids that :func:`clean` deduplicates apart from the other rows (after a broadcast
# join with their 64-bit hashes: 8 bytes each); more than this and every row is shuffled.
_BROADCAST_KEYS = 1_000_000
_KEY_COL, _REPEATED_COL = "__id_hash", "__repeated"


def feature_columns(dtypes: Sequence[tuple[str, str]], id_col: str, label_col: str,
                    exclude: Sequence[str] = METADATA_COLUMNS) -> list[str]:
    """The feature columns of a dataset: every column but id, label and metadata, in order.

    Parameters
    ----------
    dtypes : sequence of (name, type)
        ``DataFrame.dtypes``: column names with Spark's simple type strings.
    id_col, label_col : str
        Names of the id and label columns.
    exclude : sequence of str
        Metadata columns that are not features when present.

    Returns
    -------
    list of str
        Feature names, in the dataset's column order.

    Raises
    ------
    DataError
        The id or label column is absent, the label is neither string nor integer, a candidate
        feature column is not numeric (the message names it), or nothing is left as a feature.
    """
    names = [name for name, _ in dtypes]
    for role, col in (("id", id_col), ("label", label_col)):
        if col not in names:
            raise DataError(f"the dataset has no {role} column {col!r} "
                            f"(columns: {', '.join(names)})")
    if id_col == label_col:
        raise DataError(f"id and label column are both {id_col!r}")
    label_kind(dict(dtypes)[label_col], label_col)
    features, bad = [], []
    for name, kind in dtypes:
        if name in (id_col, label_col) or name in exclude:
            continue
        if _NUMERIC_RE.match(kind):
            features.append(name)
        else:
            bad.append(f"{name!r} ({kind})")
    if bad:
        raise DataError(f"non-numeric column{'s' if len(bad) > 1 else ''} {', '.join(bad)}: "
                        f"every column other than the id {id_col!r}, the label {label_col!r} "
                        f"and {', '.join(exclude)} must be a numeric feature")
    if not features:
        raise DataError("the dataset has no feature columns")
    return features


def label_kind(kind: str, label_col: str = "label") -> str:
    """``"string"`` or ``"integer"``: how class labels of Spark type ``kind`` are kept."""
    if kind == "string":
        return "string"
    if kind in _INTEGRAL:
        return "integer"
    raise DataError(f"label column {label_col!r} is {kind}: class labels must be strings or "
                    "integers")


def _col(name: str) -> "Column":
    from pyspark.sql import functions as F

    # Backticks keep names with dots or spaces from being parsed as struct access.
    return F.col("`" + name.replace("`", "``") + "`")


#: Largest feature magnitude the job uses; a larger one is treated as missing (a hostile or
#: broken event can be valid JSON and still have a square no float64 holds).
MAX_ABS_VALUE = 1e100


def clean(df: "DataFrame", features: Sequence[str], id_col: str, label_col: str,
          ts_col: str | None = "ts", broadcast_keys: int | None = None) -> "DataFrame":
    """Normalise missing values, drop unusable rows and duplicate ids.

    Parameters
    ----------
    df : pyspark.sql.DataFrame
        Raw dataset.
    features : sequence of str
        Feature columns (see :func:`feature_columns`).
    id_col, label_col : str
        Id and label columns.
    ts_col : str, optional
        Event-time column; when present, the newest row of a duplicated id wins.
    broadcast_keys : int, optional
        Largest number of repeated ids deduplicated apart from the other rows (default one
        million); see the notes.

    Returns
    -------
    pyspark.sql.DataFrame
        Columns: id (string), features (double; ``-999.0``, NaN, +/-inf and values beyond
        +/-``MAX_ABS_VALUE`` become null),
        label (string or bigint), and ``ts_col`` when present. Rows without id or label are
        dropped, as are empty string labels; each id appears once.

    Notes
    -----
    Runs one aggregate over 64-bit hashes of the ids to find the repeated ones. Deduplicating
    means shuffling rows by id, and shuffling every column of every row costs most of the
    batch job's Spark time; a lake usually repeats few ids or none. So only the rows whose id
    hash repeats (every copy of a repeated id, and the rare distinct ids whose hashes collide)
    are shuffled and deduplicated exactly by id, after a broadcast join with the repeated
    hashes; the other rows pass through where they are. Beyond ``broadcast_keys`` repeated
    hashes every row goes through the shuffle.
    """
    from pyspark.sql import functions as F

    kinds = dict(df.dtypes)
    columns = [_col(id_col).cast("string").alias(id_col)]
    for name in features:
        value = _col(name).cast("double")
        # Beyond MAX_ABS_VALUE a value's square would overflow the preprocessing statistics.
        missing = F.isnan(value) | (value == MISSING_MARKER) | (F.abs(value) > MAX_ABS_VALUE)
        columns.append(F.when(missing, F.lit(None).cast("double")).otherwise(value)
                       .alias(name))
    if label_kind(kinds[label_col], label_col) == "string":
        label = F.trim(_col(label_col))
        label = F.when(label == "", F.lit(None).cast("string")).otherwise(label)
    else:
        label = _col(label_col).cast("bigint")
    columns.append(label.alias(label_col))
    has_ts = ts_col is not None and ts_col in kinds and ts_col not in features
    if has_ts:
        assert ts_col is not None
        columns.append(_col(ts_col))
    out = df.select(*columns).where(_col(id_col).isNotNull() & _col(label_col).isNotNull())
    newest = ts_col if has_ts else None
    limit = _BROADCAST_KEYS if broadcast_keys is None else broadcast_keys
    repeated = (out.select(F.xxhash64(_col(id_col)).alias(_KEY_COL)).groupBy(_KEY_COL)
                .count().where(F.col("count") > 1).select(_KEY_COL))
    n_repeated = repeated.count()
    log.debug("%d repeated id hashes", n_repeated)
    if n_repeated == 0:
        return out
    if n_repeated > limit:
        return _deduplicate(out, id_col, newest)
    flagged = (out.withColumn(_KEY_COL, F.xxhash64(_col(id_col)))
               .join(F.broadcast(repeated.withColumn(_REPEATED_COL, F.lit(True))), _KEY_COL,
                     "left"))
    single = flagged.where(F.col(_REPEATED_COL).isNull())
    multiple = _deduplicate(flagged.where(F.col(_REPEATED_COL)), id_col, newest)
    return single.unionByName(multiple).drop(_KEY_COL, _REPEATED_COL)


def _deduplicate(df: "DataFrame", id_col: str, ts_col: str | None) -> "DataFrame":
    """One row per id: the newest by ``ts_col`` when given, else any."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if ts_col is None:
        return df.dropDuplicates([id_col])
    newest = Window.partitionBy(_col(id_col)).orderBy(_col(ts_col).desc_nulls_last())
    return (df.withColumn("__rank", F.row_number().over(newest))
            .where(F.col("__rank") == 1).drop("__rank"))


def split_thresholds(test_fraction: float, val_fraction: float) -> tuple[float, float]:
    """Upper bounds of the train and validation ranges of a uniform ``u`` in [0, 1).

    ``u < train_upper`` is train, ``u < val_upper`` validation, the rest test.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    if not 0.0 <= val_fraction < 1.0 or test_fraction + val_fraction >= 1.0:
        raise ValueError(f"validation fraction must be in [0, 1) and leave rows to train on, "
                         f"got {val_fraction} with test {test_fraction}")
    train_upper = 1.0 - test_fraction - val_fraction
    return train_upper, train_upper + val_fraction


def assign_splits(u: np.ndarray, test_fraction: float, val_fraction: float) -> np.ndarray:
    """Split names for uniform values ``u``: the numpy twin of :func:`add_split`'s rule."""
    train_upper, val_upper = split_thresholds(test_fraction, val_fraction)
    u = np.asarray(u, dtype=np.float64)
    return np.where(u < train_upper, TRAIN, np.where(u < val_upper, VALIDATION, TEST))


def add_split(df: "DataFrame", id_col: str, seed: int, test_fraction: float = 0.2,
              val_fraction: float = 0.1) -> "DataFrame":
    """Add :data:`SPLIT_COL` (train / val / test) from a seeded hash of the id.

    Hashing the id rather than drawing random numbers makes the split independent of
    partitioning and row order: the same ids land in the same split on every run with the same
    seed, and a row's split never changes as the lake grows.
    """
    from pyspark.sql import functions as F

    train_upper, val_upper = split_thresholds(test_fraction, val_fraction)
    u = F.pmod(F.xxhash64(_col(id_col), F.lit(int(seed))), F.lit(_SPLIT_BUCKETS)) / float(
        _SPLIT_BUCKETS)
    split = (F.when(u < train_upper, F.lit(TRAIN))
             .when(u < val_upper, F.lit(VALIDATION)).otherwise(F.lit(TEST)))
    return df.withColumn(SPLIT_COL, split)


def split_class_counts(df: "DataFrame", label_col: str) -> dict[str, dict[Any, int]]:
    """``{split: {class: rows}}`` of a split DataFrame (one small aggregate)."""
    counts: dict[str, dict[Any, int]] = {TRAIN: {}, VALIDATION: {}, TEST: {}}
    for row in df.groupBy(SPLIT_COL, _col(label_col)).count().collect():
        counts[row[0]][row[1]] = int(row[2])
    return counts


def check_splits(counts: dict[str, dict[Any, int]], label_col: str) -> list[Any]:
    """Sorted class labels, after checking the splits can train and evaluate a model.

    Raises
    ------
    DataError
        Fewer than two classes, or an empty train or test split, or a binary test split that
        lacks a class (AUC would be undefined).
    """
    classes = sorted({c for split in counts.values() for c in split})
    total = sum(sum(split.values()) for split in counts.values())
    if len(classes) < 2:
        raise DataError(f"label column {label_col!r} has {len(classes)} class"
                        f"{'' if len(classes) == 1 else 'es'} {classes} in {total} usable rows: "
                        "need at least two")
    for split in (TRAIN, TEST):
        if not counts[split]:
            raise DataError(f"the {split} split is empty ({total} usable rows): need more data")
    if len(classes) == 2 and len(counts[TEST]) < 2:
        raise DataError(f"the test split ({sum(counts[TEST].values())} rows) holds only class "
                        f"{next(iter(counts[TEST]))!r}: need more data")
    return classes


def feature_statistics(df: "DataFrame", features: Sequence[str]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-feature count, sum and sum of squares of the non-null values, in one aggregate.

    Feed the result to :func:`models.preprocessing.preprocessor_from_stats`.
    """
    from pyspark.sql import functions as F

    aggregates = []
    for name in features:
        value = _col(name)
        aggregates += [F.count(value), F.sum(value), F.sum(value * value)]
    row = df.agg(*aggregates).first()
    assert row is not None  # an aggregate without grouping has exactly one row
    values = np.array([0.0 if v is None else float(v) for v in row], dtype=np.float64)
    return values[0::3], values[1::3], values[2::3]


def _preprocess_batches(batches: Iterator[pa.RecordBatch], features: list[str],
                        preprocessing: dict[str, Any], classes: list[Any], id_col: str,
                        label_col: str) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` body: raw feature columns -> preprocessed float32 columns, the class
    index and the split's index in :data:`_SPLITS`."""
    preprocessor = Preprocessor.from_dict(preprocessing)
    class_set = pa.array(classes)
    split_set = pa.array(_SPLITS)
    for batch in batches:
        X = np.column_stack([
            batch.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
            for name in features]) if batch.num_rows else np.empty((0, len(features)))
        Xp = preprocessor.transform(X)
        y = pc.index_in(batch.column(label_col), value_set=class_set)
        if y.null_count:
            unknown = pc.unique(pc.filter(batch.column(label_col), pc.is_null(y)))
            raise DataError(f"labels {unknown.to_pylist()[:5]} are not among the classes "
                            f"{classes} counted before")
        split = pc.index_in(batch.column(SPLIT_COL), value_set=split_set).cast(pa.int8())
        arrays = [batch.column(id_col), split, y.cast(pa.int32())]
        arrays += [pa.array(Xp[:, i]) for i in range(Xp.shape[1])]
        names = ["id", "split", "y"] + [f"x{i}" for i in range(Xp.shape[1])]
        yield pa.RecordBatch.from_arrays(arrays, names=names)


def _id_order(ids: pa.ChunkedArray) -> np.ndarray:
    """Positions that sort ``ids`` (strings, code point order), computed in Arrow."""
    return np.asarray(pc.sort_indices(ids).to_numpy())


def collect_preprocessed(df: "DataFrame", features: Sequence[str], preprocessor: Preprocessor,
                         classes: Sequence[Any], id_col: str, label_col: str
                         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Preprocess in Spark, collect through Arrow, and return ``{split: (X, y)}``.

    ``X`` is ``(n, n_features)`` float32, ``y`` the int64 class index into ``classes``. Rows
    are sorted by id so that training is reproducible whatever the partitioning.
    """
    from pyspark.sql.types import (ByteType, FloatType, IntegerType, StringType, StructField,
                                   StructType)

    schema = StructType(
        [StructField("id", StringType()), StructField("split", ByteType()),
         StructField("y", IntegerType())]
        + [StructField(f"x{i}", FloatType()) for i in range(len(features))])
    # Positional names: mapInArrow resolves its input columns by name without quoting, so a
    # feature called "a.b" would be read as a struct field.
    names = [f"__f{i}" for i in range(len(features))]
    body = functools.partial(_preprocess_batches, features=names,
                             preprocessing=preprocessor.to_dict(), classes=list(classes),
                             id_col="__id", label_col="__label")
    table = df.select(_col(id_col).alias("__id"),
                      *[_col(f).alias(n) for f, n in zip(features, names)],
                      _col(label_col).alias("__label"),
                      SPLIT_COL).mapInArrow(body, schema).toArrow()
    # Sorting and splitting work on positions, and each split's rows are gathered from the
    # stacked features in one step: the features are in memory at most twice at any time.
    order = _id_order(table.column("id"))
    split = table.column("split").to_numpy()[order]
    y = table.column("y").to_numpy().astype(np.int64)
    X = (np.column_stack([table.column(f"x{i}").to_numpy() for i in range(len(features))])
         if len(table) else np.empty((0, len(features)), np.float32))
    del table
    out = {}
    for code, name in enumerate(_SPLITS):
        rows = order[split == code]
        out[name] = (np.ascontiguousarray(X[rows], dtype=np.float32), y[rows])
    return out


def reference_rows(df: "DataFrame", features: Sequence[str], n: int = 8) -> np.ndarray:
    """Up to ``n`` cleaned test rows as raw float64 (missing = NaN), for the manifest."""
    from pyspark.sql import functions as F

    rows = (df.where(F.col(SPLIT_COL) == TEST).select(*[_col(f) for f in features])
            .limit(n).collect())
    return np.array([[np.nan if v is None else float(v) for v in row] for row in rows],
                    dtype=np.float64).reshape(-1, len(features))


def filter_since(df: "DataFrame", ts_col: str, since_ms: int) -> "DataFrame":
    """Rows whose event time ``ts_col`` (epoch milliseconds) is at or after ``since_ms``."""
    from pyspark.sql import functions as F

    return df.where(_col(ts_col) >= F.lit(int(since_ms)))


def collect_raw(df: "DataFrame", features: Sequence[str], id_col: str, split: str = TEST
                ) -> np.ndarray:
    """Cleaned raw feature rows of one split, float64 (missing = NaN), sorted by id.

    Sorted as :func:`collect_preprocessed` sorts, so row ``i`` here is row ``i`` of its split
    there: another model can be scored on exactly the candidate's test rows.
    """
    from pyspark.sql import functions as F

    table = (df.where(F.col(SPLIT_COL) == split)
             .select(_col(id_col).alias("__id"), *[_col(f) for f in features]).toArrow())
    if len(table) == 0:
        return np.empty((0, len(features)), np.float64)
    order = _id_order(table.column("__id"))
    X = np.column_stack([table.column(i + 1).to_numpy(zero_copy_only=False).astype(np.float64)
                         for i in range(len(features))])
    ordered: np.ndarray = X[order]
    return ordered


def constant_features(features: Sequence[str], count: np.ndarray, total: np.ndarray,
                      sumsq: np.ndarray) -> list[str]:
    """Features with fewer than two present training values or no spread among them:
    :func:`models.preprocessing.constant_features`, the rule the preprocessing that training
    and serving share applies to the same statistics.

    They carry no information; they stay in the model (standardised to 0, so serving can
    keep sending them) and the run reports them.
    """
    return _constant_features(features, count, total, sumsq)
