"""What Stratum's layers say to each other on Kafka, independent of who sends or reads it.

:mod:`transport.protocol` is the update topic (``model-updates``): its message types, their
validation, and the one fold that turns the topic's history into what should serve. Serving
(:mod:`agents.model_manager`), the batch layer (:mod:`batch.active`, :mod:`batch.announce`) and
the model library (:mod:`models.registry`, :mod:`models.online`) all use it; it imports none of
them.
"""
