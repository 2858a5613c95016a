"""Inference worker: frames topic -> micro-batches -> pipeline.Inspector -> results topic.

Delivery is exactly-once by default: a batch's results, its dead letters and its frames' offsets are
one Kafka transaction (a transactional producer per worker slot, offsets sent with the consumer's group
metadata so a stale member is fenced, KIP-447). A worker killed mid-batch leaves an open transaction
that the broker aborts after `transaction_timeout_ms` (at once if a worker starts in the same slot);
the frames are then read again from the committed offsets, so readers with isolation `read_committed`
see exactly one result per frame. `delivery="at_least_once"` instead produces, flushes and then commits
(cheaper; a crash between the two repeats a result, which consumers recognise by its key, the frame id).
Workers in one consumer group share the frames topic's partitions.

The loop is pipelined, one batch deep at each stage: while the model computes batch N, batch N + 1 is
decoded in a thread pool and batch N - 1's results are delivered on a delivery thread (its transaction,
or its send + flush). Offsets are committed only with (exactly-once) or after (at-least-once) the
batch's results, so the guarantee is the sequential loop's. Only the poll thread touches the consumer;
a batch is delivered only once the one before it is, and when a delivery fails or the group rebalances
every batch not yet delivered is dropped and read again from the earliest of their offsets. A new store
version is prepared beside the stream and swapped in between two batches.

Modules: worker.py (the loop), polling.py, results.py, delivery.py, store_following.py.
"""

from workers.inference.delivery import TRANSACTIONAL_ID_PREFIX, BatchDelivery
from workers.inference.polling import FramePoller, PolledBatch
from workers.inference.results import OTHER_CATEGORY, DecodedFrame, ResultBuilder
from workers.inference.store_following import StoreFollower
from workers.inference.worker import InferenceWorker

__all__ = ["OTHER_CATEGORY", "TRANSACTIONAL_ID_PREFIX", "BatchDelivery", "DecodedFrame", "FramePoller",
           "InferenceWorker", "PolledBatch", "ResultBuilder", "StoreFollower"]
