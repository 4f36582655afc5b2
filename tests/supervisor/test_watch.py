"""The attempt watch's state machine (resilient/supervisor/watch.py), without processes."""

from __future__ import annotations

from resilient.supervisor.watch import Mode, Move, Seen, Watch, advance

GRACE = {"stop_grace_s": 30.0, "done_grace_s": 20.0}


def test_a_stop_asks_the_ranks_then_ends_preempted_when_they_exit_or_kills_them_at_the_deadline():
    stopping, move = advance(Watch(), Seen(stop=True), 100.0, **GRACE)
    assert (stopping, move) == (Watch(Mode.STOPPING, 130.0), Move.BEGIN_STOP)
    # while stopping, failures and further stops are not looked at: only exits and the deadline
    assert advance(stopping, Seen(stop=True, failed=True), 110.0, **GRACE) == (stopping, Move.KEEP)
    assert advance(stopping, Seen(all_exited=True), 120.0, **GRACE)[1] is Move.PREEMPTED
    assert advance(stopping, Seen(), 130.5, **GRACE)[1] is Move.PREEMPT_KILLING_REST


def test_a_stop_wins_over_a_failure_and_a_failure_over_a_finish():
    assert advance(Watch(), Seen(stop=True, failed=True, all_succeeded=True), 0.0, **GRACE)[1] is Move.BEGIN_STOP
    assert advance(Watch(), Seen(failed=True, all_succeeded=True, all_exited=True), 0.0, **GRACE)[1] is Move.FAILED
    done = Seen(all_succeeded=True, all_exited=True, all_done=True)
    assert advance(Watch(), done, 0.0, **GRACE) == (Watch(), Move.FINISHED)


def test_ranks_that_said_done_get_a_grace_then_the_rest_is_stopped():
    draining, move = advance(Watch(), Seen(all_done=True), 50.0, **GRACE)
    assert (draining, move) == (Watch(Mode.DRAINING, 70.0), Move.KEEP)
    assert advance(draining, Seen(all_done=True), 69.0, **GRACE) == (draining, Move.KEEP)  # the grace is not renewed
    assert advance(draining, Seen(all_done=True), 70.5, **GRACE)[1] is Move.FINISH_STOPPING_REST
    # a clean exit of all, a failure or a stop still end a drain first
    assert advance(draining, Seen(all_done=True, all_succeeded=True), 60.0, **GRACE)[1] is Move.FINISHED
    assert advance(draining, Seen(all_done=True, failed=True), 60.0, **GRACE)[1] is Move.FAILED
    assert advance(draining, Seen(stop=True), 60.0, **GRACE)[1] is Move.BEGIN_STOP


def test_a_rank_no_longer_done_puts_the_watch_back_to_training():
    draining, _ = advance(Watch(), Seen(all_done=True), 50.0, **GRACE)
    assert advance(draining, Seen(), 55.0, **GRACE) == (Watch(), Move.KEEP)
    again, _ = advance(Watch(), Seen(all_done=True), 60.0, **GRACE)
    assert again.until == 80.0  # a new drain starts its own grace
