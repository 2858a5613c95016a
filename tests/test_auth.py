"""Authentication and authorisation against a real auth-on stack: one test per rule of workers/security.py.

Every refusal is asserted as its specific error class, so a rule that stopped refusing (or a client that
failed for another reason, such as a timeout) fails the test.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ACLFilter, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePatternFilter
from kafka.admin import ResourceType
from kafka.errors import (
    GroupAuthorizationFailedError,
    KafkaTimeoutError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailedError,
)
from kafka.structs import OffsetAndMetadata

from schemas.config import SecurityConfig, StackConfig, TopicsConfig
from schemas.messages import Record
from workers import security
from workers.kafka_io import make_consumer, make_producer, make_transactional_producer, send_record, subscribe
from tools.stack import LocalStack, StackError
from workers.transactions import TransactionFailed, TransactionSlot

pytestmark = pytest.mark.integration

# Refusals must come back quickly: nothing here waits long for a broker that will not say yes.
FAST = dict(request_timeout_ms=10_000, max_block_ms=10_000)
GROUPS = security.default_groups()




# ---------------------------------------------------------------------------------- helpers
def _options(stack: LocalStack, role: str) -> dict:
    """`role`'s kafka-python options, loaded the way a worker loads them: via the environment."""
    return security.kafka_client_options(security.load_credentials(security.credentials_env(stack.state_dir, role)))


def _producer(stack: LocalStack, role: str, **overrides) -> KafkaProducer:
    return make_producer(stack.config.bootstrap_servers, stack.topics, client_id=f"test-{role}",
                         **FAST, **_options(stack, role), **overrides)


def _consumer(stack: LocalStack, role: str, group: str | None, topics: list[str], **overrides) -> KafkaConsumer:
    return make_consumer(stack.config.bootstrap_servers, group, topics, stack.topics, client_id=f"test-{role}",
                         **_options(stack, role), **overrides)


def _send(stack: LocalStack, role: str, topic: str, value: bytes = b"probe") -> bytes:
    """Send one record as `role` and wait for the ack; returns its (unique) key."""
    key = uuid.uuid4().hex.encode()
    producer = _producer(stack, role)
    try:
        send_record(producer, topic, Record(key, value, [])).get(timeout=20)
    finally:
        producer.close(timeout=5)
    return key


def _refused_send(stack: LocalStack, role: str, topic: str) -> None:
    """Sending to `topic` as `role` must fail with TopicAuthorizationFailedError, at send() or on the ack."""
    producer = _producer(stack, role)
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            send_record(producer, topic, Record(b"k", b"v", [])).get(timeout=20)
    finally:
        producer.close(timeout=5)


def _read_all(stack: LocalStack, role: str, topic: str, until_key: bytes, polls: int = 60) -> list:
    """Records of `topic` read as `role` without a group (assign, as operators read), until `until_key`."""
    consumer = _consumer(stack, role, None, [])
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        assert partitions, f"{role} sees no partitions of {topic}"
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        return _poll_until(consumer, until_key, polls)
    finally:
        consumer.close()


def _poll_until(consumer: KafkaConsumer, key: bytes, polls: int = 60) -> list:
    records: list = []
    for _ in range(polls):
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
        if any(r.key == key for r in records):
            break
    return records


def _redis(stack: LocalStack, role: str | None, **overrides) -> redis.Redis:
    creds = stack.credentials(role) if role else None
    options = {**security.redis_client_options(creds), **overrides}
    return redis.Redis.from_url(stack.config.redis_url, socket_timeout=5, **options)


# ---------------------------------------------------------------------------------- the stack
def test_status_says_auth_and_names_credential_files(auth_stack: LocalStack) -> None:
    status = auth_stack.status()
    assert status["running"] and status["auth"] is True
    for role in security.ROLES:
        path = Path(status["credentials"][role])
        assert path == auth_stack.credentials_file(role)
        assert path.stat().st_mode & 0o777 == 0o600, role
    assert (auth_stack.state_dir / "credentials").stat().st_mode & 0o777 == 0o700


