"""Loader benchmark: read + tokenize + pack throughput vs HF `datasets` streaming, and resume cost.

    python bench/loader/run.py [--mb 64] [--shards 16] [--workers N] [--out results.json]

1. Generates C4-format shards (`c4-train.XXXXX-of-01024.json.gz`, {text,timestamp,url} lines) of
   about `--mb` MB of JSON from the bundled sample (documents shuffled per shard), once.
2. Ours: `prepare_if_needed` (gzip + JSON + batch tokenize in worker processes + .bin/.idx) into a
   fresh cache, then the training loader produces every window of one epoch (pack).
3. Baseline, same files, same tokenizer, same packing: `datasets.load_dataset("json",
   data_files=..., streaming=True)`, batches of 256 texts through `encode_batch_fast`, EOS
   appended, packed into seq_len+1 windows. Both sides must count the same tokens.
   Each side runs `--repeats` times, interleaved, and its best run is reported.
4. Resume: build the loader, load a state at global sample 0 and at 10^7, take the first step;
   min of `--resume-repeats` runs each.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.data.consumer import open_loader, resume_at  # noqa: E402
from trainer.data.config import DataConfig  # noqa: E402
from trainer.data.prepare import prepare_if_needed  # noqa: E402
from trainer.data.tokenizer import load_tokenizer  # noqa: E402

SAMPLE = REPO / "examples/data/c4-sample"
TOKENIZER = REPO / "examples/tokenizer.json"
SEQ_LEN, GLOBAL_BATCH, MICRO_BATCH = 2048, 32, 4
SHAPE = {"seq_len": SEQ_LEN, "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH, "seed": 1}  # one DP rank
FAR = 10**7


def generate(out: Path, megabytes: int, shards: int) -> list[Path]:
    """C4-format shards of about `megabytes` MB of JSON lines in total (kept between runs)."""
    marker = out / f".complete-{megabytes}-{shards}"
    files = [out / f"c4-train.{s:05d}-of-01024.json.gz" for s in range(shards)]
    if marker.exists():
        return files
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for shard in sorted(SAMPLE.glob("c4-train.*.json.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as fh:
            lines.extend(fh)
    per_shard = megabytes * 1_000_000 // shards
    for s, path in enumerate(files):
        rng = random.Random(s)
        written = 0
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=6) as fh:
            while written < per_shard:
                rng.shuffle(lines)
                for line in lines:
                    fh.write(line)
                    written += len(line)
                    if written >= per_shard:
                        break
    marker.touch()
    return files


def bench_ours(cfg: DataConfig, run_dir: Path, workers: int) -> dict:
    """Prepare into an empty cache in `run_dir`, then read every window of one epoch."""
    started = time.perf_counter()
    manifest = json.loads(prepare_if_needed(cfg, run_dir, workers=workers).read_text())
    prepared = time.perf_counter()
    loader = open_loader(cfg, run_dir, **SHAPE)
    windows = 0
    for _ in range(len(loader.dataset) // GLOBAL_BATCH):
        windows += sum(mb.shape[0] for mb in loader.next_step())
    loader.close()
    done = time.perf_counter()
    return {
        "tokens": manifest["tokens"],
        "documents": manifest["documents"],
        "windows": windows,
        "prepare_s": prepared - started,
        "pack_s": done - prepared,
        "seconds": done - started,
        "tokens_per_s": manifest["tokens"] / (done - started),
    }


def bench_datasets(files: list[Path], batched: bool) -> dict:
    """`datasets` streaming + the same tokenizer + the same packing. batched: 256 texts per
    `encode_batch_fast` call (the tokenizer's threads); else one `encode` per example (the
    usual `IterableDataset.map(tokenize)` recipe)."""
    from datasets import load_dataset

    tokenizer, eos = load_tokenizer(TOKENIZER)
    started = time.perf_counter()
    stream = load_dataset("json", data_files=[str(f) for f in files], streaming=True, split="train")
    if batched:
        encodings = (
            enc
            for batch in stream.iter(batch_size=256)
            for enc in tokenizer.encode_batch_fast(batch["text"], add_special_tokens=False)
        )
    else:
        encodings = (tokenizer.encode(example["text"], add_special_tokens=False) for example in stream)
    buffer: list[int] = []
    tokens = documents = windows = 0
    for enc in encodings:
        ids = enc.ids
        ids.append(eos)
        buffer.extend(ids)
        tokens += len(ids)
        documents += 1
        while len(buffer) >= SEQ_LEN + 1:  # the same windows: seq_len+1 tokens, stride seq_len
            windows += 1
            del buffer[:SEQ_LEN]
    seconds = time.perf_counter() - started
    return {
        "tokens": tokens,
        "documents": documents,
        "windows": windows,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }


def bench_resume(cfg: DataConfig, run_dir: Path, repeats: int) -> dict:
    """Build + load state + first step at global sample 0 and 10^7 (data already prepared)."""

    def once(position: int) -> float:
        started = time.perf_counter()
        loader, _ = resume_at(position, cfg, run_dir, **SHAPE)
        elapsed = time.perf_counter() - started
        loader.close()
        return elapsed

    once(0)  # warm the page cache and imports
    times: dict[int, list[float]] = {0: [], FAR: []}
    for _ in range(repeats):  # interleaved, so load changes hit both alike
        for position in times:
            times[position].append(once(position))
    zero, far = min(times[0]), min(times[FAR])
    return {
        "position_0_s": zero,
        "position_1e7_s": far,
        "ratio": far / zero,
        "all_0_s": times[0],
        "all_1e7_s": times[FAR],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="MB of generated JSON lines")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="prepare processes")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "resilient-loader-bench")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs per side (best is reported)")
    parser.add_argument("--resume-repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    data = args.data_dir / f"c4-{args.mb}mb-{args.shards}"
    files = generate(data, args.mb, args.shards)
    gz_bytes = sum(f.stat().st_size for f in files)
    cfg = DataConfig(path=data, tokenizer=TOKENIZER, num_workers=2)
    runs: dict[str, list[dict]] = {"ours": [], "datasets_batched": [], "datasets_per_example": []}
    for _ in range(args.repeats):  # interleaved and best-of: the machine may be shared
        with tempfile.TemporaryDirectory(prefix="loader-bench-") as run_dir:
            runs["ours"].append(bench_ours(cfg, Path(run_dir), args.workers))
        runs["datasets_batched"].append(bench_datasets(files, batched=True))
        runs["datasets_per_example"].append(bench_datasets(files, batched=False))
    best = {name: min(results, key=lambda r: r["seconds"]) for name, results in runs.items()}
    # Same documents and tokens on every side (ours reads whole global batches, so a few fewer windows).
    if len({(r["tokens"], r["documents"]) for r in best.values()}) != 1:
        raise SystemExit(f"the pipelines saw different data: {best}")
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as run_dir:
        prepare_if_needed(cfg, Path(run_dir), workers=args.workers)
        resume = bench_resume(cfg, Path(run_dir), args.resume_repeats)
    ours = best["ours"]
    results = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "loadavg_1m": os.getloadavg()[0]},
        "data": {
            "shards": len(files),
            "json_mb": args.mb,
            "gz_bytes": gz_bytes,
            "tokens": ours["tokens"],
            "documents": ours["documents"],
            "seq_len": SEQ_LEN,
        },
        "best": best,
        "all_seconds": {name: [r["seconds"] for r in results] for name, results in runs.items()},
        "speedup_vs_batched": ours["tokens_per_s"] / best["datasets_batched"]["tokens_per_s"],
        "speedup_vs_per_example": ours["tokens_per_s"] / best["datasets_per_example"]["tokens_per_s"],
        "loader_after_prepare_tokens_per_s": ours["tokens"] / ours["pack_s"],
        "resume": resume,
    }
    print(json.dumps(results, indent=1))
    print(
        f"\nthroughput, tokens/s: ours {ours['tokens_per_s']:,.0f} (prepare {ours['prepare_s']:.1f} s + pack "
        f"{ours['pack_s']:.1f} s); datasets streaming batched "
        f"{best['datasets_batched']['tokens_per_s']:,.0f} ({results['speedup_vs_batched']:.2f}x), per example "
        f"{best['datasets_per_example']['tokens_per_s']:,.0f} ({results['speedup_vs_per_example']:.2f}x); "
        f"goal >= 2x\nafter prepare the loader alone reads {results['loader_after_prepare_tokens_per_s']:,.0f}"
        f" tokens/s\nresume: position 0 {resume['position_0_s'] * 1000:.0f} ms, position 1e7 "
        f"{resume['position_1e7_s'] * 1000:.0f} ms, ratio {resume['ratio']:.3f} (goal <= 1.1)",
        file=sys.stderr,
    )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
