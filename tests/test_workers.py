"""The pipeline end to end on the real local stack: worker processes, Kafka topics, the Redis store.

One production line per module: a control worker and an inference worker (real subprocesses), a task
`brick` added through the control topic, frames published like a camera would.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import urllib.parse
from collections import Counter
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pipeline.data.datasets import labeled_test_images, write_synthetic_category
from pipeline.features.imaging import encode_png
from pipeline.core.store import KnowledgeStore
from schemas.config import TopicsConfig
from schemas.messages import (
    AddCategory,
    DeadLetterReason,
    Decision,
    EventKind,
    Frame,
    InspectionResult,
    Record,
    RemoveCategory,
    RollbackCategory,
    SetThreshold,
    TrainingEvent,
)
from tools.client import (
    collect_results,
    read_dead_letters,
    read_events,
    seconds_to_next_result,
    send_commands,
    wait_for_outcomes,
)
from workers.kafka_io import make_producer, send_record
from tools.simulator import CameraPartitions
from tools.processes import WorkerProcess, spawn_worker, wait_for_store_version, wait_until
from tools.simulator import frame_of
from tools.stack import LocalStack

pytestmark = pytest.mark.integration
MAX_FRAME_BYTES = 1_000_000  # the inference worker's own limit, below the topic's, to test oversize frames
COMMAND_TIMEOUT_S = 15  # the line's control worker: commands that train nothing are quick
HANGS, DIES_BEFORE_COMMIT = "hangs", "dies-before-commit"  # categories whose commands the control worker faults on


@dataclass
class Line:
    stack: LocalStack
    topics: TopicsConfig
    data: Path
    redis_url: str
    log_dir: Path
    control: WorkerProcess
    inference: list[WorkerProcess]

    @property
    def bootstrap(self) -> str:
        return self.stack.config.bootstrap_servers

    @property
    def store(self) -> KnowledgeStore:
        return KnowledgeStore.from_url(self.redis_url)

    def spawn_inference(self, name: str, *extra_args: str) -> WorkerProcess:
        worker = spawn_worker("infer", name, self.bootstrap, self.redis_url, self.log_dir, threads=1,
                              extra_args=("--max-frame-bytes", str(MAX_FRAME_BYTES), "--max-wait-ms", "20", *extra_args))
        self.stack.register_metrics_target(name, f"127.0.0.1:{worker.metrics_port}")
        self.inference.append(worker)
        return worker

    def command(self, *commands, timeout_s: float = 300):
        ids = send_commands(self.bootstrap, self.topics, commands)
        outcomes = wait_for_outcomes(self.bootstrap, self.topics, ids, timeout_s)
        return [outcomes[i] for i in ids]

    def inspect(self, frames: list[Frame], timeout_s: float = 120) -> dict[str, InspectionResult]:
        producer = make_producer(self.bootstrap, self.topics, client_id="test-camera")
        for frame in frames:
            send_record(producer, self.topics.frames, frame.to_record())
        producer.flush()
        producer.close()
        results, _ = collect_results(self.bootstrap, self.topics, [f.frame_id for f in frames], timeout_s)
        assert len(results) == len(frames), f"missing results; worker log:\n{self.inference[-1].log_tail()}"
        return results


def camera_frames(data: Path, category: str, camera: str = "cam-test") -> list[Frame]:
    return [frame_of(item, camera, with_ground_truth=True) for item in labeled_test_images(data, category)]


def task_blob_hashes(redis_url: str, category: str) -> dict[str, str]:
    """sha256 of the raw Redis values of one task's blobs, read directly (not through the store)."""
    client = redis.Redis.from_url(redis_url)
    entry = KnowledgeStore(client).manifest().tasks[category]
    return {kind: hashlib.sha256(client.get(f"kpk:blob:{digest}")).hexdigest() for kind, digest in entry.blobs.items()}