def test_broker_acls_are_exactly_the_table(auth_stack: LocalStack) -> None:
    admin = KafkaAdminClient(bootstrap_servers=auth_stack.config.bootstrap_servers, **_options(auth_stack, "admin"))
    everything = ACLFilter(None, None, ACLOperation.ANY, ACLPermissionType.ANY,
                           ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY))
    try:
        acls, _ = admin.describe_acls(everything)
    finally:
        admin.close()
    assert set(acls) == set(security.kafka_acls(auth_stack.topics, GROUPS))


def test_up_again_keeps_passwords_and_is_a_no_op(auth_stack: LocalStack) -> None:
    before = {role: auth_stack.credentials_file(role).read_bytes() for role in security.ROLES}
    assert auth_stack.up()["started"] == []
    assert {role: auth_stack.credentials_file(role).read_bytes() for role in security.ROLES} == before


def test_stack_refuses_other_security_while_running(auth_stack: LocalStack) -> None:
    plain = LocalStack(auth_stack.config.model_copy(update={"security": SecurityConfig()}))
    assert plain.status()["auth"] is True  # what runs, not what this object was configured with
    with pytest.raises(StackError, match="runs with security"):
        plain.up()


# ---------------------------------------------------------------------------------- Kafka: no credential
def _bootstrap_fails(stack: LocalStack, why: str, **options) -> None:
    """An admin client with `options` must not get in, and the broker's log must say `why`.

    kafka-python reports a refused bootstrap only as a timeout (and may see the hang-up before the
    broker's error), so the reason is read from the broker; a client with the right credentials must
    get in right away, so the broker was not merely down."""
    log_file = stack.state_dir / "kafka" / "server.log"
    start = log_file.stat().st_size
    with pytest.raises(KafkaTimeoutError, match="Unable to bootstrap"):
        KafkaAdminClient(bootstrap_servers=stack.config.bootstrap_servers, request_timeout_ms=5000,
                         bootstrap_timeout_ms=3000, **options)
    KafkaAdminClient(bootstrap_servers=stack.config.bootstrap_servers, **_options(stack, "camera")).close()
    with open(log_file, errors="replace") as handle:
        handle.seek(start)
        assert why in handle.read()


def test_no_credentials_no_access(auth_stack: LocalStack) -> None:
    """A PLAINTEXT client on the SASL port: the broker answers ApiVersions, then hangs up on Metadata."""
    _bootstrap_fails(auth_stack, "Unexpected Kafka request of type METADATA during SASL handshake")


def test_wrong_password_no_access(auth_stack: LocalStack) -> None:
    _bootstrap_fails(auth_stack, "Failed authentication with /127.0.0.1",
                     **{**_options(auth_stack, "camera"), "sasl_plain_password": "nope"})


def test_unknown_user_no_access(auth_stack: LocalStack) -> None:
    _bootstrap_fails(auth_stack, "Failed authentication with /127.0.0.1",
                     **{**_options(auth_stack, "camera"), "sasl_plain_username": "mallory"})


# ---------------------------------------------------------------------------------- Kafka: per role
def test_camera_writes_frames(auth_stack: LocalStack) -> None:
    _send(auth_stack, "camera", auth_stack.topics.frames)


def test_camera_cannot_send_a_control_command(auth_stack: LocalStack) -> None:
    _refused_send(auth_stack, "camera", auth_stack.topics.control)


def test_camera_cannot_read_frames(auth_stack: LocalStack) -> None:
    consumer = _consumer(auth_stack, "camera", None, [])
    try:
        consumer.assign([TopicPartition(auth_stack.topics.frames, 0)])
        with pytest.raises(TopicAuthorizationFailedError):
            _poll_until(consumer, b"never", polls=20)
    finally:
        consumer.close()


