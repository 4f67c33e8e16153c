"""Transport: what Stratum's layers say to each other on Kafka, independent of who sends it.

:mod:`transport.protocol` is the update topic (``model-updates``): its message types, their
validation, and the one fold that turns the topic's history into what should serve, used by
serving, the batch layer and the model library alike. :mod:`transport.topics` declares and
creates the topics, :mod:`transport.schemas` holds the input, prediction and dead-letter
formats, :mod:`transport.summary` the scored summaries serving sends the speed layer,
:mod:`transport.kafka` the serving path's bulk reads and produces, and :mod:`transport.lease`
whether a worker still owns the partitions it was given.
"""
