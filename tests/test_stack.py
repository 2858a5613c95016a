"""The local stack against real servers: topics, large records, Redis persistence, idempotent up/down."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from prometheus_client import CollectorRegistry, Counter, start_http_server

from schemas.config import StackConfig
from schemas.messages import Record
from workers.kafka_io import make_consumer, make_producer, read_topic, record_of, send_record
from tools.stack import LocalStack, StackError

pytestmark = pytest.mark.integration


def _admin(stack: LocalStack) -> KafkaAdminClient:
    return KafkaAdminClient(bootstrap_servers=stack.config.bootstrap_servers, client_id="test-admin")


def _wait_for(predicate, timeout_s: float, interval_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def test_topics_have_partitions_and_message_limit(stack: LocalStack) -> None:
    topics = stack.topics
    expected = {topics.frames: topics.frame_partitions, topics.results: topics.result_partitions,
                topics.control: 1, topics.events: 1, topics.dead_letter: 1}
    admin = _admin(stack)
    try:
        described = {t["name"]: t for t in admin.describe_topics(list(expected))}
        resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in expected]
        configs = admin.describe_configs(resources)["topic"]
    finally:
        admin.close()
    for name, partitions in expected.items():
        assert len(described[name]["partitions"]) == partitions, name
        assert all(len(p["replica_nodes"]) == 1 for p in described[name]["partitions"]), name
        assert configs[name]["max.message.bytes"]["value"] == str(topics.max_message_bytes), name


def test_five_megabyte_record_round_trips_with_headers(stack: LocalStack) -> None:
    bootstrap, topics = stack.config.bootstrap_servers, stack.topics
    key = f"camera-{uuid.uuid4().hex}".encode()
    sent = Record(key, os.urandom(5 * 1024 * 1024), [("schema", b"inspection.frame"), ("empty", b"")])
    producer = make_producer(bootstrap, topics, client_id="test-producer")
    try:
        assert producer.config["enable_idempotence"], "kafka-python silently disabled idempotence"
        metadata = send_record(producer, topics.frames, sent).get(timeout=30)
    finally:
        producer.close()

    records = read_topic(bootstrap, topics.frames, topics, timeout_s=30,
                         until=lambda got: any(r.key == key for r in got))
    received = [r for r in records if r.key == key]
    assert len(received) == 1
    assert (received[0].partition, received[0].offset) == (metadata.partition, metadata.offset)
    assert record_of(received[0]) == sent


def test_consumer_group_reads_and_commits(stack: LocalStack) -> None:
    bootstrap, topics = stack.config.bootstrap_servers, stack.topics
    marker = uuid.uuid4().hex.encode()
    producer = make_producer(bootstrap, topics, client_id="test-producer")
    try:
        for i in range(3):
            send_record(producer, topics.events, Record(marker, b"%d" % i, []))
        producer.flush(timeout=30)
    finally:
        producer.close()

    consumer = make_consumer(bootstrap, f"test-{marker.decode()}", [topics.events], topics, client_id="test")
    try:
        got: list = []
        deadline = time.monotonic() + 30
        while sum(r.key == marker for r in got) < 3 and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                got.extend(batch)
        assert [r.value for r in got if r.key == marker] == [b"0", b"1", b"2"]
        consumer.commit()
        partition = next(iter(consumer.assignment()))
        assert consumer.committed(partition) == max(r.offset for r in got) + 1
    finally:
        consumer.close()


def test_redis_persists_to_append_only_file(stack: LocalStack, redis_client: redis.Redis) -> None:
    assert redis_client.config_get("appendonly") == {"appendonly": "yes"}
    redis_dir = Path(redis_client.config_get("dir")["dir"])
    aof_dir = redis_dir / redis_client.config_get("appenddirname")["appenddirname"]
    assert aof_dir.parent == stack.state_dir / "redis"

    key = f"aof-probe-{uuid.uuid4().hex}"
    redis_client.set(key, "persisted")

    def in_aof() -> bool:
        return any(key.encode() in f.read_bytes() for f in aof_dir.iterdir() if f.is_file())

    assert _wait_for(in_aof, timeout_s=5), f"{key} not found in {aof_dir}"


def test_up_again_is_a_no_op(stack: LocalStack) -> None:
    before = stack.status()
    again = stack.up()
    assert again["started"] == []
    for name, server in before["servers"].items():
        assert again["servers"][name]["pid"] == server["pid"], name


def test_status_reports_where_things_run(stack: LocalStack) -> None:
    status = stack.status()
    assert status["running"]
    assert status["bootstrap_servers"] == stack.config.bootstrap_servers
    assert status["redis_url"] == stack.config.redis_url
    assert status["servers"]["kafka"]["running"] and status["servers"]["redis"]["running"]
    assert status["prometheus_url"] == stack.prometheus_url
    assert Path(status["servers"]["kafka"]["log"]).is_file()


def test_prometheus_scrapes_registered_targets(stack: LocalStack, free_ports) -> None:
    if stack.prometheus_url is None:
        pytest.skip("prometheus binary not installed (apt-get install prometheus)")
    with urllib.request.urlopen(f"{stack.prometheus_url}/-/ready", timeout=5) as response:
        assert response.status == 200

    registry = CollectorRegistry()
    Counter("stack_test_probe", "A metric for the scrape test.", registry=registry).inc()
    (port,) = free_ports(1)
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    name = f"probe-{uuid.uuid4().hex[:8]}"

    def target_health() -> str | None:
        active = _get_json(f"{stack.prometheus_url}/api/v1/targets")["data"]["activeTargets"]
        healths = [t["health"] for t in active if t["labels"].get("worker") == name]
        return healths[0] if healths else None

    try:
        stack.register_metrics_target(name, f"127.0.0.1:{port}")
        assert _wait_for(lambda: target_health() == "up", timeout_s=20), target_health()
        stack.unregister_metrics_target(name)
        assert _wait_for(lambda: target_health() is None, timeout_s=20)
    finally:
        stack.unregister_metrics_target(name)
        server.shutdown()
        thread.join(timeout=5)


def test_stale_pid_files_and_down_when_down(tmp_path: Path, free_ports) -> None:
    ports = free_ports(4)
    config = StackConfig(kafka_port=ports[0], kafka_controller_port=ports[1], redis_port=ports[2],
                         prometheus_port=ports[3], state_dir=tmp_path / "idle")
    idle = LocalStack(config)
    assert idle.down()["stopped"] == []  # nothing was ever started

    gone = subprocess.Popen(["true"])
    gone.wait()
    pid_file = idle.state_dir / "redis" / "redis.pid"
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(f"{gone.pid}\n")
    status = idle.status()
    assert not status["running"] and status["servers"]["redis"]["pid"] is None
    assert not pid_file.exists()

    pid_file.write_text(f"{os.getpid()}\n")  # alive, but not a redis-server: must not be touched
    assert idle.down(wipe=True)["stopped"] == []
    assert not idle.state_dir.exists()


def test_failed_up_leaves_nothing_running(tmp_path: Path, free_ports) -> None:
    """Redis' port is taken after Kafka was launched: up() must fail clearly and stop Kafka again."""
    ports = free_ports(4)
    config = StackConfig(kafka_port=ports[0], kafka_controller_port=ports[1], redis_port=ports[2],
                         prometheus_port=ports[3], state_dir=tmp_path / "blocked")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports[2]))
        squatter.listen()
        with pytest.raises(StackError, match=f"127.0.0.1:{ports[2]} is already in use"):
            LocalStack(config).up()
    assert not any(s["running"] for s in LocalStack(config).status()["servers"].values())
    leftovers = subprocess.run(["pgrep", "-f", str(config.state_dir)], capture_output=True, text=True)
    assert leftovers.stdout == ""


