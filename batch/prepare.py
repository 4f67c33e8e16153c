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
    "METADATA_COLUMNS", "SPLIT_COL", "TRAIN", "VALIDATION", "TEST", "CLASSIFICATION",
    "REGRESSION", "TASKS", "MAX_CLASSES_ALWAYS", "MIN_VALUES_ALWAYS", "DISTINCT_SHARE",
    "feature_columns", "label_kind", "infer_task", "label_profile", "resolve_task", "clean",
    "split_thresholds", "assign_splits", "add_split", "split_class_counts",
    "split_label_stats", "feature_statistics", "collect_preprocessed", "reference_rows",
    "check_splits", "check_regression_splits", "filter_since", "collect_raw",
    "constant_features",
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
_FLOATING_RE = re.compile(r"^(float|double|decimal\(\d+,\d+\))$")

#: What a model predicts: a class, or a value.
CLASSIFICATION, REGRESSION = "classification", "regression"
TASKS = (CLASSIFICATION, REGRESSION)
#: BATCH_TASK=auto on an integer label: at most this many distinct values are always classes...
MAX_CLASSES_ALWAYS = 20
#: ... more than this many are always a value to regress ...
MIN_VALUES_ALWAYS = 100
#: ... and in between, a value when the distinct values are more than this share of the
#: labelled rows (a class recurs; a measured count rarely repeats).
DISTINCT_SHARE = 0.05
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
        The id or label column is absent, the label is neither a string, a boolean nor a
        number, a candidate feature column is not numeric (the message names it), or nothing
        is left as a feature.
    """
    names = [name for name, _ in dtypes]
    for role, col in (("id", id_col), ("label", label_col)):
        if col not in names:
            raise DataError(f"the dataset has no {role} column {col!r} "
                            f"(columns: {', '.join(names)})")
    if id_col == label_col:
        raise DataError(f"id and label column are both {id_col!r}")
    label_kind(dict(dtypes)[label_col], label_col, task=None)
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


def label_kind(kind: str, label_col: str = "label", task: str | None = CLASSIFICATION) -> str:
    """How labels of Spark type ``kind`` are kept: ``"string"``, ``"integer"`` (booleans are
    the integers 0 and 1) or ``"float"`` (a regression's label, any numeric type).

    Parameters
    ----------
    kind : str
        The label column's Spark type string.
    label_col : str
        Its name, for the error.
    task : str or None
        ``classification``, ``regression``, or None for any task (the kind of the label
        itself: ``"float"`` for floating-point and decimal types).

    Raises
    ------
    DataError
        The label cannot be used for the task: a classification needs string, boolean or
        integer labels, a regression numeric ones.
    """
    if task == REGRESSION:
        if kind in _INTEGRAL or kind == "boolean" or _FLOATING_RE.match(kind):
            return "float"
        raise DataError(f"label column {label_col!r} is {kind}: the label of a regression must "
                        "be numeric")
    if kind == "string":
        return "string"
    if kind in _INTEGRAL or kind == "boolean":
        return "integer"
    if task is None and _FLOATING_RE.match(kind):
        return "float"
    if task is None:
        raise DataError(f"label column {label_col!r} is {kind}: labels must be strings, "
                        "booleans or numbers")
    raise DataError(f"label column {label_col!r} is {kind}: class labels must be strings, "
                    "booleans or integers (a floating-point label is a regression's: "
                    "BATCH_TASK=regression)")


def infer_task(kind: str, distinct: int = 0, rows: int = 0) -> tuple[str, str]:
    """The task ``BATCH_TASK=auto`` chooses for a label, and why.

    A string or boolean label is a classification; a floating-point (or decimal) one a
    regression. An integer label is a classification when it takes at most
    :data:`MAX_CLASSES_ALWAYS` (20) distinct values, a regression when it takes more than
    :data:`MIN_VALUES_ALWAYS` (100), and in between a regression only when its distinct values
    are more than :data:`DISTINCT_SHARE` (5%) of the labelled rows: classes recur, while counts
    and amounts seldom repeat. Set ``BATCH_TASK`` where the data may sit near a boundary, so
    that the task cannot change as the lake grows.

    Parameters
    ----------
    kind : str
        The label column's Spark type string.
    distinct, rows : int
        Distinct non-null labels and labelled rows (needed for integer labels only).

    Returns
    -------
    (str, str)
        ``classification`` or ``regression``, and the reason in words.
    """
    found = label_kind(kind, task=None)
    if kind == "string" or kind == "boolean":
        return CLASSIFICATION, f"{kind} labels are classes"
    if found == "float":
        return REGRESSION, f"{kind} labels are values"
    counted = f"{distinct} distinct integer labels in {rows} labelled rows"
    if distinct <= MAX_CLASSES_ALWAYS:
        return CLASSIFICATION, f"{counted} (at most {MAX_CLASSES_ALWAYS}: classes)"
    if distinct > MIN_VALUES_ALWAYS:
        return REGRESSION, f"{counted} (over {MIN_VALUES_ALWAYS}: values)"
    if distinct > DISTINCT_SHARE * rows:
        return REGRESSION, f"{counted} (over {DISTINCT_SHARE:.0%} of the rows: values)"
    return CLASSIFICATION, f"{counted} (at most {DISTINCT_SHARE:.0%} of the rows: classes)"


def label_profile(df: "DataFrame", label_col: str) -> tuple[int, int]:
    """``(distinct non-null labels, labelled rows)`` of a DataFrame, in one aggregate."""
    from pyspark.sql import functions as F

    label = _col(label_col)
    row = df.where(label.isNotNull()).agg(F.countDistinct(label), F.count(label)).first()
    assert row is not None  # an aggregate without grouping has exactly one row
    return int(row[0]), int(row[1])


def resolve_task(df: "DataFrame", label_col: str, task: str) -> tuple[str, str]:
    """The task of a run: ``task`` when it is given (the label checked to fit it), else
    :func:`infer_task` of the label column (counting its distinct values when it is an integer
    one)."""
    kind = dict(df.dtypes)[label_col]
    if task != "auto":
        label_kind(kind, label_col, task)
        return task, "BATCH_TASK"
    if kind in _INTEGRAL:
        return infer_task(kind, *label_profile(df, label_col))
    return infer_task(kind)


def _col(name: str) -> "Column":
    from pyspark.sql import functions as F

    # Backticks keep names with dots or spaces from being parsed as struct access.
    return F.col("`" + name.replace("`", "``") + "`")


#: Largest feature magnitude the job uses; a larger one is treated as missing (a hostile or
#: broken event can be valid JSON and still have a square no float64 holds).
MAX_ABS_VALUE = 1e100


def clean(df: "DataFrame", features: Sequence[str], id_col: str, label_col: str,
          ts_col: str | None = "ts", broadcast_keys: int | None = None,
          task: str = CLASSIFICATION) -> "DataFrame":
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
    task : str
        ``classification`` (labels kept as strings or integers) or ``regression`` (labels as
        doubles).

    Returns
    -------
    pyspark.sql.DataFrame
        Columns: id (string), features (double; ``-999.0``, NaN, +/-inf and values beyond
        +/-``MAX_ABS_VALUE`` become null),
        label (string, bigint, or for a regression double), and ``ts_col`` when present. Rows
        without id or label are dropped, as are empty string labels and a regression's NaN,
        infinite or beyond +/-``MAX_ABS_VALUE`` labels; each id appears once.

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
    kind = label_kind(kinds[label_col], label_col, task)
    if kind == "string":
        label = F.trim(_col(label_col))
        label = F.when(label == "", F.lit(None).cast("string")).otherwise(label)
    elif kind == "float":
        label = _col(label_col).cast("double")
        unusable = F.isnan(label) | (F.abs(label) > MAX_ABS_VALUE)  # +/-inf included
        label = F.when(unusable, F.lit(None).cast("double")).otherwise(label)
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


def split_label_stats(df: "DataFrame", label_col: str) -> dict[str, dict[str, float]]:
    """``{split: {"n", "mean", "std", "min", "max"}}`` of a regression's label (one small
    aggregate; ``std`` is the population standard deviation, 0.0 for an empty split)."""
    from pyspark.sql import functions as F

    stats = {split: {"n": 0, "mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
             for split in _SPLITS}
    label = _col(label_col)
    for row in df.groupBy(SPLIT_COL).agg(
            F.count(label), F.mean(label), F.stddev_pop(label), F.min(label),
            F.max(label)).collect():
        stats[row[0]] = {"n": int(row[1]), "mean": float(row[2]), "std": float(row[3] or 0.0),
                         "min": float(row[4]), "max": float(row[5])}
    return stats


def check_regression_splits(stats: dict[str, dict[str, float]], label_col: str) -> None:
    """Check the splits can train and evaluate a regression.

    Raises
    ------
    DataError
        An empty train or test split, or a label with one value only in the training split
        (nothing to learn, and no scale to standardise it by).
    """
    total = sum(int(s["n"]) for s in stats.values())
    for split in (TRAIN, TEST):
        if not stats[split]["n"]:
            raise DataError(f"the {split} split is empty ({total} usable rows): need more data")
    train = stats[TRAIN]
    if not train["max"] > train["min"]:
        raise DataError(f"label column {label_col!r} is constant ({train['min']!r}) in the "
                        f"{int(train['n'])} training rows: nothing to learn")


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
                        preprocessing: dict[str, Any], classes: list[Any] | None, id_col: str,
                        label_col: str) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` body: raw feature columns -> preprocessed float32 columns, the class
    index (or, ``classes`` None, the regression's label as a double) and the split's index in
    :data:`_SPLITS`."""
    preprocessor = Preprocessor.from_dict(preprocessing)
    class_set = pa.array(classes) if classes is not None else None
    split_set = pa.array(_SPLITS)
    for batch in batches:
        X = np.column_stack([
            batch.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
            for name in features]) if batch.num_rows else np.empty((0, len(features)))
        Xp = preprocessor.transform(X)
        if class_set is None:
            y = batch.column(label_col).cast(pa.float64())
        else:
            y = pc.index_in(batch.column(label_col), value_set=class_set)
            if y.null_count:
                unknown = pc.unique(pc.filter(batch.column(label_col), pc.is_null(y)))
                raise DataError(f"labels {unknown.to_pylist()[:5]} are not among the classes "
                                f"{classes} counted before")
            y = y.cast(pa.int32())
        split = pc.index_in(batch.column(SPLIT_COL), value_set=split_set).cast(pa.int8())
        arrays = [batch.column(id_col), split, y]
        arrays += [pa.array(Xp[:, i]) for i in range(Xp.shape[1])]
        names = ["id", "split", "y"] + [f"x{i}" for i in range(Xp.shape[1])]
        yield pa.RecordBatch.from_arrays(arrays, names=names)


