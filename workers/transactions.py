"""One transactional producer slot: records and consumer offsets made visible together, or not at all.

Used by the inference worker (a batch's results, dead letters and frame offsets) and by the control
worker (a command's final event and its control offset). kafka-python waits for a transaction's steps
without a timeout; a broker that died mid-commit left a worker blocked for over a minute after the broker
was back. Each step therefore runs on the slot's own thread, bounded; one that overruns is given up with
its producer, and a new producer with the same transactional id fences the old one and aborts its open
transaction. Replacement itself is bounded too: past `stuck_after_s` it raises, so the worker exits and
its supervisor starts it afresh (the poll loop keeps beating its watchdog meanwhile, so the watchdog
cannot notice).

A failed transaction always costs its producer. kafka-python 3.0.12 keeps the offsets of a transactional
offset commit that the group coordinator refused (a stale generation after a rebalance) in its pending
set across the abort, and sends them again with the next transaction's offsets: the next batch then
commits the failed batch's offsets too, and that batch's frames are never answered (a fault soak lost
4-15 frames a run so). A fresh producer starts with an empty transaction state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from kafka import KafkaProducer, TopicPartition
from kafka.errors import KafkaError, ProducerFencedError
from kafka.structs import OffsetAndMetadata

from schemas.messages import Record
from workers.kafka_io import send_record

log = logging.getLogger(__name__)


class TransactionFailed(RuntimeError):
    """The transaction was aborted (or its producer replaced): nothing of it is visible."""


class ProducerReplacementFailed(RuntimeError):
    """The transaction producer could not be replaced in time: the worker stops for its supervisor."""


class TransactionSlot:
    """A stable transactional id and its current producer, every step bounded by `step_timeout_s`.

    `new_producer` makes a producer with transactions initialised (kafka_io.make_transactional_producer);
    ProducerFencedError propagates from `commit`: another instance owns the slot now, and this one must
    stop. `after_commit` runs on the slot's thread right after each commit (tests inject faults there)."""

    def __init__(self, name: str, new_producer: Callable[[], KafkaProducer], step_timeout_s: float,
                 stuck_after_s: float, after_commit: Callable[[], None] = lambda: None):
        self.name = name
        self._new_producer = new_producer
        self._step_timeout_s = step_timeout_s
        self._stuck_after_s = stuck_after_s
        self._after_commit = after_commit
        self._steps = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transaction")
        self.producer: KafkaProducer | None = new_producer()

    def commit(self, outgoing: Sequence[tuple[str, Record]],
               offsets: Mapping[TopicPartition, OffsetAndMetadata] | None = None, group=None,
               before_commit: Callable[[], None] = lambda: None) -> None:
        """`outgoing` (topic, record) pairs and, with `group` (the consumer's group metadata captured when
        the records were polled), the consumer `offsets`, in one transaction. Raises TransactionFailed
        after aborting it (or replacing the producer, when a step overran). `before_commit` runs once
        everything is sent, just before the commit (tests inject faults there)."""
        try:
            self._bounded(self.producer.begin_transaction)
            sent = [send_record(self.producer, topic, record) for topic, record in outgoing]
            # kafka-python may fail a record in its future (authorization, metadata) without raising, and
            # the commit would then succeed without it: every record is acknowledged before the offsets go
            self._bounded(self.producer.flush)
            for future in sent:
                future.get(timeout=0)
            if offsets:
                self._bounded(lambda: self.producer.send_offsets_to_transaction(dict(offsets), group))
            before_commit()
            self._bounded(self._commit_and_hook)
        except ProducerFencedError:
            raise
        except (KafkaError, FutureTimeout) as exc:
            if not isinstance(exc, FutureTimeout):
                self._try_abort()
            self._replace_producer()  # never reuse its transaction state (see the module's docstring)
            raise TransactionFailed(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close(timeout=5)
        self._steps.shutdown(wait=False)

    def _commit_and_hook(self) -> None:
        self.producer.commit_transaction()
        self._after_commit()

    def _bounded(self, step):
        """Run one transaction step on the slot's thread, waiting at most `step_timeout_s`."""
        return self._steps.submit(step).result(timeout=self._step_timeout_s)

    def _try_abort(self) -> None:
        """Abort at once where the broker answers (readers stop waiting for the transaction); the new
        producer's init aborts it anyway."""
        try:
            self._bounded(self.producer.abort_transaction)
        except (KafkaError, FutureTimeout) as exc:
            log.warning("abort failed (%s: %s)", type(exc).__name__, exc)

    def _replace_producer(self) -> None:
        """A fresh producer in the same slot: its init fences the old one and aborts its transaction."""
        log.info("starting a new producer for slot %s", self.name)
        stuck, self.producer = self.producer, None
        self._steps.shutdown(wait=False)  # its thread may stay blocked on the old producer; let it go
        self._steps = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transaction")
        threading.Thread(target=_close_replaced, args=(stuck,), daemon=True).start()
        give_up_at = time.monotonic() + self._stuck_after_s
        while self.producer is None:
            try:
                self.producer = self._new_producer()
            except KafkaError as exc:  # broker still away: try again, for a while
                if time.monotonic() >= give_up_at:
                    raise ProducerReplacementFailed(
                        f"no new producer for slot {self.name} within {self._stuck_after_s:.0f} s") from exc
                log.warning("new producer not ready (%s); retrying", exc)
                time.sleep(1)


def _close_replaced(producer: KafkaProducer) -> None:
    """Close a replaced producer for good, waiting out its undelivered records. kafka-python's close()
    flushes first and raises if records are still undelivered when its timeout ends, before it stops the
    producer's threads: a short timeout left a producer replaced while the broker was away with its I/O
    thread and sockets for the life of the process. Its records expire within its delivery timeout (bound
    to the transaction step), so a timeout past that one always reaches the stop."""
    try:
        producer.close(timeout=producer.config["delivery_timeout_ms"] / 1000 + 5)
    except KafkaError as exc:
        log.warning("replaced producer could not be closed (%s: %s)", type(exc).__name__, exc)


__all__ = ["ProducerReplacementFailed", "TransactionFailed", "TransactionSlot"]
