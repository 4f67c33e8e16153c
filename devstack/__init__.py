"""Development tooling, not part of the installed product.

:mod:`devstack.stack` provisions and runs a real local Kafka (one broker or three on one
ZooKeeper) and an S3-API server, :mod:`devstack.spark_cluster` a Spark standalone cluster,
:mod:`devstack.run_local` is ``make run``, and :mod:`devstack.harness` holds what tests and
benchmarks share (worker processes, announcements, HTTP calls).
"""
