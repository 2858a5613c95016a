"""Shared fixtures: one real local stack per test session, on free loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis
import torch

from schemas.config import SecurityConfig, StackConfig, TopicsConfig
from tools.processes import free_ports as find_free_ports
from tools.stack import LocalStack


SERVER_FIXTURES = {"stack", "auth_stack", "redis_client"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that takes a server fixture needs servers, marked or not: `./run test --fast` must skip it."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Small CPU batches here: one intra-op thread. On a 2-core machine shared with Kafka, Redis and other
    test processes, two OpenMP threads made one 128 px backbone pass up to 100x slower (busy barriers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def free_ports() -> Callable[[int], list[int]]:
    """`free_ports(n)`: n loopback ports nobody listens on right now."""
    return find_free_ports


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A fresh Kafka + Redis (+ Prometheus if installed), never on the demo's default ports."""
    kafka, controller, redis_port, prometheus = find_free_ports(4)
    config = StackConfig(
        kafka_port=kafka,
        kafka_controller_port=controller,
        redis_port=redis_port,
        prometheus_port=prometheus,
        state_dir=tmp_path_factory.mktemp("stack"),
    )
    local = LocalStack(config, TopicsConfig())
    try:
        local.up()
        yield local
    finally:
        local.down()


@pytest.fixture(scope="module")
def auth_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Kafka + Redis with auth on (`inspection stack up --auth`), on free ports, for one test module;
    stopped and its files (credentials included) removed at the end."""
    kafka, controller, redis_port, prometheus = find_free_ports(4)
    config = StackConfig(kafka_port=kafka, kafka_controller_port=controller, redis_port=redis_port,
                         prometheus_port=prometheus, state_dir=tmp_path_factory.mktemp("auth-stack"),
                         security=SecurityConfig(enabled=True))
    local = LocalStack(config, TopicsConfig())
    try:
        local.up()
        yield local
    finally:
        local.down(wipe=True)


@pytest.fixture
def redis_client(stack: LocalStack) -> Iterator[redis.Redis]:
    """A client of the session's Redis, with database 0 emptied before the test."""
    client = redis.Redis.from_url(stack.config.redis_url)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()