def test_operator_sends_control_commands(auth_stack: LocalStack) -> None:
    key = _send(auth_stack, "operator", auth_stack.topics.control)
    consumer = _consumer(auth_stack, "control", GROUPS["control"], [auth_stack.topics.control])
    try:
        assert any(r.key == key for r in _poll_until(consumer, key))  # the control worker reads control
    finally:
        consumer.close()


def test_operator_cannot_write_frames_or_results(auth_stack: LocalStack) -> None:
    _refused_send(auth_stack, "operator", auth_stack.topics.frames)
    _refused_send(auth_stack, "operator", auth_stack.topics.results)


def test_operator_reads_events_written_by_control(auth_stack: LocalStack) -> None:
    key = _send(auth_stack, "control", auth_stack.topics.events)
    assert any(r.key == key for r in _read_all(auth_stack, "operator", auth_stack.topics.events, key))
    dead = _send(auth_stack, "control", auth_stack.topics.dead_letter)
    assert any(r.key == dead for r in _read_all(auth_stack, "operator", auth_stack.topics.dead_letter, dead))


def test_control_cannot_write_results_or_frames(auth_stack: LocalStack) -> None:
    _refused_send(auth_stack, "control", auth_stack.topics.results)
    _refused_send(auth_stack, "control", auth_stack.topics.frames)


def test_inference_reads_frames_in_its_group_and_writes_results(auth_stack: LocalStack) -> None:
    key = _send(auth_stack, "camera", auth_stack.topics.frames)
    consumer = _consumer(auth_stack, "inference", GROUPS["inference"], [auth_stack.topics.frames])
    try:
        assert any(r.key == key for r in _poll_until(consumer, key))
        consumer.commit()
    finally:
        consumer.close()
    result = _send(auth_stack, "inference", auth_stack.topics.results)
    _send(auth_stack, "inference", auth_stack.topics.dead_letter)
    assert any(r.key == result for r in _read_all(auth_stack, "operator", auth_stack.topics.results, result))


def test_inference_cannot_read_control(auth_stack: LocalStack, caplog: pytest.LogCaptureFixture) -> None:
    """Inference may not even see that control exists (no DESCRIBE), so kafka-python never fetches it."""
    control = auth_stack.topics.control
    key = _send(auth_stack, "operator", control)  # something it could read, were it allowed
    admin = KafkaAdminClient(bootstrap_servers=auth_stack.config.bootstrap_servers, **_options(auth_stack, "inference"))
    try:
        (described,) = admin.describe_topics([control])
        assert described["error_code"] == TopicAuthorizationFailedError.errno
    finally:
        admin.close()
    reader = _consumer(auth_stack, "inference", None, [])
    try:
        reader.assign([TopicPartition(control, 0)])
        assert not any(r.key == key for r in _poll_until(reader, key, polls=10))
    finally:
        reader.close()
    # Subscribing in its group is refused too: the topic's partitions never become visible to it.
    member = _consumer(auth_stack, "inference", GROUPS["inference"], [])
    try:
        with caplog.at_level(logging.ERROR, logger="kafka"), pytest.raises(TimeoutError, match="may not describe"):
            subscribe(member, [control], timeout_s=3)
        assert member.assignment() == set()
        assert f"Topic {control} is not authorized" in caplog.text
    finally:
        member.close()


def test_inference_cannot_send_control_commands(auth_stack: LocalStack) -> None:
    _refused_send(auth_stack, "inference", auth_stack.topics.control)


def test_inference_cannot_join_another_group(auth_stack: LocalStack) -> None:
    consumer = _consumer(auth_stack, "inference", GROUPS["control"], [auth_stack.topics.frames])
    try:
        with pytest.raises(GroupAuthorizationFailedError):
            _poll_until(consumer, b"never", polls=20)
    finally:
        consumer.close()


