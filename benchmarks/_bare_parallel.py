"""The peer for benchmarks/distributed.py: a bare PyTorch loop (forward,
backward, AdamW; no Accelerate, no logging, no clipping) in one process,
under DDP or with FSDP2's fully_shard. Run by torchrun (or alone for
'single'); rank 0 prints one JSON line."""
import gc
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from llm_from_scratch.data import BatchLoader, load_split
from llm_from_scratch.distributed import state_bytes
from llm_from_scratch.model import GPT, preset
from llm_from_scratch.training import peak_memory_gb

data, name, mode, steps, B, T = sys.argv[1], sys.argv[2], sys.argv[3], \
    *map(int, sys.argv[4:7])
if mode != 'single':
    dist.init_process_group('gloo')
rank = dist.get_rank() if mode != 'single' else 0
world = dist.get_world_size() if mode != 'single' else 1
meta, shards = load_split(data, 'train')
torch.manual_seed(0)
model = GPT(preset(name, vocab_size=meta['tokenizer']['vocab_size'],
                   block_size=T))
if mode == 'fsdp':  # bare FSDP2: each block, then the root
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
elif mode == 'ddp':
    model = DistributedDataParallel(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
loader = BatchLoader(shards, B // world, T, 'random', 0, rank, world)
times = []
for _ in range(steps):
    x, y = next(loader)
    t0 = time.perf_counter()
    _, loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
rss = peak_memory_gb('cpu')
held = sum(state_bytes(model, opt).values())
stats = torch.tensor([rss, held])
if mode != 'single':
    gathered = [torch.zeros(2, dtype=stats.dtype) for _ in range(world)]
    dist.all_gather(gathered, stats)
    stats = torch.stack(gathered).max(0).values
    del model, opt  # before the group: gloo aborts the exit otherwise
    gc.collect()
    dist.destroy_process_group()
if rank == 0:
    print(json.dumps({'tokens/s': B * T / statistics.median(times[2:]),
                      'peak_gb': float(stats[0]),
                      'state_mb': float(stats[1]) / 1e6}))
