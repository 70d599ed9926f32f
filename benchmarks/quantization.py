#!/usr/bin/env python3
"""Decoding with int8 weights: ours beside float32, bfloat16 and PyTorch's
dynamic quantization, one model, one run.

A GPT-2-124M-shaped model with random weights (speed depends on the shapes,
not the values), its output head untied as in Llama unless `--tied`, greedy
decoding of one sequence by chapter 7's `generate_tokens`:

- ours in float32 and in bfloat16;
- ours int8 (`quantize`: a scale per output channel), with float32
  activations and with bfloat16 activations (the fused CPU kernel);
- PyTorch's `torch.ao.quantization.quantize_dynamic` (int8 weights with a
  scale per matrix, activations quantized on the fly), on the float32 model.

Each line prints tokens/s (1 / the median decode step, best of `--repeat`
runs), the weight bytes one step reads (`bytes_per_token`), the GB/s that
makes, its share of this machine's read bandwidth, and how far the logits of
one forward pass are from float32's (largest difference / largest logit).

    OMP_NUM_THREADS=1 python benchmarks/quantization.py [--tokens 64]
"""
import argparse
import copy
import warnings

import torch
from torch import nn

from llm_from_scratch.generation import memory_bandwidth
from llm_from_scratch.model import GPT, preset
from llm_from_scratch.quantization import (bytes_per_token, quantize,
                                           tokens_per_second)

from generation import machine  # benchmarks/generation.py, beside this


def torch_dynamic(model):
    "The model with PyTorch's dynamic int8 Linear layers, or the error."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8), None
    except Exception as e:  # removed or unsupported on this build
        return None, f'{type(e).__name__}: {e}'


def torch_dynamic_bytes(model):
    "Bytes a step of the dynamic model reads: int8 Linear weights."
    n = sum(m.weight.numel() for m in model.modules()
            if type(m) is nn.Linear and m.weight is not model.tok_emb.weight)
    return bytes_per_token(model) - 3 * n   # 4 bytes -> 1 per weight


@torch.no_grad()
def logit_gap(m, ref, ids):
    "Largest |logit difference| from `ref`, over the largest |logit|."
    a, b = m(ids)[0].float(), ref(ids)[0].float()
    return float((a - b).abs().max() / b.abs().max())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='gpt2-124m', help='a preset')
    ap.add_argument('--tied', action='store_true',
                    help="keep the preset's tied output head (float)")
    ap.add_argument('--tokens', type=int, default=64,
                    help='decode steps per run')
    ap.add_argument('--repeat', type=int, default=3, help='runs per line')
    args = ap.parse_args()
    print(f'{machine()}, torch {torch.__version__}')
    torch.manual_seed(0)
    changes = {} if args.tied else dict(tie_weights=False)
    model = GPT(preset(args.model, **changes)).eval()
    int8 = quantize(copy.deepcopy(model))
    versions = {'ours float32': model,
                'ours bfloat16': copy.deepcopy(model).bfloat16(),
                'ours int8, fp32 activations': int8,
                'ours int8, bf16 activations': copy.deepcopy(int8).bfloat16()}
    dyn, why = torch_dynamic(model)
    if dyn is None:
        print(f'torch quantize_dynamic does not work here: {why}')
    else:
        versions['torch quantize_dynamic (int8)'] = dyn
    bandwidth = memory_bandwidth()['read']
    print(f'{args.model} shapes, output head '
          f'{"tied (stays float)" if args.tied else "untied"}; read '
          f'bandwidth {bandwidth / 1e9:.1f} GB/s; {args.tokens} decode steps,'
          f' best of {args.repeat}')
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    print(f'{"version":31} {"MB/token":>9} {"tokens/s":>9} {"GB/s":>6} '
          f'{"of bw":>6} {"logit gap":>10}')
    for name, m in versions.items():
        tps = max(tokens_per_second(m, args.tokens)
                  for _ in range(args.repeat))
        nb = torch_dynamic_bytes(model) if m is dyn else bytes_per_token(m)
        print(f'{name:31} {nb / 1e6:9.1f} {tps:9.1f} {nb * tps / 1e9:6.2f} '
              f'{nb * tps / bandwidth:6.0%} {logit_gap(m, model, ids):10.1e}')


if __name__ == '__main__':
    main()
