"""The inference worker's loop: follow the store, poll and decode the next batch, inspect the oldest ready
one, hand its results to delivery. Its parts: polling.py (consumer, batches, rebalances, rewinds),
results.py (decoded frames -> results and dead letters), delivery.py (transactions, offset commits),
store_following.py (store versions prepared beside the stream)."""

from __future__ import annotations

import logging
import threading
import time

from pipeline.core.inspector import Inspector
from pipeline.core.store import KnowledgeStore
from schemas.config import InferenceConfig, TopicsConfig
from workers.inference.delivery import BatchDelivery
from workers.inference.polling import FramePoller
from workers.inference.results import ResultBuilder
from workers.inference.store_following import StoreFollower
from workers.liveness import PollWatchdog
from workers.metrics import InferenceMetrics

log = logging.getLogger(__name__)


class InferenceWorker:
    def __init__(
        self,
        bootstrap: str,
        topics: TopicsConfig,
        config: InferenceConfig,
        inspector: Inspector,
        store: KnowledgeStore,
        metrics: InferenceMetrics,
        worker_id: str,
        **client_options,
    ):
        if config.max_frame_bytes > topics.whole_dead_letter_value_bytes:
            raise ValueError(f"max_frame_bytes={config.max_frame_bytes} is over {topics.whole_dead_letter_value_bytes}, "
                             f"the largest frame whose dead letter fits a record of {topics.max_message_bytes} bytes")
        self.topics = topics
        self.config = config
        self.inspector = inspector
        self.worker_id = worker_id
        self.watchdog = PollWatchdog(metrics, config.stuck_after_s)
        self.results = ResultBuilder(topics, config, inspector, metrics, worker_id)
        self.poller = FramePoller(bootstrap, topics, config, metrics, self.watchdog, worker_id, self.results.decode,
                                  self.transactional, **client_options)
        self.delivery = BatchDelivery(bootstrap, topics, config, metrics, self.poller, self.watchdog, worker_id,
                                      **client_options)
        self.store_follower = StoreFollower(inspector, store, metrics, config.store_poll_interval_s)

    @property
    def transactional(self) -> bool:
        return self.config.delivery == "exactly_once"

    def run(self, stop: threading.Event) -> None:
        log.info("worker %s consuming %s (%s)", self.worker_id, self.topics.frames, self.config.delivery)
        self.watchdog.start()
        try:
            while not stop.is_set():
                self.store_follower.follow()
                if not self.store_follower.read:
                    self._wait_for_store()
                    continue
                self._step()
                self.poller.update_lag()
            self.delivery.settle()  # the batch in flight is delivered; batches not yet inspected are read again later
        finally:
            self.watchdog.stop()
            self.poller.stop_decoding()
            self.delivery.drain()
            self.poller.close()
            self.delivery.close()

    def _step(self) -> None:
        """Poll the next batch (waiting only when none is ready) and start decoding it; then inspect the
        oldest ready batch and hand its results to the delivery thread."""
        poller, delivery = self.poller, self.delivery
        rebalances = poller.rebalances.count
        records = poller.poll_batch(wait=not poller.ready)
        if records:
            poller.ready.append(poller.prefetch(records, rebalances))
        if not poller.ready:
            delivery.settle(wait=False)
            return
        batch = poller.ready.popleft()
        if poller.gathered_across_a_rebalance(batch):
            # Gathered before a rebalance or under a membership lost since: read what is still ours again
            # from the committed offsets, under the new generation (the rest is another worker's now).
            log.info("batch of %d gathered across a rebalance or a lost membership; reading it again", len(batch.records))
            # the delivery in flight ends first (a failed one reads everything again itself): a commit landing
            # after the rewind below would leave the positions behind it
            if delivery.settle(also_dropped=batch):
                poller.read_again(batch)
            return
        outgoing = self.results.outgoing(batch.decoding)
        if not delivery.settle(also_dropped=batch):  # the batch before failed: this one must wait for it
            return
        delivery.start(batch, outgoing)

    def _wait_for_store(self) -> None:
        """Not polling while the store is unreadable at start: alive (the watchdog is told), not consuming."""
        self.watchdog.beat()
        time.sleep(self.config.store_poll_interval_s)