def _id_order(ids: pa.ChunkedArray) -> np.ndarray:
    """Positions that sort ``ids`` (strings, code point order), computed in Arrow."""
    return np.asarray(pc.sort_indices(ids).to_numpy())


def collect_preprocessed(df: "DataFrame", features: Sequence[str], preprocessor: Preprocessor,
                         classes: Sequence[Any] | None, id_col: str, label_col: str
                         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Preprocess in Spark, collect through Arrow, and return ``{split: (X, y)}``.

    ``X`` is ``(n, n_features)`` float32, ``y`` the int64 class index into ``classes``, or
    with ``classes`` None (a regression) the float64 label. Rows are sorted by id so that
    training is reproducible whatever the partitioning.
    """
    from pyspark.sql.types import (ByteType, DoubleType, FloatType, IntegerType, StringType,
                                   StructField, StructType)

    schema = StructType(
        [StructField("id", StringType()), StructField("split", ByteType()),
         StructField("y", IntegerType() if classes is not None else DoubleType())]
        + [StructField(f"x{i}", FloatType()) for i in range(len(features))])
    # Positional names: mapInArrow resolves its input columns by name without quoting, so a
    # feature called "a.b" would be read as a struct field.
    names = [f"__f{i}" for i in range(len(features))]
    body = functools.partial(_preprocess_batches, features=names,
                             preprocessing=preprocessor.to_dict(),
                             classes=list(classes) if classes is not None else None,
                             id_col="__id", label_col="__label")
    table = df.select(_col(id_col).alias("__id"),
                      *[_col(f).alias(n) for f, n in zip(features, names)],
                      _col(label_col).alias("__label"),
                      SPLIT_COL).mapInArrow(body, schema).toArrow()
    # Sorting and splitting work on positions, and each split's rows are gathered from the
    # stacked features in one step: the features are in memory at most twice at any time.
    order = _id_order(table.column("id"))
    split = table.column("split").to_numpy()[order]
    y = table.column("y").to_numpy().astype(np.int64 if classes is not None else np.float64)
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
