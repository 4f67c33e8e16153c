"""``stratum tail``: the messages of a topic, as they arrive or from its beginning."""
from __future__ import annotations

import os
import time
import uuid
from typing import Iterator

from app.settings import Settings
from stratum_cli.client import CliError

#: Longest wait for the broker to describe the topic.
METADATA_TIMEOUT_S = 15.0


def read_topic(settings: Settings, topic: str, from_beginning: bool = False,
               limit: int | None = None, timeout: float | None = None) -> Iterator[bytes]:
    """Yield the values of ``topic``'s messages (each partition in offset order): those that
    arrive from now on, or every one kept when ``from_beginning``; stop after ``limit``
    messages or ``timeout`` seconds.

    Reads without joining a consumer group (nothing is committed), so tailing never takes
    partitions from anyone.
    """
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, \
        TopicPartition

    from transport.kafka import client_config

    config = {**client_config(settings, "stratum-cli"),
              # Needed by librdkafka's consumer; never joined (partitions are assigned).
              "group.id": f"stratum-cli-{os.getpid()}-{uuid.uuid4().hex[:8]}",
              "enable.auto.commit": False, "enable.partition.eof": False,
              # Reading a topic never creates it (one the broker created would have one
              # partition).
              "allow.auto.create.topics": False}
    consumer = Consumer(config)
    try:
        try:
            # Every topic's metadata: asking for the one topic may create it on a broker
            # with auto.create.topics.enable.
            metadata = consumer.list_topics(timeout=METADATA_TIMEOUT_S)
        except KafkaException as exc:
            raise CliError(f"cannot read topic {topic!r} from {settings.bootstrap_servers}: "
                           f"{exc.args[0].str() if exc.args else exc}") from None
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or not described.partitions:
            reason = described.error.str() if described is not None and described.error \
                else "no such topic"
            raise CliError(f"cannot read topic {topic!r} from {settings.bootstrap_servers}: "
                           f"{reason}")
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        consumer.assign([TopicPartition(topic, p, start) for p in sorted(described.partitions)])
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = 0
        while limit is None or seen < limit:
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                return
            message = consumer.poll(wait)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise CliError(f"reading {topic!r}: {error.str()}")
                continue
            seen += 1
            yield message.value() or b""
    finally:
        consumer.close()
