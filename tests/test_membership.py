"""A batch's offsets are committed only under the group membership it was polled in."""

from __future__ import annotations

from kafka.structs import ConsumerGroupMetadata

from workers.inference.polling import same_membership

POLLED = ConsumerGroupMetadata("inspection-workers", 7, "member-a", None)


def test_the_membership_a_batch_was_polled_in_may_commit_it() -> None:
    assert same_membership(POLLED, ConsumerGroupMetadata("inspection-workers", 7, "member-a", None))
    assert same_membership(None, None)  # at-least-once: no transactional commit, no membership to hold


def test_a_reset_or_moved_on_membership_never_commits_a_batch_polled_before() -> None:
    reset = ConsumerGroupMetadata("inspection-workers", -1, "", None)  # the heartbeat thread's reset
    assert not same_membership(POLLED, reset)
    assert not same_membership(POLLED, ConsumerGroupMetadata("inspection-workers", 8, "member-a", None))
    assert not same_membership(POLLED, ConsumerGroupMetadata("inspection-workers", 7, "member-b", None))
    assert not same_membership(reset, reset)  # polled while reset: never committed with generation -1
    assert not same_membership(POLLED, None)
