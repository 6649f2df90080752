"""2 ranks prepare the same SFT data: count each rank's encode_chat calls, compare the rows over gloo.

torchrun --nproc_per_node=2 tests/distributed/data_once.py ROWS.jsonl CACHE_DIR OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import mixtral_tune.data as data  # noqa: E402
from mixtral_model import load_tokenizer  # noqa: E402
from mixtral_tune.config import DataConfig  # noqa: E402

path, cache, out = sys.argv[1:4]
calls = 0
encode_chat = data.encode_chat


def counting(*args, **kwargs):
    global calls
    calls += 1
    return encode_chat(*args, **kwargs)


data.encode_chat = counting
cfg = OmegaConf.structured(DataConfig(path=path, kind="sft", max_length=64, cache_dir=cache, num_proc=1))
rank = int(os.environ["RANK"])
prepared = data.prepare_sft_data(cfg, load_tokenizer(), seed=0)
rows = prepared.train.to_list()
dist.init_process_group("gloo")
gathered = [None, None]
dist.all_gather_object(gathered, rows)
result = {"encode_chat_calls": calls, "rows": len(rows), "gathered_equal": gathered[0] == gathered[1]}
(Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
dist.barrier()  # every rank done with gloo before any tears it down
dist.destroy_process_group()
