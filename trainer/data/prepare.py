"""`prepare`: pre-tokenize C4 shards once into megatron-core's indexed format (.bin/.idx).

Why pre-tokenize instead of tokenizing in the loader: a months-long run reads the same data for
many epochs and restarts hundreds of times; tokenizing once makes every restart O(1) (the loader
only maps window indices to byte offsets) and makes existing Megatron-preprocessed C4 usable as is.

Layout of the cache directory (`DataConfig.cache_dir`, default RUN_DIR/data_cache, mode 0700):

    shards/<shard stem>.<key>.{bin,idx,json}   one per source shard; key = hash(name, size, mtime,
                                                tokenizer sha256, EOS id)
    train.<key>.json                           manifest of a training set: its shards in order,
                                                documents, tokens, skips and the data fingerprint
    validation.<key>.{bin,idx,json}            the first K validation documents

Every file is written under a temporary name and renamed into place, and a shard (or manifest)
exists only once its `.json` is there, written last. A prepare killed at any point therefore
resumes with the shards that were finished and never trusts a half-written one. Shards are
tokenized in parallel processes (`workers`), each with a share of the tokenizer's threads.
Each document gets EOS appended; damaged lines are skipped, counted and recorded in the `.json`.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resilient.core.atomic import atomic_write
from resilient.core.errors import ConfigError
from resilient.core.progress import track
from resilient.core.rundir import RunDir
from trainer.data.config import DataConfig
from trainer.data.shards import SkipCounts, find_shards, is_shard, read_documents
from trainer.data.tokenizer import encode_documents, load_tokenizer, tokenizer_digest

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Locations and keys (pure)


def cache_root(cfg: DataConfig, run_dir: Path) -> Path:
    return cfg.cache_dir if cfg.cache_dir is not None else RunDir(run_dir).data_cache


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _stat_key(path: Path) -> list[object]:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def shard_key(shard: Path, tok_sha: str, eos_id: int) -> str:
    """Cache key of one tokenized shard: changes when the file or the tokenizer changes."""
    return _digest([FORMAT_VERSION, _stat_key(shard), tok_sha, eos_id])[:16]


def shard_prefix(root: Path, shard: Path, key: str) -> Path:
    stem = shard.name
    for suffix in (".gz", ".jsonl", ".json"):
        stem = stem.removesuffix(suffix)
    return root / "shards" / f"{stem}.{key}"


def data_fingerprint(shards: Iterable[dict], tok_sha: str | None, eos_id: int | None) -> str:
    """Identity of the token stream for checkpoint compatibility: content counts, not file times,
    so the same data prepared again (or copied elsewhere) resumes, and different data does not."""
    content = [[s["name"], s["documents"], s["tokens"]] for s in shards]
    return _digest([content, tok_sha, eos_id])[:16]


# ---------------------------------------------------------------------------------------------
# Writing


def _token_dtype(vocab_size: int) -> type[np.number]:
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def _write_indexed(prefix: Path, token_lists: Iterable[list[int]], dtype) -> tuple[int, int]:
    """Write prefix.bin/.idx atomically with megatron-core's builder; returns (documents, tokens)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tmp = prefix.with_name(f".{prefix.name}.{os.getpid()}.tmp")
    builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=dtype)
    documents = tokens = 0
    for ids in token_lists:
        builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
        documents += 1
        tokens += len(ids)
    builder.finalize(str(tmp) + ".idx")
    for suffix in (".bin", ".idx"):
        fd = os.open(str(tmp) + suffix, os.O_RDONLY)
        try:  # durable before the metadata that vouches for them is written
            os.fchmod(fd, 0o600)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(str(tmp) + suffix, str(prefix) + suffix)
    return documents, tokens


@dataclass(frozen=True)
class ShardJob:
    """One unit of prepare work: tokenize `sources` (up to `limit` documents) into `prefix`."""

    sources: tuple[Path, ...]
    prefix: Path
    tokenizer: Path
    eos_token: str
    limit: int | None = None


def run_job(job: ShardJob) -> dict:
    """Tokenize one job's documents into its .bin/.idx and write its metadata .json (last)."""
    tokenizer, eos_id = load_tokenizer(job.tokenizer, job.eos_token)
    dtype = _token_dtype(tokenizer.get_vocab_size())
    skips = {src.name: SkipCounts() for src in job.sources}

    def documents() -> Iterator[str]:
        remaining = job.limit
        for src in job.sources:
            for text in read_documents(src, skips[src.name], remaining):
                yield text
                if remaining is not None:
                    remaining -= 1
            if remaining == 0:
                return

    n_docs, n_tokens = _write_indexed(job.prefix, encode_documents(documents(), tokenizer, eos_id), dtype)
    meta = {
        "version": FORMAT_VERSION,
        "name": job.sources[0].name if len(job.sources) == 1 else "validation",
        "sources": [s.name for s in job.sources],
        "prefix": job.prefix.name,
        "dtype": np.dtype(dtype).name,
        "documents": n_docs,
        "tokens": n_tokens,
        "skipped": {name: s.as_dict() for name, s in skips.items()},
    }
    atomic_write(_meta_path(job.prefix), json.dumps(meta, indent=1))
    return meta


