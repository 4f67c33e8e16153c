"""Transport: Stratum's Kafka topics, the formats of the messages on them, and bulk Kafka I/O.

The layer every other one talks through: :mod:`transport.topics` declares and creates the
topics, :mod:`transport.schemas` holds the input, prediction, dead-letter and scored-summary
formats, :mod:`transport.kafka` the serving path's bulk reads and produces, and
:mod:`transport.lease` whether a worker still owns the partitions it was given.
"""
