#!/usr/bin/env python3
"""Training throughput on this machine: tokens/s and MFU, ours beside bare PyTorch.

For the `tiny` preset and the GPT-2-shaped `small` preset: a bare PyTorch
loop (forward, backward, AdamW step; no Accelerate, no logging) and our
`train()` loop (Accelerate, clipping, schedule, logging) with a log row
every step and every 10 steps, eager and with `torch.compile`, all at
batch 16 x block 128 in fp32 on the same data. MFU divides achieved
FLOP/s (6N + 12 L C T per token) by this machine's measured matmul peak.
On a GPU pass `--precision bf16`.

`--baseline DIR` also runs the `train()` of another checkout of this
repository (e.g. `git worktree add ../before <commit>`) in the same run,
to measure a change of the loop before and after.

    python benchmarks/training.py [--steps 30] [--presets tiny small]
"""
import argparse
import os
import platform
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llm_from_scratch.data import BatchLoader, load_split, prepare_data
from llm_from_scratch.data import shakespeare
from llm_from_scratch.model import GPT, flops_per_token, preset
from llm_from_scratch.training import TrainConfig, peak_flops, train


def bare_loop(data, name, steps, B, T, compiled, device):
    "Tokens/s of a bare forward/backward/AdamW loop."
    meta, shards = load_split(data, 'train')
    torch.manual_seed(0)
    model = GPT(preset(name, vocab_size=meta['tokenizer']['vocab_size'],
                       block_size=T)).to(device)
    fwd = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = BatchLoader(shards, B, T)
    times = []
    for _ in range(steps):
        x, y = (t.to(device) for t in next(loader))
        t0 = time.perf_counter()
        _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device != 'cpu':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times[steps // 3:])  # after warm-up/compile
    return B * T / dt, flops_per_token(model, T)


TRAIN = """
import json, sys
from llm_from_scratch.training import TrainConfig, train
log = train(TrainConfig(**json.loads(sys.argv[1])), progress=False)
print(json.dumps([r['tokens_per_s'] for r in log]))
"""


def our_loop(data, out, name, steps, B, T, compiled, precision,
             log_every=None, checkout=None):
    "Median tokens/s of `train()` after warm-up, in a fresh process."
    fields = dict(data=str(data), out=str(out), model=name, block_size=T,
                  batch_size=B, max_steps=steps, warmup_steps=1,
                  eval_every=10**9, save_every=10**9, compile=compiled,
                  precision=precision)
    if log_every is not None:  # a field the baseline may not have
        fields['log_every'] = log_every
    env = dict(os.environ)
    if checkout is not None:  # another version of the package
        env['PYTHONPATH'] = str(checkout)
    r = subprocess.run([sys.executable, '-c', TRAIN, json.dumps(fields)],
                       capture_output=True, text=True, env=env, check=True)
    rates = json.loads(r.stdout.strip().splitlines()[-1])
    return statistics.median(rates[len(rates) // 3:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--steps', type=int, default=30)
    ap.add_argument('--presets', nargs='+', default=['tiny', 'small'])
    ap.add_argument('--batch', type=int, default=16)
    ap.add_argument('--block', type=int, default=128)
    ap.add_argument('--precision', default='fp32')
    ap.add_argument('--no-compile', action='store_true')
    ap.add_argument('--baseline', metavar='DIR',
                    help='another checkout whose train() also runs')
    args = ap.parse_args()
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dtype = torch.bfloat16 if args.precision == 'bf16' else torch.float32
    peak = peak_flops(device, dtype)
    name = torch.cuda.get_device_name() if device == 'cuda' else \
        f'{platform.machine()} CPU, {os.cpu_count()} cores, ' \
        f'{torch.get_num_threads()} threads'
    print(f'device: {name}; torch {torch.__version__}; peak '
          f'{peak / 1e9:,.0f} GFLOP/s ({args.precision}, '
          f'{"datasheet" if device == "cuda" else "measured"})')
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        prepare_data(shakespeare(), d / 'data', vocab_size=8192,
                     processes=2)
        B, T = args.batch, args.block
        print(f'batch {B} x block {T}, median of the last '
              f'{args.steps - args.steps // 3} of {args.steps} steps\n')
        print(f'{"preset":8s} {"mode":9s} {"loop":8s} {"tokens/s":>10s} '
              f'{"MFU":>7s}')
        for p in args.presets:
            for compiled in ([False] if args.no_compile else [False, True]):
                mode = 'compiled' if compiled else 'eager'
                tps, fpt = bare_loop(d / 'data', p, args.steps, B, T,
                                     compiled, device)
                print(f'{p:8s} {mode:9s} {"bare":8s} {tps:10,.0f} '
                      f'{tps * fpt / peak:7.1%}')
                loops = [('ours', 1, None), ('ours/10', 10, None)]
                if args.baseline:
                    loops.append(('before', None, args.baseline))
                for label, every, checkout in loops:
                    tps = our_loop(d / 'data', d / f'{p}-{mode}-{label}'
                                   .replace('/', '-'), p, args.steps, B, T,
                                   compiled, args.precision, every, checkout)
                    print(f'{p:8s} {mode:9s} {label:8s} {tps:10,.0f} '
                          f'{tps * fpt / peak:7.1%}')


if __name__ == '__main__':
    main()
