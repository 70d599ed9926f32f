#!/usr/bin/env python3
"""Decoding speed against the memory-bandwidth limit, ours beside transformers.

A GPT-2-124M-shaped model with random weights, greedy decoding of the same
prompts by our `generate_tokens` (eager, `torch.compile`d, and compiled
with the weights frozen as constants; fp32 and bf16 weights for the decode
steps; chapter 12's int8 weights eager and frozen) and by
`transformers`' `GPT2LMHeadModel.generate` holding the same weights (fp32
and bf16), at batch 1 and 8. The greedy tokens of ours and theirs in fp32
must be equal (asserted; the frozen versions multiply with other kernels,
so their agreement is printed). Every
decode figure is printed as tokens/s and as GB/s read (the weights once per
step plus the cached keys and values of every sequence), beside the ceiling
that this machine's measured memory bandwidth sets. Then a prefill of a
1,023-token prompt (and one new token), ours beside theirs.

Times: the best of `--repeat` rounds after a warm-up round, the settings
taking turns within a round so that a busy machine slows them alike. A decode
step's time is (time for N new tokens - time for 1) / (N - 1), for both
libraries.

    python benchmarks/generation.py [--new-tokens 100] [--batch 1 8]
"""
import argparse
import os
from copy import deepcopy
import platform
import time

import torch

from llm_from_scratch.generation import (decode_speed, fast_matmul,
                                         generate_tokens, memory_bandwidth,
                                         phase_models, step_bytes)
from llm_from_scratch.quantization import quantize
from llm_from_scratch.model import GPT, n_params, preset, to_hf


def machine():
    "The processor's name, cores and threads used, in a few words."
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                name = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    return (f'{name}, {os.cpu_count()} cores, {torch.get_num_threads()} '
            f'torch threads, load average {load:.1f} at start')


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_once(fn):
    "Seconds of one call of `fn`."
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def interleaved(rows, n, repeat, tokens, device):
    "Best times of n and 1 new tokens per row, rows taking turns; best bw."
    t_n, t_1, bw = {}, {}, 0.0
    for r in range(repeat + 1):  # the first round warms up (and compiles)
        for label, _, fn in rows:
            bw = max(bw, memory_bandwidth(device, cached=False)['best'])
            sync()
            t0 = time.perf_counter()
            tokens[label] = fn(n)
            sync()
            t1 = time.perf_counter()
            fn(1)
            sync()
            t2 = time.perf_counter()
            if r:
                t_n[label] = min(t_n.get(label, t1 - t0), t1 - t0)
                t_1[label] = min(t_1.get(label, t2 - t1), t2 - t1)
    return t_n, t_1, bw


def ours(model, prompts, n, **kw):
    "Our greedy tokens (B, n) as lists."
    steps = list(generate_tokens(model, prompts, n, temperature=0, **kw))
    return torch.stack(steps, 1).tolist()


