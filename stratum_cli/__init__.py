"""``stratum``: the command line of a deployment (status, models, predict, tail).

It talks to a worker over its HTTP endpoints (``--url``, ``STRATUM_URL``) and reads the output
and dead-letter topics from Kafka with the worker's own settings (``KAFKA_BROKER`` and the
topic names). ``main`` is the console script; ``python -m stratum_cli`` runs the same.
"""
