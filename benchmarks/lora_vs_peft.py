#!/usr/bin/env python3
"""LoRA fine-tuning speed and memory: ours beside `peft`, and full fine-tuning.

Four runs of one plain PyTorch loop (forward, backward, AdamW step) on the
same random token batches, each in a fresh process so that its peak
resident memory is its own: full fine-tuning of our `GPT`; our LoRA
(`add_lora`) on the attention projections; `peft`'s LoRA on the Hugging
Face GPT-2 model holding the same weights (`to_hf`), with the equivalent
adapter (rank 3r on the fused `c_attn`, r on `attn.c_proj`); and full
fine-tuning of that Hugging Face model. Prints tokens/s and the peak
memory each process added after loading PyTorch. peft's fused adapter
trains a full B of (3C, 3r) where ours has three (C, r) blocks, so it
trains more parameters for the same starting function.

    python benchmarks/lora_vs_peft.py [--preset small] [--rank 8]
                                      [--steps 6] [--batch 8] [--block 128]
"""
import argparse
import multiprocessing as mp
import os
import platform
import resource
import sys
import time

import torch

from llm_from_scratch.lora import add_lora
from llm_from_scratch.model import GPT, config_to_hf, preset, to_hf


def rss_mib():
    "Peak resident memory of this process so far, MiB (Linux: KiB units)."
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == 'darwin' else 2**10)


def build(kind, args):
    "The model of run `kind` and a function mapping (x, y) to its loss."
    torch.manual_seed(0)
    config = preset(args.preset, vocab_size=8192, block_size=args.block)
    ours = GPT(config)
    if kind == 'ours full':
        return ours, lambda x, y: ours(x, y)[1]
    if kind == 'ours LoRA':
        add_lora(ours, args.rank, alpha=2.0 * args.rank)
        return ours, lambda x, y: ours(x, y)[1]
    import transformers
    transformers.logging.set_verbosity_error()
    hf_config, _ = config_to_hf(config, 'gpt2')
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**hf_config))
    hf.load_state_dict(to_hf(ours, 'gpt2'), strict=False)
    del ours
    model = hf
    if kind == 'peft LoRA':
        import peft
        r, a = args.rank, 2.0 * args.rank
        model = peft.get_peft_model(hf, peft.LoraConfig(
            r=r, lora_alpha=a, target_modules=['attn.c_attn', 'attn.c_proj'],
            rank_pattern={'attn.c_attn': 3 * r},
            alpha_pattern={'attn.c_attn': 3 * a}, fan_in_fan_out=True))

    def loss(x, y):
        logits = model(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                 y.flatten())
    return model, loss


def run(kind, args, out):
    "Time `args.steps` steps of run `kind`; put the figures in queue `out`."
    import warnings
    warnings.filterwarnings('ignore', category=FutureWarning)
    torch.set_num_threads(args.threads)
    start = rss_mib()
    model, loss_fn = build(kind, args)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 8192, (args.batch, args.block + 1),
                             generator=g) for _ in range(args.steps + 2)]
    times = []
    for b in batches:
        t0 = time.perf_counter()
        loss = loss_fn(b[:, :-1], b[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step = sorted(times[2:])[len(times[2:]) // 2]  # median after warm-up
    out.put(dict(kind=kind, trained=sum(p.numel() for p in params),
                 tokens_per_s=args.batch * args.block / step,
                 peak_mib=rss_mib() - start, loss=loss.item()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--preset', default='small')
    p.add_argument('--rank', type=int, default=8)
    p.add_argument('--steps', type=int, default=6)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--block', type=int, default=128)
    p.add_argument('--threads', type=int,
                   default=int(os.environ.get('OMP_NUM_THREADS', 0)) or
                   torch.get_num_threads())
    args = p.parse_args()
    print(f'{platform.processor() or platform.machine()}, '
          f'{args.threads} threads, torch {torch.__version__}; preset '
          f'{args.preset}, rank {args.rank}, batch {args.batch} x '
          f'{args.block}, {args.steps} steps')
    ctx = mp.get_context('spawn')
    print(f'{"run":12s} {"trained":>12s} {"tokens/s":>10s} '
          f'{"peak MiB":>9s} {"loss":>7s}')
    for kind in ('ours full', 'ours LoRA', 'peft LoRA', 'HF full'):
        q = ctx.Queue()
        proc = ctx.Process(target=run, args=(kind, args, q))
        proc.start()
        r = q.get()
        proc.join()
        print(f'{kind:12s} {r["trained"]:12,d} {r["tokens_per_s"]:10,.0f} '
              f'{r["peak_mib"]:9,.0f} {r["loss"]:7.3f}')


if __name__ == '__main__':
    main()
