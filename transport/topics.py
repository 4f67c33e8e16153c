"""Stratum's Kafka topics: names, partition counts and configs, created explicitly.

A topic the broker auto-creates gets one partition and a Faust source topic then fails with
PartitionsMismatch, so every topic Stratum uses is created here with the admin client first.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from app.settings import Settings

__all__ = ["TopicSpec", "topic_specs", "topic_spec", "durability_config", "scored_topic_name",
           "scored_topic_spec",
           "ensure_topics", "ensure_topics_sync"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    """One topic as Stratum wants it to exist."""

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def durability_config(settings: Settings) -> dict[str, str]:
    """Topic configuration every topic Stratum creates gets (Faust's changelogs and internal
    topics included): ``min.insync.replicas`` when set, else the broker's default."""
    if settings.topic_min_insync_replicas:
        return {"min.insync.replicas": str(settings.topic_min_insync_replicas)}
    return {}


def scored_topic_name(settings: Settings) -> str:
    """The internal topic where serving summarises each micro-batch it scored for the speed
    layer (:mod:`transport.summary`); Faust creates it from :func:`scored_topic_spec`."""
    return f"{settings.app_id}-scored"


def scored_topic_spec(settings: Settings) -> TopicSpec:
    """The scored-summary topic: ONE partition, so one worker of the group (the speed layer's
    learner) reads every summary and numbers the chain of updates."""
    return TopicSpec(scored_topic_name(settings), 1, durability_config(settings))


def topic_spec(settings: Settings, name: str) -> TopicSpec:
    """The spec of Stratum's topic ``name`` (one of :func:`topic_specs`)."""
    for spec in topic_specs(settings):
        if spec.name == name:
            return spec
    raise KeyError(f"{name!r} is not one of Stratum's topics")


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic Stratum reads or writes, with its partition count and config."""
    n = settings.topic_partitions
    return [
        TopicSpec(settings.events_topic, n),
        # Keyed by id, so the owner of an id's prediction is the owner of its table row.
        TopicSpec(settings.predictions_topic, n),
        # A shadow rollout's candidate predictions, keyed by id like the predictions.
        TopicSpec(settings.shadow_topic, n),
        TopicSpec(settings.dlq_topic, n),
        # One partition keeps announcements totally ordered; kept forever so a worker that
        # starts reads the whole history and lands on the newest announced version.
        TopicSpec(settings.updates_topic, 1, {"retention.ms": "-1", "retention.bytes": "-1"}),
        TopicSpec(settings.metrics_topic, 1),
        # Created here too, before any consumer subscribes: a group that is assigned
        # partitions while it is missing leaves the speed layer without a learner until the
        # next rebalance.
        scored_topic_spec(settings),
    ]


async def ensure_topics(settings: Settings, names: list[str] | None = None,
                        timeout_s: float = 30.0) -> list[str]:
    """Create the missing topics among ``names`` (default: all); return those created."""
    wanted = [s for s in topic_specs(settings) if names is None or s.name in names]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers,
                                request_timeout_ms=int(timeout_s * 1000))
    await asyncio.wait_for(admin.start(), timeout_s)
    created: list[str] = []
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in wanted if s.name not in existing]
        for spec in missing:
            try:
                await admin.create_topics([NewTopic(
                    spec.name, spec.partitions, settings.topic_replication_factor,
                    topic_configs={**durability_config(settings), **spec.config})])
                created.append(spec.name)
            except TopicAlreadyExistsError:  # another worker won the race: fine
                pass
        if created:
            log.info("created topics %s", ", ".join(created))
        # Metadata propagates asynchronously; wait until every wanted topic is visible.
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            visible = set(await admin.list_topics())
            if all(s.name in visible for s in wanted):
                break
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"topics not visible after {timeout_s}s: "
                                   f"{[s.name for s in wanted if s.name not in visible]}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
    return created


def ensure_topics_sync(settings: Settings, names: list[str] | None = None) -> list[str]:
    """Blocking :func:`ensure_topics` for scripts and the batch job."""
    return asyncio.run(ensure_topics(settings, names))
