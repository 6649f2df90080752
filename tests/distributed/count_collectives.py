"""Run a pipeline entry point with torch.distributed's collectives counted: the bytes each rank sends.

    torchrun --nproc_per_node 2 tests/distributed/count_collectives.py OUT_PREFIX train/sft.py OVERRIDES...

The collectives are wrapped before DeepSpeed binds them. Bytes a rank sends, over a group of S ranks
(ring algorithms): all-gather S-1 times its input; reduce-scatter (S-1)/S of its input; all-reduce
2(S-1)/S of its tensor; all-to-all the rows it addresses to other ranks. Each rank writes
OUT_PREFIX.rank<R>.json at exit. Launched by tests/test_estimate.py.
"""

import atexit
import inspect
import json
import os
import runpy
import sys
from collections import defaultdict

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

out_prefix, script = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(script))))
sent: dict[str, float] = defaultdict(float)


def nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def size(group) -> int:
    return dist.get_world_size(group)


def all_to_all_bytes(a) -> float:
    tensor, splits, n = a["input"], a.get("input_split_sizes"), size(a.get("group"))
    if tensor.dim() < 2:  # the per-expert counts
        return 0
    splits = splits or [tensor.shape[0] // n] * n
    me = dist.get_rank(a.get("group"))
    return sum(rows for peer, rows in enumerate(splits) if peer != me) * nbytes(tensor[0])


COUNTED = {  # name -> (kind, bytes this rank sends given the bound arguments)
    "all_gather_into_tensor": (
        "all_gather",
        lambda a: nbytes(a["input_tensor"]) * (size(a.get("group")) - 1),
    ),
    "_all_gather_base": ("all_gather", lambda a: nbytes(a["input_tensor"]) * (size(a.get("group")) - 1)),
    "all_gather": ("all_gather", lambda a: nbytes(a["tensor"]) * (size(a.get("group")) - 1)),
    "reduce_scatter_tensor": (
        "reduce_scatter",
        lambda a: nbytes(a["input"]) * (size(a.get("group")) - 1) / size(a.get("group")),
    ),
    "all_reduce": (
        "all_reduce",
        lambda a: 2 * nbytes(a["tensor"]) * (size(a.get("group")) - 1) / size(a.get("group")),
    ),
    "all_to_all_single": ("all_to_all", all_to_all_bytes),
}


def wrap(name: str, kind: str, count) -> None:
    original = getattr(c10d, name)
    signature = inspect.signature(original)

    def counted(*args, **kwargs):
        sent[kind] += count(signature.bind(*args, **kwargs).arguments)
        return original(*args, **kwargs)

    setattr(c10d, name, counted)
    setattr(dist, name, counted)


for name, (kind, count) in COUNTED.items():
    wrap(name, kind, count)


@atexit.register
def write() -> None:
    with open(f"{out_prefix}.rank{os.environ['RANK']}.json", "w") as f:
        json.dump(sent, f)


runpy.run_path(script, run_name="__main__")
