"""Validation batches: the first K documents, unshuffled, packed into windows, split across ranks."""

from __future__ import annotations

import torch

from tests.data.conftest import TOKENIZER, data_config, sample_records, write_shard
from trainer.data.loader import build_validation_batches
from trainer.data.prepare import prepare_if_needed
from trainer.data.tokenizer import load_tokenizer

SEQ_LEN, MICRO_BATCH = 32, 2


def test_first_k_documents_in_order_across_validation_shards(tmp_path):
    records = sample_records()
    data = tmp_path / "data"
    write_shard(data / "c4-train.00000-of-01024.json.gz", records[:20])
    write_shard(data / "c4-validation.00000-of-00008.json.gz", records[100:104])
    write_shard(data / "c4-validation.00001-of-00008.json.gz", records[104:120])
    k = 9  # spills from the first validation shard into the second
    cfg = data_config(data, validation_docs=k)
    prepare_if_needed(cfg, tmp_path / "run", workers=1)

    tokenizer, eos = load_tokenizer(TOKENIZER)
    stream = [t for r in records[100 : 100 + k] for t in tokenizer.encode(r["text"]).ids + [eos]]
    windows = [stream[w * SEQ_LEN : w * SEQ_LEN + SEQ_LEN + 1] for w in range((len(stream) - 1) // SEQ_LEN)]

    single = build_validation_batches(
        cfg, run_dir=tmp_path / "run", seq_len=SEQ_LEN, micro_batch=MICRO_BATCH, dp_rank=0, dp_size=1
    )
    usable = len(windows) // MICRO_BATCH * MICRO_BATCH
    assert torch.cat(single).tolist() == windows[:usable]

    dp = 3
    shares = [
        build_validation_batches(
            cfg, run_dir=tmp_path / "run", seq_len=SEQ_LEN, micro_batch=MICRO_BATCH, dp_rank=r, dp_size=dp
        )
        for r in range(dp)
    ]
    assert len({len(s) for s in shares}) == 1  # every rank runs the same number of forward passes
    interleaved = [shares[r][k] for k in range(len(shares[0])) for r in range(dp)]
    rounds = len(windows) // (MICRO_BATCH * dp)
    assert torch.cat(interleaved).tolist() == windows[: rounds * MICRO_BATCH * dp]