def test_inference_transaction_with_consumer_offsets(auth_stack: LocalStack) -> None:
    """The exactly-once path: consume in the group, then results + offsets in one committed transaction."""
    topics = auth_stack.topics
    frame = _send(auth_stack, "camera", topics.frames)
    consumer = _consumer(auth_stack, "inference", GROUPS["inference"], [topics.frames])
    producer = _producer(auth_stack, "inference", transactional_id=f"inspection-infer-test-{uuid.uuid4().hex[:6]}")
    try:
        records = _poll_until(consumer, frame)
        assert any(r.key == frame for r in records)
        producer.init_transactions()
        producer.begin_transaction()
        result = uuid.uuid4().hex.encode()
        send_record(producer, topics.results, Record(result, b"verdict", []))
        offsets = {TopicPartition(r.topic, r.partition): OffsetAndMetadata(r.offset + 1, "", -1) for r in records}
        producer.send_offsets_to_transaction(offsets, GROUPS["inference"])
        producer.commit_transaction()
    finally:
        producer.close(timeout=5)
        consumer.close()
    # Operators read results read_committed (make_consumer's default): the committed result is visible.
    committed = _read_all(auth_stack, "operator", topics.results, result)
    assert any(r.key == result for r in committed)


def test_a_record_refused_by_an_acl_is_never_committed_past(auth_stack: LocalStack) -> None:
    """kafka-python may fail a record in its future without raising: the slot checks every record before
    the offsets go, so a batch with a refused record commits neither its records nor its offsets."""
    topics = auth_stack.topics
    frame = _send(auth_stack, "camera", topics.frames)
    consumer = _consumer(auth_stack, "inference", GROUPS["inference"], [topics.frames])
    slot_id = f"inspection-infer-acl-{uuid.uuid4().hex[:6]}"
    slot = TransactionSlot(slot_id, lambda: make_transactional_producer(
        auth_stack.config.bootstrap_servers, topics, slot_id, 10_000, **FAST, **_options(auth_stack, "inference")),
        step_timeout_s=20, stuck_after_s=30)
    try:
        records = [r for r in _poll_until(consumer, frame) if r.key == frame]
        partition = TopicPartition(topics.frames, records[0].partition)
        before = consumer.committed(partition, timeout_ms=10_000)
        result = uuid.uuid4().hex.encode()
        outgoing = [(topics.results, Record(result, b"verdict", [])), (topics.control, Record(b"k", b"forbidden", []))]
        with pytest.raises(TransactionFailed, match="TopicAuthorization"):
            slot.commit(outgoing, {partition: OffsetAndMetadata(records[0].offset + 1, "", -1)},
                        consumer.group_metadata())
        assert consumer.committed(partition, timeout_ms=10_000) == before  # not committed past the frame
    finally:
        slot.close()
        consumer.close()
    assert not any(r.key == result for r in _read_all(auth_stack, "operator", topics.results, result, polls=10))


def test_inference_transactional_id_outside_its_prefix_is_refused(auth_stack: LocalStack) -> None:
    producer = _producer(auth_stack, "inference", transactional_id="inspection-control-0")
    try:
        with pytest.raises(TransactionalIdAuthorizationFailedError):
            producer.init_transactions()
    finally:
        producer.close(timeout=5)


def test_no_role_but_admin_creates_topics(auth_stack: LocalStack) -> None:
    admin = KafkaAdminClient(bootstrap_servers=auth_stack.config.bootstrap_servers, **_options(auth_stack, "control"))
    try:
        with pytest.raises(TopicAuthorizationFailedError):  # what CreateTopics answers without CREATE
            admin.create_topics({f"intruder-{uuid.uuid4().hex[:6]}": {"num_partitions": 1, "replication_factor": 1}})
    finally:
        admin.close()


# ---------------------------------------------------------------------------------- Redis
def test_redis_default_user_is_disabled(auth_stack: LocalStack) -> None:
    anonymous = _redis(auth_stack, None)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
    finally:
        anonymous.close()


