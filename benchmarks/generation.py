#!/usr/bin/env python3
"""Decoding speed: ours (with and without the KV cache) beside transformers.

A GPT-2-124M-shaped model with random weights, batch 1, a 16-token prompt,
200 new greedy tokens: tokens/s of our `generate` with the cache, without
it, and of `transformers`' `GPT2LMHeadModel.generate` holding the same
weights (checked to produce the same tokens), eager and with
`torch.compile` applied to our model. On a GPU it also reports the memory
bandwidth achieved (weight bytes read per token x tokens/s).

    python benchmarks/generation.py [--new-tokens 200] [--no-compile]
"""
import argparse
import os
import platform
import statistics
import time

import torch

from llm_from_scratch.generation import generate
from llm_from_scratch.model import GPT, n_params, preset, to_hf


def timed(fn, repeat):
    "Median seconds of `repeat` calls of `fn` (after one warm-up call)."
    out = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--new-tokens', type=int, default=200)
    ap.add_argument('--repeat', type=int, default=3)
    ap.add_argument('--no-compile', action='store_true')
    args = ap.parse_args()
    import transformers
    transformers.logging.set_verbosity_error()
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    name = torch.cuda.get_device_name() if device == 'cuda' else \
        f'{platform.machine()} CPU, {os.cpu_count()} cores'
    print(f'device: {name}; torch {torch.__version__}; transformers '
          f'{transformers.__version__}')
    torch.manual_seed(0)
    ours = GPT(preset('gpt2-124m')).to(device).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        bos_token_id=0, eos_token_id=0)).to(device).eval()
    hf.load_state_dict(to_hf(ours, 'gpt2'), strict=False)
    prompt = torch.randint(0, 50257, (16,)).tolist()
    n = args.new_tokens
    print(f'GPT-2 124M shape ({n_params(ours):,} parameters, random '
          f'weights), fp32, batch 1, {len(prompt)}-token prompt, {n} new '
          f'tokens, median of {args.repeat}\n')

    def run_ours(model, cache):
        return generate(model, [prompt], n, temperature=0,
                        use_cache=cache)[0]

    def run_hf():
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt], device=device),
                              max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist()
    rows = []
    t_hf, hf_tokens = timed(run_hf, args.repeat)
    t_cache, our_tokens = timed(lambda: run_ours(ours, True), args.repeat)
    assert our_tokens == hf_tokens, 'greedy outputs differ'
    t_plain, _ = timed(lambda: run_ours(ours, False), 1)
    rows += [('ours, KV cache, eager', t_cache),
             ('ours, no cache, eager', t_plain),
             ('transformers generate', t_hf)]
    if not args.no_compile:
        compiled = torch.compile(ours, dynamic=True)
        compiled.config = ours.config
        t_comp, tokens = timed(lambda: run_ours(compiled, True),
                               args.repeat)
        assert tokens == hf_tokens
        rows.append(('ours, KV cache, compiled', t_comp))
    weight_bytes = sum(p.numel() * p.element_size()
                       for p in ours.parameters())
    for label, t in rows:
        tps = n / t
        extra = f'   {weight_bytes * tps / 1e9:6.1f} GB/s of weights' \
            if device == 'cuda' else ''
        print(f'{label:28s} {tps:8.1f} tokens/s{extra}')
    print(f'\ncache speed-up over no cache: {t_plain / t_cache:.1f}x; '
          f'over transformers: {t_hf / t_cache:.2f}x')


if __name__ == '__main__':
    main()