def theirs(hf, prompts, n):
    "transformers' greedy tokens (B, n) as lists."
    idx = torch.tensor(prompts, device=hf.device)
    with torch.no_grad():
        out = hf.generate(idx, attention_mask=torch.ones_like(idx),
                          max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
    return out[:, idx.shape[1]:].tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--new-tokens', type=int, default=100)
    ap.add_argument('--prompt', type=int, default=16,
                    help='prompt tokens for the decode measurement')
    ap.add_argument('--prefill', type=int, default=1023,
                    help='prompt tokens for the prefill measurement (at '
                    'most 1,023: one new token must fit the context)')
    ap.add_argument('--batch', type=int, nargs='+', default=[1, 8])
    ap.add_argument('--repeat', type=int, default=3)
    ap.add_argument('--no-compile', action='store_true')
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error('--new-tokens must be at least 2')
    import transformers
    transformers.logging.set_verbosity_error()
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    bw = memory_bandwidth(device)
    print(f'machine: {machine()}\ntorch {torch.__version__}, transformers '
          f'{transformers.__version__}')
    print('memory bandwidth (best of 5 over 256 MiB arrays): '
          + ', '.join(f'{k} {v / 1e9:.1f} GB/s' for k, v in bw.items()))
    torch.manual_seed(0)
    fp32 = GPT(preset('gpt2-124m')).to(device).eval()
    bf16, prefill_model = phase_models(fp32)
    fast = fast_matmul(torch.bfloat16, device)
    print(f'bf16 matmul {"as fast as" if fast else "slower than"} fp32 '
          f'here: bf16 prefill {"in bf16" if fast else "in fp32"}')
    # chapter 12: int8 weights with a scale per row (the tied head stays
    # in floating point), bf16 activations for torch's fused int8 kernel
    int8 = quantize(deepcopy(fp32)).to(torch.bfloat16).eval()
    hf32 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        bos_token_id=0, eos_token_id=0)).to(device).eval()
    hf32.load_state_dict(to_hf(fp32, 'gpt2'), strict=False)
    hf16 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        bos_token_id=0, eos_token_id=0)).to(device).eval()
    hf16.load_state_dict(to_hf(fp32, 'gpt2'), strict=False)
    hf16 = hf16.to(torch.bfloat16)
    n, L = args.new_tokens, args.prompt
    print(f'\nGPT-2 124M shape ({n_params(fp32):,} parameters, random '
          f'weights), {L}-token prompts, {n} new greedy tokens, best of '
          f'{args.repeat}')
    ceiling_of = bw['best']
    head = (f"{'':34s} {'tokens/s':>9s} {'GB/s':>6s} {'of bw':>6s} "
            f"{'ceiling tok/s':>13s}")
    summary = {}
    for B in args.batch:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(0, 50257, (B, L), generator=g).tolist()
        rows = [('ours, fp32, eager', fp32,
                 lambda k, m=fp32: ours(m, prompts, k)),
                ('ours, bf16, eager', bf16,
                 lambda k: ours(bf16, prompts, k,
                                prefill_model=prefill_model))]
        if not args.no_compile:
            rows += [('ours, fp32, compiled', fp32,
                      lambda k: ours(fp32, prompts, k, compile=True)),
                     ('ours, bf16, compiled', bf16,
                      lambda k: ours(bf16, prompts, k, compile=True,
                                     prefill_model=prefill_model)),
                     ('ours, fp32, frozen', fp32,
                      lambda k: ours(fp32, prompts, k, compile='frozen')),
                     ('ours, bf16, frozen', bf16,
                      lambda k: ours(bf16, prompts, k, compile='frozen',
                                     prefill_model=prefill_model))]
        rows += [('ours, int8 weights, bf16 in, eager', int8,
                  lambda k: ours(int8, prompts, k,
                                 prefill_model=prefill_model))]
        if not args.no_compile:
            rows += [('ours, int8 weights, frozen', int8,
                      lambda k: ours(int8, prompts, k, compile='frozen',
                                     prefill_model=prefill_model))]
        rows += [('transformers generate, fp32', fp32,
                  lambda k: theirs(hf32, prompts, k)),
                 ('transformers generate, bf16', bf16,
                  lambda k: theirs(hf16, prompts, k))]
        print(f'\nbatch {B}: decode steps\n{head}')
        tokens, speed = {}, {}
        t_n, t_1, seen = interleaved(rows, n, args.repeat, tokens, device)
        ceiling_of = max(ceiling_of, seen)
        print(f'best bandwidth measured between the runs: '
              f'{ceiling_of / 1e9:.1f} GB/s')
        for label, model, fn in rows:
            step = (t_n[label] - t_1[label]) / (n - 1)
            speed[label] = d = decode_speed(model, step, B, L + n // 2,
                                            ceiling_of)
            print(f"{label:34s} {d['tokens_per_s']:9.1f} "
                  f"{d['gb_per_s']:6.1f} {d['of_bandwidth']:6.0%} "
                  f"{d['ceiling']:13.1f}")
        assert tokens['ours, fp32, eager'] == \
            tokens['transformers generate, fp32'], 'greedy tokens differ'
        for label in tokens:
            if 'fp32' in label and 'frozen' not in label:
                assert tokens[label] == tokens['ours, fp32, eager'], label
        same16 = sum(a == b for ra, rb in zip(
            tokens['ours, bf16, eager'], tokens['transformers generate, bf16'])
            for a, b in zip(ra, rb)) / (B * n)
        same8 = sum(a == b for ra, rb in zip(
            tokens['ours, int8 weights, bf16 in, eager'],
            tokens['ours, fp32, eager']) for a, b in zip(ra, rb)) / (B * n)
        print(f'int8: {same8:.0%} of greedy tokens equal to ours fp32')
        for label in tokens:
            if 'frozen' in label:
                base = label.replace('frozen', 'eager').replace(
                    'int8 weights', 'int8 weights, bf16 in')
                same = sum(a == b for ra, rb in zip(
                    tokens[label], tokens[base])
                    for a, b in zip(ra, rb)) / (B * n)
                print(f'{label}: {same:.0%} of greedy tokens equal to '
                      f'{base}')
        print(f'greedy tokens: ours fp32 (eager and compiled) == '
              f'transformers fp32; bf16: {same16:.0%} of tokens equal to '
              f"transformers' bf16 (rounding differs)")
        for fmt in ('fp32', 'bf16'):
            ref = speed[f'transformers generate, {fmt}']['tokens_per_s']
            for label, d in speed.items():
                mine = 'int8' in label if fmt == 'fp32' else False
                if label.startswith('ours') and (
                        mine or fmt in label and 'int8' not in label):
                    print(f'  {label:32s} {d["tokens_per_s"] / ref:5.2f}x '
                          f'transformers {fmt}')
        best_ours = max((d for k, d in speed.items()
                         if k.startswith('ours')),
                        key=lambda d: d['tokens_per_s'])
        summary[B] = (best_ours, speed['transformers generate, fp32'])

    T = min(args.prefill, fp32.config.block_size - 1)  # + 1 new token
    print(f'\nprefill: one {T}-token prompt, time to the first token')
    idx = torch.randint(0, 50257, (1, T)).tolist()
    pre = [('ours, fp32', lambda: ours(fp32, idx, 1)),
           ('ours, bf16 weights, prefill as chosen',
            lambda: ours(bf16, idx, 1, prefill_model=prefill_model)),
           ('transformers generate, fp32', lambda: theirs(hf32, idx, 1)),
           ('transformers generate, bf16', lambda: theirs(hf16, idx, 1))]
    times = {}
    for r in range(args.repeat + 1):  # taking turns; round 0 warms up
        for label, fn in pre:
            t = timed_once(fn)
            if r:
                times[label] = min(times.get(label, t), t)
    for label, fn in pre:
        print(f'{label:40s} {times[label]:6.3f} s  '
              f'{T / times[label]:8,.0f} tokens/s')
    print(f"ours/transformers fp32 prefill speed: "
          f"{times['transformers generate, fp32'] / times['ours, fp32']:.2f}x")
    print(f'\nper step at batch 1 this model reads '
          f'{step_bytes(fp32, 1, L + n // 2) / 1e6:.0f} MB in fp32, '
          f'{step_bytes(bf16, 1, L + n // 2) / 1e6:.0f} MB in bf16')
    for B, (o, t) in summary.items():
        print(f'batch {B}: fastest of ours {o["tokens_per_s"]:.1f} tokens/s '
              f'= {o["tokens_per_s"] / t["tokens_per_s"]:.2f}x transformers '
              f'fp32, {o["of_bandwidth"]:.0%} of the measured bandwidth')


if __name__ == '__main__':
    main()
