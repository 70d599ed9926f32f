#!/usr/bin/env python3
"""The report of benchmarks/gpu.sh: the parts' results in one page.

    python benchmarks/gpu_report.py OUT [--dry] [--quiet]

Reads `OUT/parts/<part>.json` (written by gpu_checklist.py) and
`OUT/parts/<part>.status` (exit status, seconds, limit: written by gpu.sh);
writes `OUT/report.md` and `OUT/report.json` and prints the Markdown.
Standard library only, so that it runs after every part in a moment.
"""
import argparse
import json
import math
import time
from pathlib import Path

PARTS = ['env', 'prepare', 'train-bare-eager', 'train-ours-eager', 'fsdp',
         'decode', 'train-bare-compiled', 'train-ours-compiled']  # in order
SKIPPED = -1  # gpu.sh's status of a part the time budget left no time for


def load_parts(parts):
    "{name: result} and {name: status} of the parts that ran."
    results, status = {}, {}
    for name in PARTS:
        f = Path(parts) / f'{name}.json'
        if f.exists():
            results[name] = json.loads(f.read_text())
        st = Path(parts) / f'{name}.status'
        if st.exists():
            rc, seconds, limit = st.read_text().split()[:3]
            status[name] = dict(rc=int(rc), seconds=int(seconds),
                                limit=int(limit))
    return results, status


def table(header, rows):
    "A Markdown table with aligned columns (text left, numbers right)."
    cells = [header] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return '| ' + ' | '.join(c.ljust(w[i]) if i < 2 else c.rjust(w[i])
                                 for i, c in enumerate(r)) + ' |'
    rule = '|' + '|'.join('-' * (x + 1) + ('-' if i < 2 else ':')
                          for i, x in enumerate(w)) + '|'
    return [line(cells[0]), rule] + [line(r) for r in cells[1:]]


def pct(x):
    return f'{x:.1%}' if x is not None and math.isfinite(x) else '-'


def num(x, spec='.3g'):
    return '-' if x is None else format(x, spec)


def flops(x):
    "FLOP/s in the unit that suits them."
    return f'{x / 1e12:,.1f} TFLOP/s' if x >= 1e12 else \
        f'{x / 1e9:,.1f} GFLOP/s'


def verdict(st):
    if st['rc'] == 0:
        return 'ok'
    if st['rc'] in (124, 137):
        return 'TIMEOUT'
    return 'skipped' if st['rc'] == SKIPPED else f'FAILED ({st["rc"]})'


def failures(status, names):
    "Lines naming the parts in `names` that did not finish."
    bad = [f'- **{k}: {verdict(status[k])}**, see logs/{k}.log'
           for k in names if k in status and status[k]['rc'] != 0]
    return bad + [''] if bad else []


def span(steps):
    if not steps:
        return 'none'
    return f'{steps[0]}-{steps[-1]}' if len(steps) > 1 else str(steps[0])


def header(env, dry):
    "The device, versions and peaks."
    md = [f'- device: {", ".join(env.get("devices", ["?"]))}']
    md += [f'- nvidia-smi -L: {line}' for line in env.get('nvidia_smi', [])]
    md += [f'- torch {env.get("torch")}, CUDA {env.get("cuda")}, '
           f'NCCL {env.get("nccl", "-")}, accelerate '
           f'{env.get("accelerate")}, transformers '
           f'{env.get("transformers")}, Python {env.get("python")}']
    sheet = env.get('datasheet')
    if sheet:
        md += [f'- data sheet ({sheet["model"]}, {sheet["source"]}): '
               f'{sheet["bf16_tflops"]:,.1f} TFLOP/s bf16 dense, '
               f'{sheet["bandwidth_gbs"]:,} GB/s memory']
    elif not dry and env:
        md += ['- data sheet: this GPU is not in DATASHEET '
               '(benchmarks/gpu_checklist.py): no data-sheet MFU']
    if env.get('matmul_flops'):
        md += [f'- measured matmul peak (`matmul_flops`, '
               f'{env["precision"]}): {flops(env["matmul_flops"])}; the '
               f'package\'s `peak_flops` (the MFU column of log.csv): '
               f'{flops(env["package_peak_flops"])}']
    return md + ['']


def training(results, status, peaks):
    "Part 1: tokens/s and MFU of the four loops."
    md = ['## 1. Training: tokens/s and MFU', '']
    train = [results[k] for k in PARTS
             if k.startswith('train-') and k in results]
    if train:
        t = train[0]
        md += [f'Preset `{t["preset"]}` with the corpus\'s vocabulary of '
               f'{t["vocab_size"]:,} ({t["params"] / 1e6:,.1f}M '
               f'parameters; GPT-2\'s 124M counts 50,257 tokens), batch '
               f'{t["batch"]} x {t["block"]}, {t["precision"]}, AdamW, '
               f'clipping; the last {t["timed_steps"]} of {t["steps"]} '
               f'steps (bare: their wall time; ours: the sum of their '
               f'times in log.csv); the same initial weights and batches, '
               f'so the same losses. MFU = tokens/s x '
               f'{t["flops_per_token"] / 1e9:.3f} GFLOP per token / peak.',
               '']
        head = ['loop', 'mode', 'tokens/s'] + [
            f'MFU ({k})' for k in peaks] + ['peak GB', 'last loss']
        rows = []
        for r in train:
            done = r['tokens_per_s'] * r['flops_per_token']
            rows.append([r['loop'], r['mode'], f'{r["tokens_per_s"]:,.0f}'] +
                        [pct(done / p) for p in peaks.values()] +
                        [f'{r["peak_mem_gb"]:.2f}',
                         f'{r["final_loss"]:.4f}'])
        md += table(head, rows) + ['']
        by = {(r['loop'], r['mode']): r['tokens_per_s'] for r in train}
        for mode in ('eager', 'compiled'):
            if ('bare', mode) in by and ('ours', mode) in by:
                md += [f'- ours / bare, {mode}: '
                       f'{by["ours", mode] / by["bare", mode]:.3f}']
        md += ['']
    return md + failures(status, [k for k in PARTS if k.startswith('train')])


