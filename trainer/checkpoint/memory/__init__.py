"""The in-memory checkpoint tier: each rank's full training state in host shared memory, replicated to
a rank on the next node.

Modules, each with one job (each imports only modules above it in this list):
- `naming`: where everything is (the tier's root, own and replica directories, step and file names);
- `files`: the root's trust check and owner record, owner-only file writes and reads (never through a link);
- `slots`: the reserved, reused mmap files a snapshot is copied into;
- `snapshot`: the bytes of one rank's copy (serialize, seal, verify, load): what makes a copy genuine;
- `ring`: who holds whose replica (the one ring definition);
- `transport`: how replicas move between ranks (gloo, and in-process for tests);
- `choice`: which tier and copies a restart takes (pure);
- `replication`: the ring exchange after a snapshot and the replica transfer at a restart;
- `listing`: what a rank offers at a restart, and what an operator sees (`resilient ckpt list`);
- `stale`: roots of runs that are gone (`resilient ckpt list` reports them, `ckpt clean` removes them);
- `retention`: which snapshots are kept;
- `tier`: `MemoryTier`, the tier as a rank uses it.

Nothing here is imported by this file: `naming` stays importable without torch.
"""