@pytest.fixture(scope="module")
def line(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("line-data")
    for texture in ("brick", "grass", "gravel"):
        write_synthetic_category(data, texture, texture, n_train=24, n_test_good=6, n_test_defect=6, size=192)
    # Database 1: the store tests flush database 0.
    redis_url = stack.config.redis_url.rsplit("/", 1)[0] + "/1"
    redis.Redis.from_url(redis_url).flushdb()
    log_dir = stack.state_dir / "worker-logs"
    control = spawn_worker("control", "control-test", stack.config.bootstrap_servers, redis_url, log_dir, threads=1,
                           extra_args=("--training-root", str(data), "--command-timeout-s", str(COMMAND_TIMEOUT_S),
                                       "--fault-hang-category", HANGS,
                                       "--fault-exit-before-commit-category", DIES_BEFORE_COMMIT))
    line = Line(stack, TopicsConfig(), data, redis_url, log_dir, control, [])
    line.spawn_inference("infer-a")
    try:
        [event] = line.command(AddCategory(category="brick", train_dir=str(data / "brick" / "train" / "good"),
                                          expert="patchcore"))
        assert event.kind == EventKind.FINISHED, event.message
        wait_for_store_version(line.inference, event.store_version)
        yield line
    finally:
        for worker in [control, *line.inference]:
            worker.stop()
            stack.unregister_metrics_target(worker.name)


def test_every_frame_gets_a_full_result(line: Line):
    frames = camera_frames(line.data, "brick")
    results = line.inspect(frames)
    for frame in frames:
        result = results[frame.frame_id]
        assert result.category == "brick" and result.expert == "patchcore"
        assert result.camera_id == frame.camera_id and result.store_version >= 1
        assert result.decision in (Decision.OK, Decision.DEFECTIVE)
        assert result.threshold > 0 and result.score_raw is not None
        anomaly_map = Image.open(io.BytesIO(result.anomaly_map_png))
        width, height = Image.open(io.BytesIO(frame.image)).size
        assert anomaly_map.mode == "L" and anomaly_map.size == (width, height)
        assert all(0 <= b.x0 < b.x1 <= width and 0 <= b.y0 < b.y1 <= height for b in result.boxes)
        assert result.latency.end_to_end_ms > 0 and result.latency.features_ms > 0
    normal = [results[f.frame_id].score_raw for f in frames if not f.ground_truth.is_anomalous]
    defective = [results[f.frame_id].score_raw for f in frames if f.ground_truth.is_anomalous]
    assert np.mean(defective) > np.mean(normal)


def test_adding_a_category_leaves_the_old_one_byte_identical(line: Line):
    brick_frames = camera_frames(line.data, "brick")
    before_scores = {f.ground_truth.source: r.score_raw for f, r in _inspected(line, brick_frames)}
    before_hashes = task_blob_hashes(line.redis_url, "brick")
    before_entry = line.store.manifest().tasks["brick"]

    with _PollWatch(line.control) as watch:  # training runs off the poll loop: the consumer stays in its group
        [event] = line.command(AddCategory(category="gravel", train_dir=str(line.data / "gravel" / "train" / "good"),
                                          expert="patchcore"))
    assert event.kind == EventKind.FINISHED, event.message
    assert watch.busy_samples >= 3 and watch.worst_silence_s < 5.0, vars(watch)
    wait_for_store_version(line.inference, event.store_version)  # picked up live, no restart

    assert task_blob_hashes(line.redis_url, "brick") == before_hashes
    assert line.store.manifest().tasks["brick"] == before_entry
    after = _inspected(line, camera_frames(line.data, "brick", camera="cam-again"))
    for frame, result in after:
        assert result.category == "brick"
        assert result.score_raw == pytest.approx(before_scores[frame.ground_truth.source], rel=1e-5)
    gravel = _inspected(line, camera_frames(line.data, "gravel"))
    assert all(r.category == "gravel" and r.store_version >= event.store_version for _, r in gravel)


def test_unknown_products_are_rejected_and_known_ones_routed(line: Line):
    """Frames of a product no task knows come back unknown; frames of every known product, defective ones
    included, go to their own task (gravel was added by the test before). Grass is the unknown product:
    seen from a grass task, gravel starts only 1.13x beyond grass's farthest calibration frame, inside the
    1.15x slack that defects of a known product need, so that pair cannot be told apart in that direction;
    seen from gravel, grass starts at 1.2x, like the other products measured (docs/architecture.md)."""
    results = _inspected(line, camera_frames(line.data, "grass"))
    unknown = [r for _, r in results if r.decision == Decision.UNKNOWN]
    assert len(unknown) >= 0.9 * len(results)
    assert all(r.category is None and r.anomaly_map_png is None for r in unknown)
    for product in ("brick", "gravel"):
        known = _inspected(line, camera_frames(line.data, product, camera=f"cam-{product}"))
        routed = [r.category == product for _, r in known]
        assert any(f.ground_truth.is_anomalous for f, _ in known)  # defective frames are in the stream
        assert np.mean(routed) >= 0.95, (product, [r.task_distance for _, r in known])


def test_bad_frames_are_dead_lettered_and_the_stream_goes_on(line: Line):
    good = camera_frames(line.data, "brick")[0]
    jpeg = _jpeg_bytes(line.data)
    bad = {
        "truncated": (Frame(camera_id="cam-bad", content_type="image/jpeg", image=jpeg[: len(jpeg) // 2]), DeadLetterReason.CORRUPT_IMAGE),
        "not-image": (Frame(camera_id="cam-bad", content_type="image/png", image=b"GIF89a not what it claims"), DeadLetterReason.NOT_AN_IMAGE),
        "oversize": (Frame(camera_id="cam-bad", content_type="image/png",
                           image=encode_png(np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8))),
                     DeadLetterReason.OVERSIZE),
    }
    assert len(bad["oversize"][0].image) > MAX_FRAME_BYTES
    wrong_version = Record(b"cam-bad", jpeg, [("schema", b"inspection.frame"), ("schema_version", b"99"), ("frame_id", b"v99-frame")])
    no_headers = Record(b"cam-bad", jpeg, [("frame_id", b"headerless-frame")])

    producer = make_producer(line.bootstrap, line.topics, client_id="test-bad-camera")
    for frame, _ in bad.values():
        send_record(producer, line.topics.frames, frame.to_record())
    send_record(producer, line.topics.frames, wrong_version)
    send_record(producer, line.topics.frames, no_headers)
    producer.flush()
    producer.close()
    results = line.inspect([good])  # sent after the bad ones on the same partition: the worker got past them
    assert results[good.frame_id].category == "brick"

    expected = {frame.frame_id: reason for frame, reason in bad.values()}
    expected.update({"v99-frame": DeadLetterReason.WRONG_SCHEMA, "headerless-frame": DeadLetterReason.WRONG_SCHEMA})
    letters = read_dead_letters(line.bootstrap, line.topics, 30, until=lambda ls: set(expected) <= {l.frame_id for l in ls})
    by_frame = {letter.frame_id: letter for letter in letters}
    for frame_id, reason in expected.items():
        assert by_frame[frame_id].reason == reason, by_frame[frame_id].detail
    assert by_frame[bad["truncated"][0].frame_id].value == bad["truncated"][0].image  # original bytes kept
    assert all(worker.alive() for worker in line.inference)


def test_a_frame_too_large_for_a_whole_dead_letter_does_not_stop_its_partition(line: Line):
    """15 MB of corrupt bytes: its dead letter would be 20 MB in base64, over the topic's limit, so it
    carries the size and sha256 instead; the good frames behind it on the same partition are answered."""
    good = camera_frames(line.data, "brick")[:4]
    huge = np.random.default_rng(1).integers(0, 255, 15_000_000, dtype=np.uint8).tobytes()
    poison = Frame(camera_id=good[0].camera_id, content_type="image/png", image=b"\x89PNG\r\n\x1a\n" + huge)
    producer = make_producer(line.bootstrap, line.topics, client_id="test-poison-camera")
    send_record(producer, line.topics.frames, poison.to_record())
    producer.flush()
    producer.close()
    results = line.inspect(good, timeout_s=90)  # same camera, so the same partition, behind the poison
    assert set(results) == {frame.frame_id for frame in good}
    letters = read_dead_letters(line.bootstrap, line.topics, 30, until=lambda ls: poison.frame_id in {l.frame_id for l in ls})
    [letter] = [l for l in letters if l.frame_id == poison.frame_id]
    assert letter.reason == DeadLetterReason.OVERSIZE and letter.value is None and letter.dropped == ["value"]
    assert letter.value_bytes == len(poison.image) and letter.value_sha256 == hashlib.sha256(poison.image).hexdigest()


def test_bad_control_commands_fail_with_a_reason_and_the_worker_goes_on(line: Line):
    producer = make_producer(line.bootstrap, line.topics, client_id="test-operator")
    producer.send(line.topics.control, value=b'{"action": "launch_rockets"}').get(30)
    producer.close()
    missing, unknown = line.command(
        AddCategory(category="tiles", train_dir=str(line.data / "no-such-folder")),
        RemoveCategory(category="never-added"),
    )
    assert missing.kind == EventKind.FAILED and "not a readable folder" in missing.message
    assert unknown.kind == EventKind.FAILED and "unknown category" in unknown.message
    letters = read_dead_letters(line.bootstrap, line.topics, 30,
                                until=lambda ls: any(l.reason == DeadLetterReason.BAD_COMMAND for l in ls))
    assert any(l.reason == DeadLetterReason.BAD_COMMAND and b"launch_rockets" in l.value for l in letters)

    [done] = line.command(SetThreshold(category="brick", false_alarm_rate=0.2))  # still serving commands
    assert done.kind == EventKind.FINISHED and done.details["threshold"] > 0
    assert line.control.alive()


def test_adds_train_only_on_folders_under_the_training_root(line: Line):
    escape = line.data / "looks-inside"
    if not escape.exists():
        escape.symlink_to("/etc", target_is_directory=True)  # a readable folder, but not a training folder
    outside, linked, relative = line.command(
        AddCategory(category="etc", train_dir="/etc"),
        AddCategory(category="etc", train_dir=str(escape)),
        AddCategory(category="etc", train_dir="brick/train/good"),
    )
    assert outside.kind == linked.kind == relative.kind == EventKind.FAILED
    assert "outside the training root" in outside.message and "outside the training root" in linked.message
    assert "relative" in relative.message
    assert "etc" not in line.store.manifest().tasks


def test_an_add_the_store_could_not_hold_is_refused_with_its_sizes(line: Line):
    client = redis.Redis.from_url(line.redis_url)
    configured = client.config_get("maxmemory")["maxmemory"]
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", str(int(used / 0.95)))  # past the 90% an add may fill
    try:
        [event] = line.command(AddCategory(category="grass", train_dir=str(line.data / "grass" / "train" / "good"),
                                           expert="patchcore"))
    finally:
        client.config_set("maxmemory", configured)
    assert event.kind == EventKind.FAILED and "the store would not fit" in event.message, event.message
    assert "grass" not in line.store.manifest().tasks


# Raw documents an operator's tool might send; none may change the threshold, each is answered by id.
_BAD_THRESHOLDS = {
    "inf": b'"threshold": 1e309',
    "nan": b'"threshold": NaN',
    "negative": b'"threshold": -1.0',
    "zero far": b'"false_alarm_rate": 0',
    "far above range": b'"false_alarm_rate": 0.9',
    "nan far": b'"false_alarm_rate": NaN',
}


def test_out_of_range_thresholds_fail_with_their_command_id(line: Line):
    before = line.store.manifest().tasks["brick"]
    ids = {}
    producer = make_producer(line.bootstrap, line.topics, client_id="test-operator")
    for name, field in _BAD_THRESHOLDS.items():
        ids[name] = f"bad-threshold-{name.replace(' ', '-')}"
        document = b'{"action": "set_threshold", "category": "brick", "command_id": "%s", %s}' % (ids[name].encode(), field)
        producer.send(line.topics.control, value=document).get(30)
    producer.close()
    outcomes = wait_for_outcomes(line.bootstrap, line.topics, list(ids.values()), 120)
    for name, command_id in ids.items():
        assert outcomes[command_id].kind == EventKind.FAILED, name
        assert outcomes[command_id].action == "set_threshold" and outcomes[command_id].category == "brick"
    assert line.store.manifest().tasks["brick"] == before  # nothing changed
    assert line.control.alive()


def test_a_redelivered_command_is_answered_not_redone(line: Line):
    """The worker died after publishing and before committing: the command comes again, same id."""
    command = SetThreshold(category="brick", false_alarm_rate=0.05)
    [first] = line.command(command)
    assert first.kind == EventKind.FINISHED
    version = line.store.version()
    second = _outcome_after(line, command, first)
    assert second.kind == EventKind.FINISHED and second.store_version == first.store_version
    assert second.details.get("redelivered") is True
    assert line.store.version() == version  # not carried out again


def _final_events(line: Line, command_id: str) -> list[TrainingEvent]:
    """Every final event of `command_id` a read_committed reader sees, once the topic has been read to its end."""
    return [e for e in read_events(line.bootstrap, line.topics, 10)
            if e.command_id == command_id and e.kind in (EventKind.FINISHED, EventKind.FAILED)]


def test_a_worker_killed_before_its_final_commit_answers_the_command_once(line: Line):
    """Its final event was sent inside the transaction, not committed: a read_committed reader never sees
    it, the restarted worker gets the command again and answers it; one final event in all."""
    command = RemoveCategory(category=DIES_BEFORE_COMMIT)
    [outcome] = line.command(command, timeout_s=180)
    assert outcome.kind == EventKind.FAILED and "unknown category" in outcome.message
    assert "fault injection: exiting before the final commit" in line.control.log_tail(100_000)
    assert len(_final_events(line, command.command_id)) == 1
    [done] = line.command(SetThreshold(category="brick", false_alarm_rate=0.05), timeout_s=120)
    assert done.kind == EventKind.FINISHED and line.control.alive()


def test_a_hung_command_is_answered_once_and_later_commands_go_on(line: Line):
    hung, after = line.command(SetThreshold(category=HANGS, false_alarm_rate=0.05), RemoveCategory(category="never-added"),
                               timeout_s=180)
    assert hung.kind == EventKind.FAILED and f"timed out after {COMMAND_TIMEOUT_S:.0f} s" in hung.message
    assert after.kind == EventKind.FAILED and "unknown category" in after.message  # answered after the restart
    assert len(_final_events(line, hung.command_id)) == 1 and line.control.alive()


def test_rollback_serves_an_earlier_task_version_byte_identical(line: Line):
    history = line.store.history("brick")
    assert len(history) >= 2  # added, then recalibrated by the tests above
    first = history[0]
    [event] = line.command(RollbackCategory(category="brick", task_version=first.task_version))
    assert event.kind == EventKind.FINISHED, event.message
    current = line.store.manifest().tasks["brick"]
    assert current.blobs == first.blobs and current.restored_from == first.task_version
    wait_for_store_version(line.inference, event.store_version)
    [bad] = line.command(RollbackCategory(category="brick", task_version=10_000))
    assert bad.kind == EventKind.FAILED and bad.command_id


def test_worker_sigkill_mid_stream_gives_exactly_one_result_per_frame(line: Line):
    frames = _numbered_frames(line, "kill", 48)
    victim = line.inference[0]
    publisher = _stream_until_results(line, frames, 8.0, victim)
    victim.kill()  # SIGKILL: its open transaction is aborted by the broker after its timeout
    replacement = line.spawn_inference("infer-b")
    line.inference.remove(victim)
    publisher.join()
    results, duplicates = collect_results(line.bootstrap, line.topics, [f.frame_id for f in frames], 180)
    missing = sorted({f.frame_id for f in frames} - set(results))
    assert not missing, f"lost frames {missing}; replacement log:\n{replacement.log_tail()}"
    assert duplicates == 0, f"{duplicates} frames got two committed results"


def test_a_commit_done_on_the_broker_while_its_wait_timed_out_gives_no_duplicate(line: Line):
    """The first commit completes on the broker, then its step sleeps past the wait's bound (a fault
    hook): the worker gives the producer up as stuck, and must resume from the committed offsets, not
    read the batch again."""
    for worker in list(line.inference):  # the worker under test alone serves the stream
        worker.stop()
        line.inference.remove(worker)
    worker = line.spawn_inference("slow-commit", "--transaction-timeout-ms", "1000",
                                  "--fault-sleep-after-first-commit-s", "8")
    wait_for_store_version([worker], line.store.version())
    frames = _numbered_frames(line, "slow-commit", 16)
    _publish_slowly(line, frames, 1000.0)
    results, duplicates = collect_results(line.bootstrap, line.topics, [f.frame_id for f in frames], 120)
    assert len(results) == len(frames), worker.log_tail()
    assert "failed (TimeoutError" in worker.log_path.read_text(), "the fault hook did not fire"
    assert duplicates == 0, f"{duplicates} frames got two committed results"


@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
def test_pipelined_worker_sigkilled_with_every_stage_busy_loses_nothing(line: Line, delivery: str):
    """Frames published in one burst keep the pipeline full (a batch decoding, one computing, one being
    delivered) when the worker is killed: exactly-once gives one result per frame, at-least-once may
    repeat a result but loses none."""
    for worker in list(line.inference):  # the mode under test alone serves the stream
        worker.stop()
        line.inference.remove(worker)
    victim = line.spawn_inference(f"pipe-{delivery}-a", "--delivery", delivery, "--max-batch-size", "4")
    wait_for_store_version([victim], line.store.version())
    frames = _numbered_frames(line, f"pipe-{delivery}", 40)
    publisher = _stream_until_results(line, frames, 1000.0, victim)
    victim.kill()
    line.inference.remove(victim)
    replacement = line.spawn_inference(f"pipe-{delivery}-b", "--delivery", delivery)
    publisher.join()
    results, duplicates = collect_results(line.bootstrap, line.topics, [f.frame_id for f in frames], 180)
    missing = sorted({f.frame_id for f in frames} - set(results))
    assert not missing, f"lost frames {missing}; replacement log:\n{replacement.log_tail()}"
    if delivery == "exactly_once":
        assert duplicates == 0, f"{duplicates} frames got two committed results"
    replacement.stop()
    line.inference.remove(replacement)
    line.spawn_inference("infer-after-pipe")  # the default worker for the tests that follow
    wait_for_store_version(line.inference, line.store.version())


def test_broker_sigkill_and_restart_mid_stream_gives_exactly_one_result_per_frame(line: Line):
    frames = _numbered_frames(line, "broker", 48)
    before, after = frames[:40], frames[40:]  # `after` is sent once the broker is back: there is work then
    worker = line.inference[0]
    publisher = _stream_until_results(line, before, 4.0, worker)
    assert line.stack.kill("kafka")
    time.sleep(3)
    line.stack.up()  # returns once the broker answers again
    late = threading.Thread(target=_publish_slowly, args=(line, after, 8.0))
    late.start()
    resumed_after = seconds_to_next_result(line.bootstrap, line.topics, 60)
    publisher.join()
    late.join()
    results, duplicates = collect_results(line.bootstrap, line.topics, [f.frame_id for f in frames], 180)
    missing = sorted({f.frame_id for f in frames} - set(results))
    assert not missing, f"lost frames {missing}; worker log:\n{worker.log_tail()}"
    assert duplicates == 0
    assert resumed_after <= 10.0, f"results resumed {resumed_after:.1f}s after the broker was back"
    assert all(w.alive() for w in line.inference)


def test_redis_restart_keeps_serving(line: Line):
    assert line.stack.kill("redis")
    results = line.inspect(camera_frames(line.data, "brick", camera="cam-no-redis"))  # served from memory
    assert all(r.category == "brick" for r in results.values())
    line.stack.up()
    assert "brick" in line.store.manifest().tasks  # AOF kept the store
    assert all(w.alive() for w in [line.control, *line.inference])


def test_four_cameras_spread_evenly_over_two_workers(line: Line):
    if len(line.inference) < 2:
        line.spawn_inference("infer-c")
    wait_until(lambda: all(_series(w, "inspection_consumer_lag") == 2 for w in line.inference), 120,
               what="two workers with two partitions each")
    partition_of = CameraPartitions(line.topics.frame_partitions)
    frames = [f.model_copy(update={"camera_id": f"line-cam-{i % 4}"}) for i, f in
              enumerate(_numbered_frames(line, "balance", 48))]
    producer = make_producer(line.bootstrap, line.topics, client_id="test-cameras")
    for frame in frames:
        send_record(producer, line.topics.frames, frame.to_record(), partition_of(frame.camera_id))
    producer.flush()
    producer.close()
    results, _ = collect_results(line.bootstrap, line.topics, [f.frame_id for f in frames], 240)
    assert len(results) == len(frames)
    shares = Counter(r.worker_id for r in results.values())
    assert len(shares) == 2 and all(0.4 <= n / len(frames) <= 0.6 for n in shares.values()), shares


def test_a_camera_cannot_choose_a_metric_label(line: Line):
    """Ground truth naming no task is counted as `other`: the label values stay the store's categories."""
    frame = camera_frames(line.data, "brick")[0]
    made_up = frame.model_copy(update={"frame_id": "made-up-truth",
                                       "ground_truth": frame.ground_truth.model_copy(update={"category": "cam-says-xyz"})})
    line.inspect([made_up])
    categories = {labels["category"] for worker in line.inference if worker.alive()
                  for labels, _ in worker.samples("inspection_labelled_frames_total")}
    assert "cam-says-xyz" not in categories and "other" in categories, categories


def test_metrics_reach_prometheus(line: Line):
    if line.stack.prometheus_url is None:
        pytest.skip("prometheus is not installed")
    query = urllib.parse.urlencode({"query": "sum(inspection_frames_in_total)"})

    def value() -> float:
        with urllib.request.urlopen(f"{line.stack.prometheus_url}/api/v1/query?{query}", timeout=5) as response:
            data = json.load(response)["data"]["result"]
        return float(data[0]["value"][1]) if data else 0.0

    wait_until(lambda: value() > 0, 60, interval_s=1, what="Prometheus to scrape a worker")
    for query in ("count(inspection_stage_seconds_bucket)",
                  'sum(inspection_labelled_frames_total{category="brick"})',  # the test frames carry truth
                  'inspection_false_alarm_target_ratio{category="brick"}',
                  'count(inspection_calibrated_score_bucket{category="brick"})',
                  "inspection_last_poll_timestamp_seconds"):
        encoded = urllib.parse.urlencode({"query": query})
        with urllib.request.urlopen(f"{line.stack.prometheus_url}/api/v1/query?{encoded}", timeout=5) as response:
            assert json.load(response)["data"]["result"], f"{query} not scraped"


# ------------------------------------------------------------------------------------------ helpers
def _inspected(line: Line, frames: list[Frame]) -> list[tuple[Frame, InspectionResult]]:
    results = line.inspect(frames)
    return [(f, results[f.frame_id]) for f in frames]


class _PollWatch:
    """Samples a worker's liveness gauge while it is busy with a command: the largest time since its
    last poll returned."""

    def __init__(self, worker: WorkerProcess):
        self.worker = worker
        self.busy_samples = 0
        self.worst_silence_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "_PollWatch":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            if self.worker.metric("inspection_control_busy") == 1:
                last_poll = self.worker.metric("inspection_last_poll_timestamp_seconds") or 0
                self.busy_samples += 1
                self.worst_silence_s = max(self.worst_silence_s, time.time() - last_poll)


def _numbered_frames(line: Line, prefix: str, count: int) -> list[Frame]:
    frames = camera_frames(line.data, "brick")
    return [frames[i % len(frames)].model_copy(update={"frame_id": f"{prefix}-{i}", "camera_id": f"cam-{i % 4}"})
            for i in range(count)]


def _outcome_after(line: Line, command, first) -> TrainingEvent:
    """Send `command` again (same id) and wait for its next final event."""
    send_commands(line.bootstrap, line.topics, [command])

    def second(events):
        return [e for e in events if e.command_id == command.command_id and e.kind in (EventKind.FINISHED, EventKind.FAILED)
                and e.event_id != first.event_id]

    found = second(read_events(line.bootstrap, line.topics, 120, until=lambda events: bool(second(events))))
    assert found, "the redelivered command got no answer"
    return found[0]


def _series(worker: WorkerProcess, name: str) -> int:
    """How many label sets `name` has on the worker's metrics page now."""
    try:
        with urllib.request.urlopen(worker.metrics_url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0
    return sum(1 for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


def _stream_until_results(line: Line, frames: list[Frame], rate: float, worker: WorkerProcess) -> threading.Thread:
    """Start publishing `frames` at `rate` in the background; return once `worker` has produced 3 results."""
    produced_before = worker.metric("inspection_results_out_total") or 0
    publisher = threading.Thread(target=_publish_slowly, args=(line, frames, rate))
    publisher.start()
    wait_until(lambda: (worker.metric("inspection_results_out_total") or 0) >= produced_before + 3, 120,
               what=f"{worker.name} to produce results")
    return publisher


def _publish_slowly(line: Line, frames: list[Frame], rate: float) -> None:
    producer = make_producer(line.bootstrap, line.topics, client_id="test-slow-camera")
    for frame in frames:
        send_record(producer, line.topics.frames, frame.to_record())
        time.sleep(1 / rate)
    producer.flush()
    producer.close()


def _jpeg_bytes(data: Path) -> bytes:
    from pipeline.features.imaging import decode_image, encode_jpeg

    item = labeled_test_images(data, "brick")[0]
    return encode_jpeg(decode_image(item.path.read_bytes(), 10**8))