def fsdp(results, status):
    "Part 2: the accelerate launch, its checkpoint, the resume."
    md = ['## 2. FSDP through accelerate launch, and resume', '']
    f = results.get('fsdp')
    if f:
        ck, n = f['checkpoint'], f['processes']
        md += [f'`{f["command"]}`', '',
               f'- {n} process{"es" if n > 1 else ""}, {f["preset"]}, '
               f'global batch {f["batch"]} x {f["block"]}, '
               f'{f["precision"]}, {f["steps"]} steps: '
               f'{f["tokens_per_s"]:,.0f} tokens/s (all processes), peak '
               f'memory {f["peak_mem_gb"]:.2f} GB per process',
               f'- sharded checkpoint of step {ck["step"]}: {ck["files"]} '
               f'files ({ck["safetensors"]} safetensors), '
               f'{ck["bytes"] / 1e6:,.1f} MB, world size '
               f'{num(ck["world_size"], "d")}',
               f'- `--resume` from step {f["resume_from"]} (the step-'
               f'{f["steps"]} checkpoint removed): logged steps '
               f'{span(f["resumed_steps"])}, losses finite: '
               f'{"yes" if f["resume_ok"] else "NO"}; largest |loss '
               f'difference| from the first run: '
               f'{num(f["max_loss_diff"])}; '
               f'{num(f["resumed_tokens_per_s"], ",.0f")} tokens/s', '']
    return md + failures(status, ['fsdp'])


def decode(results, status, sheet):
    "Part 3: tokens/s and GB/s of cached decoding."
    md = ['## 3. Decode: tokens/s and achieved memory bandwidth', '']
    d = results.get('decode')
    if d:
        bw = sheet['bandwidth_gbs'] if sheet else None
        md += [f'Preset `{d["preset"]}` ({d["params"] / 1e6:,.1f}M '
               f'parameters, random weights), greedy, {d["prompt"]}-token '
               f'prompts, {d["new_tokens"]} new tokens, median of '
               f'{d["repeat"]}. GB/s = (the weights once per step + the '
               f'KV cache read) x steps/s.'
               + (f' Data sheet: {bw:,} GB/s.' if bw else ''), '']
        head = ['who', 'precision', 'batch', 'tokens/s', 'GB/s'] + (
            ['of data sheet'] if bw else [])
        rows = []
        for r in d['rows']:
            rows.append([r['who'], r['precision'], r['batch'],
                         f'{r["tokens_per_s"]:,.1f}',
                         f'{r["gb_per_s"]:,.2f}'] +
                        ([pct(r['gb_per_s'] / bw)] if bw else []))
        md += table(head, rows) + ['']
        m = d['greedy_tokens_match_transformers']
        if m is not None:
            md += [f'- greedy tokens equal to transformers\' (fp32, batch '
                   f'1): {"yes" if m else "no"}', '']
    return md + failures(status, ['decode'])


def report(out, dry=False):
    "The Markdown report of the parts in `out`; report.md/json written."
    out = Path(out)
    results, status = load_parts(out / 'parts')
    env = results.get('env', {})
    sheet = env.get('datasheet')
    peaks = {}  # MFU's denominators: no data sheet in a dry run
    if sheet and env.get('precision') == 'bf16':
        peaks['data sheet'] = sheet['bf16_tflops'] * 1e12
    if env.get('matmul_flops'):
        peaks['measured peak'] = env['matmul_flops']
    md = [f'# GPU checklist{" (dry run on the CPU)" if dry else ""}', '',
          f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}: '
          f'`bash benchmarks/gpu.sh{" --dry" if dry else ""}`', '']
    md += header(env, dry)
    md += training(results, status, peaks)
    md += fsdp(results, status)
    md += decode(results, status, sheet)
    md += ['## Parts', '']
    md += table(['part', 'result', 'seconds', 'limit'], [
        [k, verdict(st), st['seconds'], st['limit']]
        for k, st in status.items()])
    failed = [k for k, st in status.items() if st['rc'] != 0]
    text = '\n'.join(md) + '\n'
    (out / 'report.md').write_text(text)
    (out / 'report.json').write_text(json.dumps(dict(
        dry=dry, parts=results, status=status, failed=failed, peaks=peaks),
        indent=1))
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('out', help='the output folder of gpu.sh')
    ap.add_argument('--dry', action='store_true')
    ap.add_argument('--quiet', action='store_true', help='write, no print')
    a = ap.parse_args()
    text = report(a.out, a.dry)
    if not a.quiet:
        print(text, end='')


if __name__ == '__main__':
    main()
