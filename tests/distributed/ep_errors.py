"""EP layout errors that need a process group (creating the EP groups): expert_parallel_size larger
than the world, and a world size that is not a multiple of it.

    torchrun --nproc_per_node 3 tests/distributed/ep_errors.py OUT.json

Rank 0 writes {expert_parallel_size: error message}. Launched by tests/test_expert_parallel.py.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

from mixtral_parallel.expert_parallel import new_expert_parallel_groups  # noqa: E402


def construction_error(expert_parallel_size: int) -> str | None:
    try:
        new_expert_parallel_groups(expert_parallel_size)
    except ValueError as error:
        return str(error)
    return None


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    errors = {ep: construction_error(ep) for ep in (2, 4)}
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(errors))
    dist.barrier()  # every rank done with gloo before any tears it down
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