def _meta_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".json")


def _worker_init(threads: int) -> None:
    # The tokenizer's thread pool starts on first use; give each process its share of the cores.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"


SPAWN_MIN_BYTES = 32 << 20  # below this, starting worker processes (each imports torch) costs more than it saves


def choose_workers(requested: int, jobs: int, input_bytes: int, cpus: int) -> tuple[int, str]:
    """How many processes tokenize `jobs` shards of `input_bytes` in total, and why."""
    if jobs <= 1:
        return 1, "one shard"
    if requested == 0 and input_bytes < SPAWN_MIN_BYTES:
        return 1, f"{input_bytes} input bytes: cheaper in-process than starting workers"
    wanted = requested or cpus
    return max(1, min(wanted, jobs)), f"{'requested' if requested else 'one per core'}, at most one per shard"


def _run_jobs(jobs: list[ShardJob], requested_workers: int) -> None:
    if not jobs:
        return
    input_bytes = sum(src.stat().st_size for job in jobs for src in job.sources)
    workers, reason = choose_workers(requested_workers, len(jobs), input_bytes, os.cpu_count() or 1)
    log.info("data: tokenizing %d shards with %d process(es) (%s)", len(jobs), workers, reason)
    if workers == 1:
        for job in track(jobs, "tokenizing shards", total=len(jobs)):
            _log_done(run_job(job))
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: prepare may run inside a trainer process that already holds threads.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(threads,)) as pool:
        for meta in track(pool.imap_unordered(run_job, jobs), "tokenizing shards", total=len(jobs)):
            _log_done(meta)


def _log_done(meta: dict) -> None:
    log.info("data: prepared %s (%d documents, %d tokens)", meta["name"], meta["documents"], meta["tokens"])


# ---------------------------------------------------------------------------------------------
# Training set


def check_inputs(cfg: DataConfig) -> int:
    """Fail fast with a one-line ConfigError on a missing/empty data location (text shards or
    Megatron .bin/.idx) or an unusable tokenizer; returns the tokenizer's vocabulary size.
    Cheap: run it on every rank before collectives."""
    if not megatron_prefixes(cfg.path):
        find_shards(cfg.path, cfg.train_glob, what="data.path")
    tokenizer, _ = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    return tokenizer.get_vocab_size()


def train_manifest_path(cfg: DataConfig, run_dir: Path) -> Path:
    """Where the manifest of the configured training data lives (it may not exist yet)."""
    root = cache_root(cfg, run_dir)
    megatron = megatron_prefixes(cfg.path)
    if megatron:
        key = _digest([_stat_key(p.with_name(p.name + ".idx")) for p in megatron])[:16]
        return root / f"train.megatron.{key}.json"
    shards = find_shards(cfg.path, cfg.train_glob, what="data.path")
    _, eos_id = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    tok_sha = tokenizer_digest(cfg.tokenizer)
    keys = [shard_key(s, tok_sha, eos_id) for s in shards]
    return root / f"train.{_digest(keys)[:16]}.json"


def megatron_prefixes(path: Path) -> list[Path]:
    """Prefixes of Megatron .bin/.idx pairs in a directory that holds no text shards."""
    if not path.is_dir():
        return []
    prefixes = sorted(p.with_suffix("") for p in path.glob("*.idx") if p.with_suffix(".bin").is_file())
    # Our own cache keeps a metadata .json beside each .bin/.idx; that is not a text shard.
    metadata = {p.with_name(p.name + ".json") for p in prefixes}
    has_text = any(is_shard(p) and p not in metadata for p in path.iterdir())
    return [] if has_text else prefixes


def _megatron_manifest(prefixes: list[Path]) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    shards = []
    for prefix in prefixes:
        ds = IndexedDataset(str(prefix))
        shards.append(
            {
                "name": prefix.name,
                "path": str(prefix.resolve()),
                "dtype": np.dtype(ds.index.dtype).name,
                "documents": int(len(ds.document_indices) - 1),
                "tokens": int(ds.sequence_lengths.sum(dtype=np.int64)),
                "skipped": {},
            }
        )
    return _manifest(shards, tok_sha=None, eos_id=None)


def _manifest(shards: list[dict], tok_sha: str | None, eos_id: int | None) -> dict:
    lines = sum(s.get("malformed_lines", 0) for sh in shards for s in sh["skipped"].values())
    truncated = sorted(name for sh in shards for name, s in sh["skipped"].items() if s.get("truncated"))
    return {
        "version": FORMAT_VERSION,
        "fingerprint": data_fingerprint(shards, tok_sha, eos_id),
        "tokenizer_sha256": tok_sha,
        "eos_id": eos_id,
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "skipped_lines": lines,
        "truncated_shards": truncated,
        "shards": shards,
    }


