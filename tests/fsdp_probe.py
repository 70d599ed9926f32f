"""Run under torchrun: shard a model with FSDP2, take one AdamW step and
write what this rank holds to `<out>/rank-<r>.json` (for test_distributed)."""
import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llm_from_scratch.distributed import shard_report, state_bytes
from llm_from_scratch.training import parallelize
from llm_from_scratch.model import GPT, preset

dist.init_process_group('gloo')
torch.manual_seed(0)
model = parallelize(GPT(preset("tiny-llama", vocab_size=512, block_size=32)),
                    "fsdp", dist.get_world_size())
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 512, (2, 32))
model(x, x)[1].backward()
opt.step()
rank = dist.get_rank()
out = Path(sys.argv[1]) / f'rank-{rank}.json'
out.write_text(json.dumps(dict(world=dist.get_world_size(),
                               report=shard_report(model, opt),
                               bytes=state_bytes(model, opt))))
del model, opt  # before the group: gloo aborts the exit otherwise
gc.collect()
dist.destroy_process_group()