def test_redis_wrong_password_is_refused(auth_stack: LocalStack) -> None:
    client = _redis(auth_stack, "control", password="not-the-password")
    try:
        with pytest.raises(redis.exceptions.AuthenticationError):
            client.ping()
    finally:
        client.close()


def test_redis_control_writes_the_store_and_inference_reads_it(auth_stack: LocalStack) -> None:
    control, inference = _redis(auth_stack, "control"), _redis(auth_stack, "inference")
    key = f"kpk:test:{uuid.uuid4().hex}"
    updates = inference.pubsub()
    try:
        updates.subscribe("kpk:updates")  # how workers hear of a new store version
        assert updates.get_message(timeout=5)["type"] == "subscribe"
        with control.pipeline(transaction=True) as pipe:  # the store publishes in MULTI/EXEC with WATCH
            pipe.watch("kpk:version")
            pipe.multi()
            pipe.set(key, "blob")
            pipe.hset("kpk:commands", key, 1)
            pipe.publish("kpk:updates", 1)
            pipe.execute()
        assert inference.get(key) == b"blob"
        assert inference.hget("kpk:commands", key) == b"1"
        assert updates.get_message(timeout=5) == {"type": "message", "pattern": None, "channel": b"kpk:updates",
                                                  "data": b"1"}
    finally:
        updates.close()
        control.delete(key)
        control.close()
        inference.close()


@pytest.mark.parametrize("role", ["inference", "monitor"])
def test_redis_readers_cannot_write_the_store(auth_stack: LocalStack, role: str) -> None:
    reader = _redis(auth_stack, role)
    try:
        reader.get("kpk:version")  # reads are allowed (a refusal raises NoPermissionError)
        for write in (lambda: reader.set("kpk:manifest", "forged"), lambda: reader.delete("kpk:version"),
                      lambda: reader.publish("kpk:updates", 99), lambda: reader.flushdb()):
            with pytest.raises(redis.exceptions.NoPermissionError):
                write()
    finally:
        reader.close()


def test_monitor_cannot_send_control_commands_or_read_any_topic(auth_stack: LocalStack) -> None:
    _refused_send(auth_stack, "monitor", auth_stack.topics.control)
    _refused_send(auth_stack, "monitor", auth_stack.topics.frames)
    acls = security.kafka_acls(auth_stack.topics)
    assert not any(acl.principal == "User:monitor" for acl in acls)  # no grant at all: Kafka denies everything


def test_redis_users_are_confined_to_the_namespace(auth_stack: LocalStack) -> None:
    control, inference = _redis(auth_stack, "control"), _redis(auth_stack, "inference")
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            control.set("other:key", "x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            inference.get("other:key")
        with pytest.raises(redis.exceptions.NoPermissionError):
            control.keys("*")  # dangerous commands are not granted
    finally:
        control.close()
        inference.close()


def test_camera_has_no_redis_user(auth_stack: LocalStack) -> None:
    assert security.redis_client_options(auth_stack.credentials("camera")) == {}


# ---------------------------------------------------------------------------------- credentials loading
def test_no_environment_means_no_credentials() -> None:
    assert security.load_credentials({}) is None
    assert security.kafka_client_options(None) == {} and security.redis_client_options(None) == {}


def test_credentials_from_environment_variables() -> None:
    creds = security.load_credentials({"INSPECTION_KAFKA_USERNAME": "camera", "INSPECTION_KAFKA_PASSWORD": "s3cret",
                                       "INSPECTION_KAFKA_MECHANISM": "SCRAM-SHA-512"})
    assert creds is not None and "s3cret" not in repr(creds)
    assert security.kafka_client_options(creds) == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "camera", "sasl_plain_password": "s3cret"}


