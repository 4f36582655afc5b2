"""The stateful training loader and the validation batches.

Data flow: `prepare` (trainer.data.prepare) has tokenized the shards once into .bin/.idx files;
here a map-style dataset reads window `w` (seq_len+1 tokens) straight from the memory-mapped
files, a batch sampler walks this rank's slice of the global order (trainer.data.order) from the
current position, and torchdata's `StatefulDataLoader` runs the reads in worker processes with
prefetch. The checkpointed state is our own position (global samples consumed, plus the data
fingerprint, seed and seq_len it is valid for), not the DataLoader's internal state: it is
independent of the DP size and of how far the workers had prefetched, and a resume simply builds
the loader at that position, with no replay.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from resilient.core.errors import ConfigError
from trainer.data.config import DataConfig
from trainer.data.order import STATE_VERSION, GlobalOrder, check_resume, num_windows, rank_micro_batches
from trainer.data.prepare import train_manifest_path, validation_meta_path
from trainer.data.tokens import TokenStream

log = logging.getLogger(__name__)


class WindowDataset(Dataset):
    """Window `w` = tokens [w*seq_len, w*seq_len + seq_len + 1) of the stream, as int64."""

    def __init__(self, stream: TokenStream, seq_len: int) -> None:
        self.stream = stream
        self.seq_len = seq_len

    def __len__(self) -> int:
        return num_windows(self.stream.total, self.seq_len)

    def __getitem__(self, window: int) -> torch.Tensor:
        return torch.from_numpy(self.stream.read(window * self.seq_len, self.seq_len + 1))


class RankBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches (lists of window indices), step after step, from `start`."""

    def __init__(
        self, order: GlobalOrder, start: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
    ) -> None:
        self.order, self.start = order, start
        self.global_batch, self.micro_batch, self.dp_rank, self.dp_size = global_batch, micro_batch, dp_rank, dp_size

    def __iter__(self) -> Iterator[list[int]]:
        consumed = self.start
        while True:
            micro_batches = rank_micro_batches(
                consumed, self.global_batch, self.micro_batch, self.dp_rank, self.dp_size
            )
            for samples in micro_batches:
                yield [self.order.window(s) for s in samples]
            consumed += self.global_batch


class TrainLoader:
    """Grad-accumulation micro-batches for one data-parallel rank, resumable from a position."""

    def __init__(
        self,
        dataset: WindowDataset,
        *,
        fingerprint: str,
        seed: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        num_workers: int,
        prefetch_factor: int,
        worker_timeout_s: float,
    ) -> None:
        rank_micro_batches(0, global_batch, micro_batch, dp_rank, dp_size)  # validates the layout
        self.dataset = dataset
        self.order = GlobalOrder(len(dataset), seed)
        self.fingerprint, self.seed = fingerprint, seed
        self.global_batch, self.micro_batch, self.dp_rank, self.dp_size = global_batch, micro_batch, dp_rank, dp_size
        self.grad_accum = global_batch // (micro_batch * dp_size)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.worker_timeout_s = worker_timeout_s
        self.consumed_samples = 0
        self._it: Iterator[torch.Tensor] | None = None

    def _start(self) -> Iterator[torch.Tensor]:
        sampler = RankBatchSampler(
            self.order, self.consumed_samples, self.global_batch, self.micro_batch, self.dp_rank, self.dp_size
        )
        loader = StatefulDataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            persistent_workers=False,
            pin_memory=False,
            timeout=self.worker_timeout_s if self.num_workers else 0,
        )
        return iter(loader)

    def next_step(self) -> list[torch.Tensor]:
        """The `grad_accum` micro-batches of the next step, each [micro_batch, seq_len+1] int64."""
        for last in (False, True):
            if self._it is None:
                self._it = self._start()
            try:
                batches = [next(self._it) for _ in range(self.grad_accum)]
                break
            except RuntimeError as err:
                # torch's words for a worker that did not deliver in time (one stuck at its start: seen after a
                # fork); the step is fetched again from its first micro-batch by new workers, so the bits are
                # those of an uninterrupted loader.
                if last or "DataLoader timed out" not in str(err):
                    raise
                log.warning("data: %s waiting for a worker; replacing the workers", err)
                self.close()
        self.consumed_samples += self.global_batch
        return batches

    def state_dict(self) -> dict:
        """JSON-able position: global samples consumed and what they are valid for."""
        return {
            "version": STATE_VERSION,
            "consumed_samples": self.consumed_samples,
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "seq_len": self.dataset.seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved position (ConfigError if it belongs to other data/seed/seq_len)."""
        ok, reason = check_resume(state, fingerprint=self.fingerprint, seed=self.seed, seq_len=self.dataset.seq_len)
        if not ok:
            raise ConfigError(reason)
        self.close()
        self.consumed_samples = state["consumed_samples"]

    def close(self) -> None:
        """Stop the worker processes (a later next_step starts them again)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _open_train(cfg: DataConfig, run_dir: Path) -> tuple[TokenStream, str]:
    path = train_manifest_path(cfg, run_dir)
    if not path.exists():
        raise ConfigError(
            f"data: {cfg.path} is not prepared (no {path}); call prepare_if_needed on rank 0 "
            f"first or run `resilient data prepare`"
        )
    manifest = json.loads(path.read_text())
    return TokenStream.from_manifest(manifest), manifest["fingerprint"]


def build_train_loader(
    cfg: DataConfig,
    *,
    run_dir: Path,
    seq_len: int,
    global_batch: int,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
) -> TrainLoader:
    """The loader of this DP rank at position 0 (`load_state_dict` moves it); data must be prepared."""
    stream, fingerprint = _open_train(cfg, Path(run_dir))
    dataset = WindowDataset(stream, seq_len)
    if len(dataset) == 0:
        raise ConfigError(f"data.path: {cfg.path}: {stream.total} tokens are fewer than one window of {seq_len + 1}")
    return TrainLoader(
        dataset,
        fingerprint=fingerprint,
        seed=seed,
        global_batch=global_batch,
        micro_batch=micro_batch,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor,
        worker_timeout_s=cfg.worker_timeout_s,
    )


def build_validation_batches(
    cfg: DataConfig, *, run_dir: Path, seq_len: int, micro_batch: int, dp_rank: int, dp_size: int
) -> list[torch.Tensor]:
    """This rank's share of the validation windows, in order, as [micro_batch, seq_len+1] batches.

    The first `validation_docs` documents are packed into windows like the training data, and the
    windows are dealt out micro-batch by micro-batch across ranks; the tail that would give ranks
    unequal counts is dropped, so every rank runs the same number of forward passes.
    """
    meta = validation_meta_path(cfg, Path(run_dir))
    if not meta.exists():
        raise ConfigError(f"data: validation data is not prepared (no {meta}); call prepare_if_needed on rank 0 first")
    dataset = WindowDataset(TokenStream.from_meta_file(meta), seq_len)
    per_round = micro_batch * dp_size
    rounds = len(dataset) // per_round
    if rounds == 0:
        raise ConfigError(
            f"data.validation_docs: {cfg.validation_docs} documents give {len(dataset)} windows of "
            f"{seq_len + 1} tokens, fewer than micro_batch x dp = {per_round}"
        )
    first = dp_rank * micro_batch
    return [torch.stack([dataset[k * per_round + first + i] for i in range(micro_batch)]) for k in range(rounds)]
