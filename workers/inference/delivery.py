"""A batch's delivery, on the delivery thread, one batch at a time: exactly-once, its results, dead letters
and frame offsets in one transaction (TransactionSlot); at-least-once, sent and flushed, then its offsets
committed on the poll thread when the delivery is settled. A batch is handed over only once the one
before it is settled; a failed delivery drops every batch not yet delivered, to be read again."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from kafka import KafkaProducer
from kafka.errors import KafkaError

from schemas.config import InferenceConfig, TopicsConfig
from schemas.messages import Record
from workers.inference.polling import FramePoller, PolledBatch, next_offsets
from workers.kafka_io import make_producer, make_transactional_producer, send_record, transaction_step_timeout_ms
from workers.liveness import PollWatchdog
from workers.metrics import InferenceMetrics
from workers.security import TRANSACTIONAL_ID_PREFIXES
from workers.transactions import TransactionFailed, TransactionSlot

log = logging.getLogger(__name__)
TRANSACTIONAL_ID_PREFIX = TRANSACTIONAL_ID_PREFIXES["inference"]  # what the ACLs admit (workers/security.py)


@dataclass
class _InFlight:
    batch: PolledBatch
    done: Future  # True: delivered (and, exactly-once, committed); False: to be read again


class BatchDelivery:
    def __init__(self, bootstrap: str, topics: TopicsConfig, config: InferenceConfig, metrics: InferenceMetrics,
                 poller: FramePoller, watchdog: PollWatchdog, worker_id: str, **client_options):
        self.config = config
        self.metrics = metrics
        self.poller = poller
        self.watchdog = watchdog
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delivery")
        self._in_flight: _InFlight | None = None
        self._fault_sleep_s = config.fault_sleep_after_first_commit_s
        # exactly-once: the slot's id is stable across restarts, so a new instance fences the old one and
        # aborts its transaction; at-least-once: a plain producer
        self.slot: TransactionSlot | None = None
        self.producer: KafkaProducer | None = None
        if self.transactional:
            self.slot = TransactionSlot(
                TRANSACTIONAL_ID_PREFIX + worker_id,
                lambda: make_transactional_producer(bootstrap, topics, TRANSACTIONAL_ID_PREFIX + worker_id,
                                                    config.transaction_timeout_ms, **client_options),
                step_timeout_s=transaction_step_timeout_ms(config.transaction_timeout_ms) / 1000,
                stuck_after_s=config.stuck_after_s,
                after_commit=self._fault_after_commit)
        else:
            self.producer = make_producer(bootstrap, topics, client_id=worker_id, **client_options)

    @property
    def transactional(self) -> bool:
        return self.config.delivery == "exactly_once"

    def start(self, batch: PolledBatch, outgoing: list[tuple[str, Record]]) -> None:
        """Hand a batch's outgoing records to the delivery thread (the batch before it is settled)."""
        self._in_flight = _InFlight(batch, self._thread.submit(self._deliver, outgoing, batch.records, batch.group))

    def settle(self, wait: bool = True, also_dropped: PolledBatch | None = None) -> bool:
        """Finish the delivery in flight (at-least-once: commit its offsets, on the poll thread). False
        when it failed: it, `also_dropped` and every batch polled after them are read again."""
        if self._in_flight is None or not (wait or self._in_flight.done.done()):
            return True
        delivery, self._in_flight = self._in_flight, None
        while True:
            try:
                delivered = delivery.done.result(timeout=1.0)  # ProducerFencedError propagates: stop
                break
            except FutureTimeout:
                self.watchdog.beat()  # alive: the delivery step is bounded by its own timeout
        if not delivered:
            self.poller.read_again(delivery.batch, *([also_dropped] if also_dropped else []))
            return False
        if not self.transactional:
            self.poller.commit(delivery.batch.records)
        return True

    def _deliver(self, outgoing: list[tuple[str, Record]], records: list, group) -> bool:
        """On the delivery thread: True once the batch is delivered, False when it must be read again."""
        if self.transactional:
            return self._deliver_in_transaction(outgoing, records, group)
        try:
            sent = [send_record(self.producer, topic, record) for topic, record in outgoing]
            # Results are on the broker before their frames' offsets are committed. Bounded: an unbounded
            # flush that never returns would hold the worker (its poll loop waits on this delivery).
            self.producer.flush(timeout=transaction_step_timeout_ms(self.config.transaction_timeout_ms) / 1000)
            for future in sent:  # flush only logs a send that failed for good: ask each one
                future.get(timeout=0)
            return True
        except KafkaError as exc:  # read again: at-least-once may repeat a result, never lose one
            log.warning("delivery of a batch of %d failed (%s: %s); its frames come again", len(records),
                        type(exc).__name__, exc)
            return False

    def _deliver_in_transaction(self, outgoing: list[tuple[str, Record]], records: list, group) -> bool:
        """Results, dead letters and the batch's offsets become visible together, or not at all (the
        slot bounds every step; ProducerFencedError and ProducerReplacementFailed stop the worker)."""
        try:
            self.slot.commit(outgoing, next_offsets(records), group)
        except TransactionFailed as exc:
            log.warning("transaction of a batch of %d failed (%s); aborted, its frames come again", len(records), exc)
            self.metrics.transactions.labels("aborted").inc()
            return False
        self.metrics.transactions.labels("committed").inc()
        return True

    def _fault_after_commit(self) -> None:
        if self._fault_sleep_s:  # fault injection (tests): a commit done on the broker whose wait overruns
            delay, self._fault_sleep_s = self._fault_sleep_s, 0.0
            time.sleep(delay)

    def drain(self) -> None:
        """Wait for the delivery thread's last step."""
        self._thread.shutdown(wait=True)

    def close(self) -> None:
        if self.slot is not None:
            self.slot.close()
        else:
            self.producer.close()
