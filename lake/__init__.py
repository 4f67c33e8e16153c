"""The lake: the input stream archived as Parquet exactly once, and read back by the batch job.

:mod:`lake.archive` writes it from the serving path; :mod:`lake.reader` lists and reads it
into Spark. Neither knows about Faust: the serving layer hands the archive its micro-batches.
"""