def _prepare_train(cfg: DataConfig, run_dir: Path, workers: int | None) -> Path:
    """Tokenize the missing training shards and write the training manifest; returns its path."""
    manifest_path = train_manifest_path(cfg, run_dir)
    if manifest_path.exists():
        return manifest_path
    root = cache_root(cfg, run_dir)
    megatron = megatron_prefixes(cfg.path)
    if megatron:
        atomic_write(manifest_path, json.dumps(_megatron_manifest(megatron), indent=1))
        return manifest_path

    shards = find_shards(cfg.path, cfg.train_glob, what="data.path")
    _, eos_id = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    tok_sha = tokenizer_digest(cfg.tokenizer)
    prefixes = [shard_prefix(root, s, shard_key(s, tok_sha, eos_id)) for s in shards]
    todo = [
        ShardJob((s,), p, cfg.tokenizer.resolve(), cfg.eos_token)
        for s, p in zip(shards, prefixes, strict=True)
        if not _meta_path(p).exists()
    ]
    if todo:
        log.info("data: tokenizing %d of %d shards into %s", len(todo), len(shards), root)
    _run_jobs(todo, cfg.prepare_workers if workers is None else workers)

    metas = []
    for prefix in prefixes:
        meta = json.loads(_meta_path(prefix).read_text())
        meta["path"] = str(prefix.resolve())
        metas.append(meta)
    manifest = _manifest(metas, tok_sha, eos_id)
    if manifest["tokens"] == 0:
        raise ConfigError(f"data.path: {cfg.path}: the shards hold no readable documents")
    atomic_write(manifest_path, json.dumps(manifest, indent=1))
    if manifest["skipped_lines"] or manifest["truncated_shards"]:
        log.warning(
            "data: prepare skipped %d malformed lines; truncated shards: %s",
            manifest["skipped_lines"],
            ", ".join(manifest["truncated_shards"]) or "none",
        )
    return manifest_path


# ---------------------------------------------------------------------------------------------
# Validation set


def validation_shards(cfg: DataConfig) -> list[Path]:
    """The validation shards, in order; ConfigError (one line) when there are none."""
    if cfg.validation_path is None and megatron_prefixes(cfg.path):
        raise ConfigError(
            f"data.validation_path: {cfg.path} holds Megatron .bin/.idx data; "
            f"set validation_path to C4 validation shards to evaluate"
        )
    location = cfg.validation_path if cfg.validation_path is not None else _data_dir(cfg.path)
    return find_shards(location, cfg.validation_glob, what="data.validation_path")


def _data_dir(path: Path) -> Path:
    return Path(str(path)).parent if glob.has_magic(str(path)) else path


def validation_meta_path(cfg: DataConfig, run_dir: Path, shards: list[Path] | None = None) -> Path:
    """The metadata .json of the prepared validation documents (it may not exist yet)."""
    shards = validation_shards(cfg) if shards is None else shards
    _, eos_id = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    tok_sha = tokenizer_digest(cfg.tokenizer)
    key = _digest([FORMAT_VERSION, [_stat_key(s) for s in shards], tok_sha, eos_id, cfg.validation_docs])[:16]
    return cache_root(cfg, run_dir) / f"validation.{key}.json"


def _prepare_validation(cfg: DataConfig, run_dir: Path, shards: list[Path]) -> None:
    """Tokenize the first `validation_docs` validation documents."""
    meta = validation_meta_path(cfg, run_dir, shards)
    if not meta.exists():
        prefix = meta.with_name(meta.name.removesuffix(".json"))
        run_job(ShardJob(tuple(shards), prefix, cfg.tokenizer.resolve(), cfg.eos_token, cfg.validation_docs))


def _optional_validation_shards(cfg: DataConfig) -> list[Path]:
    # Training without validation shards is fine; evaluation then fails with this ConfigError.
    try:
        return validation_shards(cfg)
    except ConfigError as err:
        log.info("data: no validation data (%s)", err)
        return []


@contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """One prepare at a time per cache directory (a second one waits, then finds the work done)."""
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_stale_temporaries(root: Path) -> None:
    # Left by a prepare that was killed; safe to delete under the lock.
    for tmp in [*root.glob(".*.tmp*"), *(root / "shards").glob(".*.tmp*")]:
        tmp.unlink(missing_ok=True)


def prepare_if_needed(cfg: DataConfig, run_dir: Path, workers: int | None = None) -> Path:
    """Prepare what is missing for `cfg` (training shards, manifest, validation set if there are
    validation shards) and return the training manifest path. Run it on global rank 0 and barrier
    before building loaders."""
    manifest = train_manifest_path(cfg, run_dir)
    val_shards = _optional_validation_shards(cfg)
    if manifest.exists() and (not val_shards or validation_meta_path(cfg, run_dir, val_shards).exists()):
        return manifest
    root = cache_root(cfg, run_dir)
    (root / "shards").mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    with _exclusive(root):
        _remove_stale_temporaries(root)
        _prepare_train(cfg, run_dir, workers)
        if val_shards:
            _prepare_validation(cfg, run_dir, val_shards)
    return manifest