def test_restart_keeps_redis_and_kafka_data(stack: LocalStack, redis_client: redis.Redis) -> None:
    """Runs last in this module: stops the session stack and starts it again on the same state."""
    bootstrap, topics = stack.config.bootstrap_servers, stack.topics
    key = uuid.uuid4().hex
    redis_client.set(key, "kept")
    producer = make_producer(bootstrap, topics, client_id="test-producer")
    try:
        send_record(producer, topics.control, Record(key.encode(), b"kept", [])).get(timeout=30)
    finally:
        producer.close()
    pids = [s["pid"] for s in stack.status()["servers"].values() if s["pid"]]

    stopped = stack.down()
    assert not stopped["running"] and set(stopped["stopped"]) >= {"kafka", "redis"}
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    assert stack.down()["stopped"] == []

    restarted = stack.up()
    assert set(restarted["started"]) >= {"kafka", "redis"}
    assert redis.Redis.from_url(stack.config.redis_url).get(key) == b"kept"
    records = read_topic(bootstrap, topics.control, topics, timeout_s=30,
                         until=lambda got: any(r.key == key.encode() for r in got))
    assert [r.value for r in records if r.key == key.encode()] == [b"kept"]


def test_status_and_down_find_a_stack_by_its_folder_alone(tmp_path: Path, free_ports, capsys) -> None:
    """Started on other ports than the defaults: `status` and `down --wipe` with only --state-dir must
    find every server (not take the live Redis' pid file for a stale one and leave it running)."""
    from workers.cli import main

    ports = free_ports(4)
    state = str(tmp_path / "elsewhere")
    flags = ["--kafka-port", str(ports[0]), "--kafka-controller-port", str(ports[1]),
             "--redis-port", str(ports[2]), "--prometheus-port", str(ports[3])]
    try:
        assert main(["stack", "up", "--state-dir", state, *flags]) == 0
        capsys.readouterr()
        assert main(["stack", "status", "--state-dir", state]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["running"] and status["servers"]["redis"]["pid"] is not None
        assert main(["stack", "down", "--wipe", "--state-dir", state]) == 0
        assert {"kafka", "redis"} <= set(json.loads(capsys.readouterr().out)["stopped"])
    finally:
        main(["stack", "down", "--wipe", "--state-dir", state, *flags])
    leftovers = subprocess.run(["pgrep", "-f", state], capture_output=True, text=True)
    assert leftovers.stdout == ""
