#!/usr/bin/env python3
"""Serving: continuous batching against one request at a time, over HTTP.

The server (`llm_from_scratch.serving`, a `small`-preset model with random
weights) runs in its own process on the loopback interface; the client
opens 1, 4 and 16 concurrent streams of `/v1/completions` requests
(server-sent events, greedy, a fixed number of new tokens) and measures
requests/s, generated tokens/s and the median time to the first token.
Each setting runs twice: the server with 16 slots (continuous batching)
and with 1 slot (one request at a time, the others wait). Bounded: a fixed
number of requests per stream and a time limit per setting.

    python benchmarks/serving.py [--max-tokens 48] [--per-stream 2]
"""
import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import httpx


def model_and_tokenizer():
    import torch

    from llm_from_scratch.model import GPT, preset
    from llm_from_scratch.tokenizer import Tokenizer, load_corpus
    tok = Tokenizer.train(load_corpus()[:50_000], 512)
    torch.manual_seed(0)
    return GPT(preset('small', vocab_size=tok.vocab_size)).eval(), tok


def serve(port, slots):
    "The server process: serve the benchmark model until killed."
    import uvicorn

    from llm_from_scratch.serving import Engine, make_app
    model, tok = model_and_tokenizer()
    engine = Engine(model, tok, n_slots=slots).start()
    uvicorn.run(make_app(engine, 'bench'), host='127.0.0.1', port=port,
                log_level='warning')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_server(slots):
    port = free_port()
    p = subprocess.Popen([sys.executable, __file__, '--serve', str(port),
                          str(slots)])
    url = f'http://127.0.0.1:{port}'
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + '/health').status_code == 200:
                return p, url
        except httpx.TransportError:
            time.sleep(0.2)
    p.kill()
    raise RuntimeError('the server did not start')


async def one_request(client, url, max_tokens, prompt):
    "(seconds to the first token, total seconds, tokens) of one stream."
    body = dict(model='bench', prompt=prompt, max_tokens=max_tokens,
                temperature=0, stream=True,
                stream_options=dict(include_usage=True))
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream('POST', url + '/v1/completions',
                             json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith('data: {'):
                continue
            chunk = json.loads(line[6:])
            if chunk.get('usage'):
                tokens = chunk['usage']['completion_tokens']
            elif first is None and chunk['choices'][0]['text']:
                first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, tokens


async def load(url, streams, per_stream, max_tokens, limit_s):
    "Run `streams` clients of `per_stream` requests each; the figures."
    results, t0 = [], time.perf_counter()

    async def client_loop(k):
        async with httpx.AsyncClient(timeout=600) as client:
            for i in range(per_stream):
                if time.perf_counter() - t0 > limit_s:
                    return
                results.append(await one_request(
                    client, url, max_tokens, f'ROMEO {k} {i}: my lord,'))

    await asyncio.gather(*(client_loop(k) for k in range(streams)))
    seconds = time.perf_counter() - t0
    ttft = [r[0] for r in results if r[0] is not None]
    return dict(requests=len(results), seconds=seconds,
                req_s=len(results) / seconds,
                tok_s=sum(r[2] for r in results) / seconds,
                ttft=statistics.median(ttft) if ttft else float('nan'))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--max-tokens', type=int, default=48)
    ap.add_argument('--per-stream', type=int, default=2)
    ap.add_argument('--limit-s', type=float, default=60,
                    help='stop starting requests after this many seconds')
    ap.add_argument('--streams', default='1,4,16')
    ap.add_argument('--serve', nargs=2, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        return serve(*a.serve)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(':', 1)[1].strip() for line in
                   open('/proc/cpuinfo') if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    print(f'# machine: {cpu}, {os.cpu_count()} CPUs; server and client on '
          f'loopback; `small` preset, {a.max_tokens} new tokens per '
          f'request, greedy')
    print('| server | streams | requests | requests/s | tokens/s | '
          'median time to first token |')
    print('|---|---:|---:|---:|---:|---:|')
    for slots, name in [(16, 'continuous batching, 16 slots'),
                        (1, 'one at a time, 1 slot')]:
        p, url = start_server(slots)
        try:
            asyncio.run(load(url, 1, 1, 4, 30))  # warm-up
            for n in map(int, a.streams.split(',')):
                r = asyncio.run(load(url, n, a.per_stream, a.max_tokens,
                                     a.limit_s))
                print(f'| {name} | {n} | {r["requests"]} | '
                      f'{r["req_s"]:.2f} | {r["tok_s"]:.0f} | '
                      f'{r["ttft"] * 1000:.0f} ms |', flush=True)
        finally:
            p.terminate()
            p.wait(30)


if __name__ == '__main__':
    main()
