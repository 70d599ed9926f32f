#!/usr/bin/env python3
"""Data pipeline speed: ours beside a nanoGPT-style baseline, one run.

Tokenize-and-write: our `write_split` (shards with headers and checksums,
1 and 2 worker processes) vs the baseline that nanoGPT's `prepare.py`
scripts use (tiktoken `encode_ordinary` per document in one process, ids
appended to one array, `tofile`), on the embedded corpus with one 8192-id
tokenizer. Loader: batches/s and tokens/s of our `BatchLoader` (random and
sequential) vs nanoGPT's `get_batch` (a fresh memmap each call, random
offsets, `torch.stack`), at batch 8 and block size 1024.

    python benchmarks/data.py [--repeat 3]
"""
import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llm_from_scratch.data import (BatchLoader, read_shard, shakespeare,
                                   write_split)
from llm_from_scratch.tokenizer import Tokenizer


def best_of(fn, repeat):
    best = float('inf')
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def baseline_write(docs, tok, path):
    "nanoGPT-style: encode each document, prepend EOT, one uint16 file."
    enc, eot = tok.tiktoken, tok.special_tokens['<|endoftext|>']
    ids = []
    for d in docs:
        ids.append(eot)
        ids.extend(enc.encode_ordinary(d.text))
    np.array(ids, dtype=np.uint16).tofile(path)


def baseline_get_batch(path, B, T):
    "nanoGPT-style get_batch: re-open the memmap, random offsets, stack."
    data = np.memmap(path, dtype=np.uint16, mode='r')
    ix = torch.randint(len(data) - T, (B,))
    x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64))
                     for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T]
                                      .astype(np.int64)) for i in ix])
    return x, y


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--repeat', type=int, default=3)
    ap.add_argument('--batches', type=int, default=2000)
    args = ap.parse_args()
    docs = shakespeare()
    mb = sum(len(d.text.encode()) for d in docs) / 1e6
    print(f'machine: {platform.machine()}, {os.cpu_count()} CPUs, '
          f'Python {platform.python_version()}')
    print(f'corpus: embedded Shakespeare, {len(docs)} documents, '
          f'{mb:.2f} MB\n')
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tok = Tokenizer.train('\n\n'.join(x.text for x in docs), 8192)
        tok.save(d / 'tok.json')
        print('tokenize and write (MB/s of text, best of '
              f'{args.repeat})')
        t = best_of(lambda: baseline_write(docs, tok, d / 'base.bin'),
                    args.repeat)
        print(f'  baseline (nanoGPT-style, 1 process)  {mb / t:7.2f}')
        for n in (1, 2):
            t = best_of(lambda: write_split(docs, d / 'tok.json', d,
                                            f'p{n}', processes=n),
                        args.repeat)
            print(f'  ours, {n} process{"es" if n > 1 else "  "}'
                  f'                  {mb / t:7.2f}')
        ours = np.asarray(read_shard(d / 'p1_000000.bin'))
        assert (ours == np.fromfile(d / 'base.bin', np.uint16)).all()

        B, T, n = 8, 1024, args.batches
        print(f'\nloader, batch {B} x block {T} ({n} batches)')
        shards = [read_shard(d / 'p1_000000.bin')]
        for mode in ('random', 'sequential'):
            loader = BatchLoader(shards, B, T, mode)
            t = best_of(lambda: [next(loader) for _ in range(n)], 1)
            print(f'  ours, {mode:10s}  {n / t:9,.0f} batches/s '
                  f'{n * B * T / t / 1e6:6.1f} M tokens/s')
        t = best_of(lambda: [baseline_get_batch(d / 'base.bin', B, T)
                             for _ in range(n)], 1)
        print(f'  nanoGPT get_batch  {n / t:9,.0f} batches/s '
              f'{n * B * T / t / 1e6:6.1f} M tokens/s')


if __name__ == '__main__':
    main()
