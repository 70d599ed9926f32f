#!/usr/bin/env python3
"""Memory and speed of one process vs two under DDP and FSDP, ours beside
bare PyTorch, on this machine's CPU (gloo).

Ours: `llm-from-scratch train` (Accelerate, clipping, schedule, logging,
checkpoints) started alone or by torchrun with `--parallel ddp|fsdp`.
Peer: a bare PyTorch loop (`_bare_parallel.py`: forward, backward, AdamW)
alone, wrapped in DistributedDataParallel, or sharded with `fully_shard`.
Both train the same model on the same global batch. Reported per run:
tokens/s (median after 2 warm-up steps), peak resident memory of the
largest process (includes PyTorch itself, about 0.35 GB; with glibc's
default malloc and with its mmap threshold fixed), and the bytes
of weights and AdamW state one process holds (ours: the checkpoint it
writes; bare: its tensors after the last step).

    python benchmarks/distributed.py [--model gpt2-124m] [--steps 8]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from llm_from_scratch.data import prepare_data, shakespeare
from llm_from_scratch.distributed import torchrun
from llm_from_scratch.training import latest_checkpoint, read_log

HERE = Path(__file__).resolve().parent
EXE = str(Path(sys.executable).parent / 'llm-from-scratch')
# glibc keeps freed blocks below its (dynamic) mmap threshold in the heap;
# fixed at 64 KiB, resident memory follows what tensors hold
MALLOC = {'MALLOC_MMAP_THRESHOLD_': '65536'}


def ours(work, nproc, parallel, a, env):
    out = work / f'{parallel}-{nproc}-{len(env)}'
    args = ['train', '--data', work / 'data', '--out', out, '--model',
            a.model, '--block_size', a.block, '--batch_size', a.batch,
            '--max_steps', a.steps, '--warmup_steps', 1, '--eval_every',
            a.steps, '--save_every', a.steps, '--parallel', parallel]
    if nproc > 1:
        torchrun(nproc, *args, env=env)
    else:
        subprocess.run([EXE, *map(str, args)], check=True,
                       capture_output=True, env={**os.environ, **env})
    log = read_log(out)
    ckpt = latest_checkpoint(out)
    files = [f for f in ckpt.rglob('*') if f.is_file() and
             f.name != 'state.json' and f.name != 'rng.safetensors']
    sizes = [f.stat().st_size for f in files]
    per_process = max(sizes) if parallel == 'fsdp' else sum(sizes)
    return {'tokens/s': statistics.median(r['tokens_per_s']
                                          for r in log[2:]),
            'peak_gb': max(r['peak_mem_gb'] for r in log),
            'state_mb': per_process / 1e6}


def peer(work, nproc, mode, a, env):
    script = [str(HERE / '_bare_parallel.py'), str(work / 'data'), a.model,
              mode, str(a.steps), str(a.batch), str(a.block)]
    if nproc == 1:
        r = subprocess.run([sys.executable, *script], capture_output=True,
                           text=True, env={**os.environ, **env})
    else:
        r = torchrun(nproc, *script[1:], script=script[0], env=env,
                     check=False)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='gpt2-124m', help='model preset')
    p.add_argument('--steps', type=int, default=8)
    p.add_argument('--batch', type=int, default=8, help='global batch')
    p.add_argument('--block', type=int, default=64)
    p.add_argument('--malloc', nargs='+', default=['default', 'fixed'],
                   choices=['default', 'fixed'],
                   help="glibc's dynamic mmap threshold, or fixed at 64 KiB")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp())
    prepare_data(shakespeare()[:80], work / 'data', vocab_size=512,
                 processes=1, progress=False)
    print(f'machine: {platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} CPUs; model {a.model} (vocab 512), global '
          f'batch {a.batch} x {a.block} tokens, {a.steps} steps, fp32')
    print(f'{"malloc":8s} {"run":10s} {"who":5s} {"tokens/s":>9s} '
          f'{"peak GB":>8s} {"state MB/process":>17s}', flush=True)
    for malloc in a.malloc:
        env = {} if malloc == 'default' else MALLOC
        for label, nproc, parallel in (('1 process', 1, 'ddp'),
                                       ('2 x DDP', 2, 'ddp'),
                                       ('2 x FSDP', 2, 'fsdp')):
            mode = 'single' if nproc == 1 else parallel
            for who, r in (('ours', ours(work, nproc, parallel, a, env)),
                           ('bare', peer(work, nproc, mode, a, env))):
                print(f'{malloc:8s} {label:10s} {who:5s} '
                      f'{r["tokens/s"]:9,.0f} {r["peak_gb"]:8.2f} '
                      f'{r["state_mb"]:17,.0f}', flush=True)


if __name__ == '__main__':
    main()