def test_incomplete_or_ambiguous_environment_is_refused(tmp_path: Path) -> None:
    with pytest.raises(security.CredentialsError, match="password") as refused:
        security.load_credentials({"INSPECTION_KAFKA_USERNAME": "camera"})
    with pytest.raises(security.CredentialsError, match="not both"):
        security.load_credentials({"INSPECTION_CREDENTIALS_FILE": str(tmp_path / "x.json"),
                                   "INSPECTION_KAFKA_PASSWORD": "s3cret"})
    with pytest.raises(security.CredentialsError, match="redis_username and redis_password"):
        security.load_credentials({"INSPECTION_KAFKA_USERNAME": "c", "INSPECTION_KAFKA_PASSWORD": "p",
                                   "INSPECTION_REDIS_PASSWORD": "leaked?"})
    assert "s3cret" not in str(refused.value)


def test_world_readable_credentials_file_is_refused(tmp_path: Path) -> None:
    creds = security.ensure_credentials_files(tmp_path)["inference"]
    path = security.credentials_file(tmp_path, "inference")
    assert security.read_credentials_file(path) == creds
    assert security.load_credentials({"INSPECTION_CREDENTIALS_FILE": str(path)}) == creds
    os.chmod(path, 0o644)
    with pytest.raises(security.CredentialsError, match="chmod 600"):
        security.load_credentials({"INSPECTION_CREDENTIALS_FILE": str(path)})


def test_malformed_credentials_file_does_not_echo_secrets(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"username": "", "password": "hunter2"}')
    os.chmod(path, 0o600)
    with pytest.raises(security.CredentialsError, match="username") as refused:
        security.read_credentials_file(path)
    assert "hunter2" not in str(refused.value)


