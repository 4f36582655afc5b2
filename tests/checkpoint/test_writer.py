"""The background checkpoint writer's parts, in process: staging buffers, hash-while-writing, the
idle-priority writer thread (the collective parts run in test_checkpoints.py with real ranks)."""

from __future__ import annotations

import os
import threading

import torch
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

from trainer.checkpoint import manifest, writer


def buckets(tensors: list[torch.Tensor]) -> list[writer.Bucket]:
    items = [(f"item{i}", t) for i, t in enumerate(tensors)]
    return [("/unused/__0_0.distcp", "__0_", ([("bytes-item", b"x")], items))]


def test_staging_copies_the_state_into_buffers_it_keeps_from_save_to_save():
    state = [torch.arange(1000, dtype=torch.float32), torch.ones(3, 4)]
    staging = writer.Staging()
    first = staging.stage(buckets(state))
    copies = [t for _, t in first[0][2][1]]
    assert all(torch.equal(c, s) and c.data_ptr() != s.data_ptr() for c, s in zip(copies, state, strict=True))
    assert first[0][2][0] == [("bytes-item", b"x")] and staging.nbytes == 1012 * 4
    state[0].add_(1)  # training goes on: the staged copy keeps the saved values
    assert copies[0][0].item() == 0
    second = [t for _, t in staging.stage(buckets(state))[0][2][1]]
    assert [t.data_ptr() for t in second] == [t.data_ptr() for t in copies], "no new allocation (page faults)"
    assert torch.equal(second[0], state[0])
    third = [t for _, t in staging.stage(buckets([torch.zeros(5), state[1]]))[0][2][1]]
    assert third[0].shape == (5,) and staging.nbytes == (5 + 12) * 4, "a changed shape replaces its buffer"


def test_hashing_stream_digest_is_the_file_checksum(tmp_path):
    path = tmp_path / "f.bin"
    with open(path, "wb") as f:
        stream = writer._HashingStream(f)
        for chunk in (b"abc", memoryview(os.urandom(1 << 20)), b""):
            stream.write(chunk)
        assert stream.tell() == 3 + (1 << 20)
        stream.flush()
    assert stream.digest.hexdigest() == manifest.hash_file(path)


def test_writer_thread_runs_at_idle_priority_until_the_loop_waits_for_it():
    seen: dict[str, int] = {}
    release = threading.Event()

    def write(_rank: int, staged: list, _queue: object) -> None:
        seen["policy"] = os.sched_getscheduler(0)
        seen["staged"] = staged
        release.wait(10)
        seen["policy_when_waited_for"] = os.sched_getscheduler(0)

    caller = writer.ThreadCaller(idle=True)
    caller.schedule_async_call(AsyncRequest(write, (0, "live", None), [], preload_fn=lambda: "staged"))
    assert not caller.is_current_async_call_done(blocking=False, no_dist=True)
    threading.Timer(0.2, release.set).start()
    assert caller.is_current_async_call_done(blocking=True, no_dist=True)
    assert seen == {"policy": os.SCHED_IDLE, "staged": "staged", "policy_when_waited_for": os.SCHED_OTHER}


def test_a_synchronous_save_writes_at_normal_priority_from_the_live_state():
    seen: dict[str, object] = {}

    def write(_rank: int, data: object, _queue: object) -> None:
        seen["policy"], seen["data"] = os.sched_getscheduler(0), data

    caller = writer.ThreadCaller(idle=False)
    caller.schedule_async_call(AsyncRequest(write, (0, "live", None), []))
    assert caller.is_current_async_call_done(blocking=True, no_dist=True)
    assert seen == {"policy": os.SCHED_OTHER, "data": "live"}
