#!/usr/bin/env python3
"""Evaluation speed: our harness beside lm-evaluation-harness, same model.

A small GPT-2-kind model is trained briefly on the plays that chapter 10
does not hold out and exported with `export_checkpoint(..., format='hf')`.
Both harnesses score that folder on the same multiple-choice tasks (the
first `--items` items of `next_word` and `next_line`, written for lm-eval
with `to_lm_eval`), in one process, with the same threads and batch size:
ours with `read_task` and `evaluate_task` on the JSON Lines files that
lm-eval reads (the model read by `load_for_generation`, the tokenizer file
by chapter 1's `Tokenizer.load`), theirs with `lm_eval.simple_evaluate`
on an `HFLM` built once, outside the timing; both timings include reading
the tasks.
Each repeat times both; the table gives items/s at the best and the median
repeat, and every repeat checks that the accuracies agree exactly. A last,
untimed run of the harness with its samples logged gives the largest
difference between the two log-likelihoods of one choice.

    python benchmarks/evaluation.py [--items 200] [--repeat 3]
                                    [--batch 16] [--threads N]
"""
import argparse
import contextlib
import io
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from llm_from_scratch.data import prepare_data
from llm_from_scratch.distributed import export_checkpoint
from llm_from_scratch.evaluation import (evaluate_task, load_task,
                                         read_task, split_plays, to_lm_eval)
from llm_from_scratch.generation import load_for_generation
from llm_from_scratch.model import n_params
from llm_from_scratch.tokenizer import Tokenizer
from llm_from_scratch.training import TrainConfig, train

TASKS = ('next_word', 'next_line')


def cpu_name():
    "The processor's model name, as lscpu prints it."
    with contextlib.suppress(OSError):
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def trained_model(work, steps):
    "Prepare, train and export (Hugging Face format) once; the export."
    hf = work / 'hf'
    if not hf.exists():
        prepare_data(split_plays()[0][:200], work / 'data', vocab_size=1024)
        train(TrainConfig(data=str(work / 'data'), out=str(work / 'run'),
                          block_size=64, batch_size=16, max_steps=steps,
                          eval_every=steps, eval_batches=2,
                          save_every=steps), progress=False)
        export_checkpoint(work / 'run', hf, format='hf')
    return hf


def harness(lm_eval, lm, folder, samples=False):
    "lm-eval's results (and samples) on the tasks in `folder`, quietly."
    from lm_eval.tasks import TaskManager
    with contextlib.redirect_stderr(io.StringIO()):
        return lm_eval.simple_evaluate(
            model=lm, tasks=list(TASKS), log_samples=samples,
            task_manager=TaskManager(include_path=str(folder),
                                     include_defaults=False),
            verbosity='ERROR')


def agree(ours, theirs):
    "Whether every accuracy of ours equals the harness's."
    return all(ours[t][k] == theirs['results'][t][f'{k},none']
               for t in TASKS for k in ('acc', 'acc_norm'))


def largest_difference(ours, theirs):
    "The largest |ours - theirs| of one choice's log-likelihood."
    worst = 0.0
    for t in TASKS:
        rows = sorted(theirs['samples'][t], key=lambda s: s['doc_id'])
        for s, r in zip(rows, ours[t]['per_item']):
            for a, (b, _) in zip(r['lls'], s['filtered_resps']):
                worst = max(worst, abs(a - b))
    return worst


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--items', type=int, default=200)
    p.add_argument('--repeat', type=int, default=3)
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--steps', type=int, default=60)
    p.add_argument('--threads', type=int,
                   default=int(os.environ.get('OMP_NUM_THREADS', 0)) or
                   torch.get_num_threads())
    p.add_argument('--work', default=None,
                   help='folder for the model (kept: reused next time)')
    args = p.parse_args()
    warnings.filterwarnings('ignore')
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    work = Path(args.work or tempfile.mkdtemp())
    hf = trained_model(work, args.steps)
    tasks = {t: load_task(t) for t in TASKS}
    tasks = {t: replace(x, items=x.items[:args.items])
             for t, x in tasks.items()}
    folder = Path(tempfile.mkdtemp())
    for task in tasks.values():
        to_lm_eval(task, folder)
    model, _ = load_for_generation(hf, device='cpu')
    tok = Tokenizer.load(hf / 'tokenizer.json')
    with contextlib.redirect_stderr(io.StringIO()):  # a loading bar
        lm = HFLM(pretrained=str(hf), device='cpu', batch_size=args.batch)
    print(f'{cpu_name()}, {args.threads} threads, torch {torch.__version__},'
          f' lm-eval {lm_eval.__version__}; GPT-2 kind, '
          f'{n_params(model):,} parameters, context '
          f'{model.config.block_size}; {args.items} items each of '
          f'{" and ".join(TASKS)}, batch {args.batch}, {args.repeat} '
          f'repeats')
    times = {'ours': [], 'lm-eval': []}
    for _ in range(args.repeat):
        t0 = time.perf_counter()  # from the files lm-eval reads too
        ours = {t: evaluate_task(model, tok, read_task(
            folder / f'{t}.jsonl', delimiter=x.delimiter),
            batch_size=args.batch) for t, x in tasks.items()}
        times['ours'].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs = harness(lm_eval, lm, folder)
        times['lm-eval'].append(time.perf_counter() - t0)
        assert agree(ours, theirs), 'the accuracies differ'
    n = sum(len(x.items) for x in tasks.values())  # --items, at most all
    print(f'\n{"harness":9s} {"items/s best":>13s} {"items/s median":>15s}')
    for name, ts in times.items():
        print(f'{name:9s} {n / min(ts):13.1f} '
              f'{n / statistics.median(ts):15.1f}')
    diff = largest_difference(ours, harness(lm_eval, lm, folder, True))
    speed = statistics.median(times['lm-eval']) / statistics.median(
        times['ours'])
    print(f'\nours / lm-eval (median): {speed:.2f}x; accuracies equal in '
          f'all {args.repeat} repeats: '
          + ', '.join(f"{t} acc {ours[t]['acc']:.3f} acc_norm "
                      f"{ours[t]['acc_norm']:.3f}" for t in TASKS)
          + f'; largest log-likelihood difference {diff:.1e}')


if __name__ == '__main__':
    main()