def test_tls_credentials_name_the_ca_file(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    creds = security.ensure_credentials_files(tmp_path, "SCRAM-SHA-512", "SASL_SSL", ca)["camera"]
    options = security.kafka_client_options(creds)
    assert options["security_protocol"] == "SASL_SSL" and options["ssl_cafile"] == str(ca)
    assert options["sasl_mechanism"] == "SCRAM-SHA-512" and options["ssl_check_hostname"] is True


def test_redis_acl_rules_grant_reads_only_to_readers() -> None:
    rules = security.redis_acl_rules("kpk")
    assert set(rules) == {"admin", "operator", "inference", "control", "monitor"}
    for reader in ("operator", "inference", "monitor"):
        assert "+@write" not in rules[reader] and "%R~kpk:*" in rules[reader]
    assert "+@write" in rules["control"] and "~kpk:*" in rules["control"]


def test_acl_table_follows_the_configured_names() -> None:
    topics = TopicsConfig(frames="f", control="c", results="r", events="e", dead_letter="d")
    acls = security.kafka_acls(topics, {"inference": "g-infer", "control": "g-control"})
    granted = {(a.principal, a.resource_pattern.resource_name, a.operation.name) for a in acls}
    assert ("User:camera", "f", "WRITE") in granted and ("User:inference", "g-infer", "READ") in granted
    assert ("User:inference", "inspection-infer-", "WRITE") in granted
    assert not any(principal == "User:camera" and name != "f" for principal, name, _ in granted)
    assert not any(name == "c" and op == "READ" and p != "User:control" for p, name, op in granted)


# ---------------------------------------------------------------------------------- TLS, restarts, mixing
def test_tls_stack_serves_sasl_ssl_and_survives_a_restart(tmp_path: Path, free_ports) -> None:
    """`security.tls`: SASL_SSL against the stack's own certificate; users and ACLs outlive a restart."""
    kafka, controller, redis_port, prometheus = free_ports(4)
    config = StackConfig(kafka_port=kafka, kafka_controller_port=controller, redis_port=redis_port,
                         prometheus_port=prometheus, state_dir=tmp_path / "tls-stack",
                         security=SecurityConfig(enabled=True, tls=True, mechanism="SCRAM-SHA-512"))
    stack = LocalStack(config, TopicsConfig())
    try:
        stack.up()
        camera = stack.credentials("camera")
        assert camera.security_protocol == "SASL_SSL" and camera.mechanism == "SCRAM-SHA-512"
        assert camera.ssl_cafile == stack.state_dir / "tls" / "cert.pem"
        assert (stack.state_dir / "tls" / "keystore.pem").stat().st_mode & 0o777 == 0o600
        key = _send(stack, "camera", stack.topics.frames)
        _refused_send(stack, "camera", stack.topics.control)

        stack.down()
        assert set(stack.up()["started"]) >= {"kafka", "redis"}
        consumer = _consumer(stack, "inference", GROUPS["inference"], [stack.topics.frames])
        try:
            assert any(r.key == key for r in _poll_until(consumer, key))
        finally:
            consumer.close()
    finally:
        stack.down(wipe=True)
    assert not (tmp_path / "tls-stack").exists()


def test_auth_on_refuses_kafka_data_formatted_without_auth(tmp_path: Path, free_ports) -> None:
    """Such data has no admin user (SCRAM users are bootstrapped at format time): say so, start nothing."""
    kafka, controller, redis_port, prometheus = free_ports(4)
    config = StackConfig(kafka_port=kafka, kafka_controller_port=controller, redis_port=redis_port,
                         prometheus_port=prometheus, state_dir=tmp_path / "old",
                         security=SecurityConfig(enabled=True))
    data = config.state_dir / "kafka" / "data"
    data.mkdir(parents=True)
    (data / "meta.properties").write_text("version=1\n")  # what an auth-off format leaves, for this check
    stack = LocalStack(config)
    with pytest.raises(StackError, match="formatted without auth"):
        stack.up()
    assert not any(server["running"] for server in stack.status()["servers"].values())


# ------------------------------------------------------------------------- workers with auth on
def test_workers_run_end_to_end_as_their_roles(auth_stack: LocalStack, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The real worker processes on the auth-on stack, each with only its role's credentials (handed over
    through the environment): an operator adds a category, a camera publishes, results come back."""
    from pipeline.data.datasets import labeled_test_images, write_synthetic_category
    from schemas.messages import AddCategory, EventKind
    from tools.client import collect_results, send_commands, wait_for_outcomes
    from tools.processes import spawn_worker, wait_for_store_version
    from tools.simulator import frame_of

    data = tmp_path / "data"
    write_synthetic_category(data, "brick", "brick", n_train=16, n_test_good=3, n_test_defect=3, size=160)
    bootstrap, redis_url, logs = auth_stack.config.bootstrap_servers, auth_stack.config.redis_url, tmp_path / "logs"
    workers = [spawn_worker(kind, f"auth-{kind}", bootstrap, redis_url, logs, threads=1,
                            env=security.credentials_env(auth_stack.state_dir, role),
                            extra_args=("--training-root", str(data)) if kind == "control" else ())
               for kind, role in (("control", "control"), ("infer", "inference"))]
    try:
        monkeypatch.setenv(security.CREDENTIALS_FILE_ENV, str(security.credentials_file(auth_stack.state_dir, "operator")))
        command = AddCategory(category="brick", train_dir=str(data / "brick" / "train" / "good"), expert="patchcore")
        outcome = wait_for_outcomes(bootstrap, auth_stack.topics, send_commands(bootstrap, auth_stack.topics, [command]),
                                    300)[command.command_id]
        assert outcome.kind == EventKind.FINISHED, f"{outcome.message}\n{workers[0].log_tail()}"
        wait_for_store_version(workers[1:], outcome.store_version)

        frames = [frame_of(item, "auth-cam", with_ground_truth=False) for item in labeled_test_images(data, "brick")]
        camera = _producer(auth_stack, "camera")
        for frame in frames:
            send_record(camera, auth_stack.topics.frames, frame.to_record())
        camera.flush()
        camera.close()
        results, duplicates = collect_results(bootstrap, auth_stack.topics, [f.frame_id for f in frames], 180)
        assert len(results) == len(frames) and duplicates == 0, workers[1].log_tail()
        assert all(r.category == "brick" for r in results.values())
    finally:
        for worker in workers:
            worker.stop()
