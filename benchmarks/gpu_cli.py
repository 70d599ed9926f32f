"""`llm-from-scratch` as a script path, for benchmarks/gpu.sh.

The console script `llm-from-scratch` calls `llm_from_scratch.cli.main`;
so does this file, which `accelerate launch` and `torchrun` can start by
its path on a machine where the package is only on PYTHONPATH (a copy of
the repository) rather than installed.
"""
import sys

from llm_from_scratch.cli import main

if __name__ == '__main__':
    sys.exit(main())
