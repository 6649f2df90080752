"""A hub checkpoint loaded per rank with expert_parallel_size=2, and saved back as one complete checkpoint.

    torchrun --nproc_per_node 2 tests/distributed/ep_checkpoint.py WORKDIR OUT.json

1. rank 0 writes a sharded hub checkpoint with transformers' MixtralForCausalLM;
2. every rank loads it with expert_parallel_size=2, recording which tensors it reads: all dense
   tensors and its own experts' only;
3. each rank's logits equal transformers' on that rank's batch;
4. strictness: a checkpoint missing one of rank 1's expert tensors fails on both ranks, naming rank 1
   (rank 0 does not read that tensor), and a stray key fails on both;
5. save_pretrained (fp32, then bf16) writes one complete checkpoint on rank 0 only, tensors equal to
   the original's; transformers loads the fp32 one with logits equal to the original's.
Rank 0 writes what it found to OUT.json. Launched by tests/test_expert_parallel.py.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
import transformers.modeling_utils
from safetensors.torch import load_file, save_file

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

from mixtral_reference import tiny_config  # noqa: E402

from mixtral_model import CheckpointError, MixtralForCausalLM  # noqa: E402
from mixtral_model.testing import max_relative_diff  # noqa: E402

EXPERTS_OF_RANK = {0: {0, 1}, 1: {2, 3}}


class RecordingSafeOpen:
    """safe_open whose tensor slices note their key when read (transformers materialises by slicing)."""

    def __init__(self, inner, reads: set):
        self._inner, self._reads = inner, reads

    def get_slice(self, key):
        return RecordingSlice(self._inner.get_slice(key), key, self._reads)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class RecordingSlice:
    def __init__(self, inner, key: str, reads: set):
        self._inner, self._key, self._reads = inner, key, reads

    def __getitem__(self, index):
        self._reads.add(self._key)
        return self._inner[index]

    def __getattr__(self, name):
        return getattr(self._inner, name)


def load_recording_reads(path, **kwargs):
    reads: set[str] = set()
    original = transformers.modeling_utils.safe_open
    transformers.modeling_utils.safe_open = lambda *a, **k: RecordingSafeOpen(original(*a, **k), reads)
    try:
        model = MixtralForCausalLM.from_pretrained(path, **kwargs)
    finally:
        transformers.modeling_utils.safe_open = original
    return model, reads


def expert_of(key: str) -> int | None:
    if ".block_sparse_moe.experts." not in key:
        return None
    return int(key.split(".block_sparse_moe.experts.")[1].split(".")[0])


def batch(rank: int) -> torch.Tensor:
    return torch.randint(0, 97, (2, 7 + 2 * rank), generator=torch.Generator().manual_seed(rank))


def hub_keys(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def edited_copy(source: Path, target: Path, edit) -> None:
    """A single-file copy of the checkpoint at `source`, edited."""
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    tensors = hub_keys(source)
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})


def load_error(path) -> str | None:
    try:
        MixtralForCausalLM.from_pretrained(path, expert_parallel_size=2)
    except CheckpointError as error:
        return str(error)
    return None


def main(work: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    work = Path(work)
    hub = work / "hub"
    if rank == 0:
        torch.manual_seed(0)
        reference = transformers.MixtralForCausalLM(transformers.MixtralConfig(**tiny_config()))
        reference.save_pretrained(hub, max_shard_size="60KB")
        edited_copy(
            hub, work / "missing", lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight")
        )
        edited_copy(hub, work / "stray", lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    dist.barrier()
    reference = transformers.MixtralForCausalLM.from_pretrained(hub)
    original = hub_keys(hub)

    model, reads = load_recording_reads(hub, expert_parallel_size=2)
    found = {
        "shards": len(list(hub.glob("*.safetensors"))),
        "experts_read": sorted({expert_of(k) for k in reads} - {None}),
        "dense_read_all": {k for k in original if expert_of(k) is None} <= reads,
        "state_dict_experts": sorted({expert_of(k) for k in model.state_dict()} - {None}),
    }
    with torch.no_grad():
        found["logits_vs_transformers"] = max_relative_diff(
            model(batch(rank)).logits, reference(batch(rank)).logits
        )
    found["missing_rank1_expert_error"] = load_error(work / "missing")
    found["stray_key_error"] = load_error(work / "stray")

    for dtype in (torch.float32, torch.bfloat16):
        saved = work / f"saved_{str(dtype)[6:]}_rank{rank}"
        model.to(dtype).save_pretrained(saved)
        found[f"{dtype} wrote_files"] = saved.exists() and any(saved.iterdir())
        if rank == 0:
            written = hub_keys(saved)
            found[f"{dtype} same_keys"] = set(written) == set(original)
            found[f"{dtype} tensors_equal"] = all(
                torch.equal(written[k], original[k].to(dtype)) for k in original if k in written
            )
            found[f"{dtype} saved_config_has_ep"] = "expert_parallel_size" in json.loads(
                (saved / "config.json").read_text()
            )
            if dtype == torch.float32:
                reloaded = transformers.MixtralForCausalLM.from_pretrained(saved)
                with torch.no_grad():
                    found["reloaded_logits_vs_original"] = max_relative_diff(
                        reloaded(batch(0)).logits, reference(batch(0)).logits
                    )

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {k: sorted(v) if isinstance(v, set) else v for k, v in found.items()})
    if rank == 0:
        Path(out_path).write_text(json.dumps({str(r): g for r, g in enumerate(gathered)}, indent=1))
    dist.barrier()  # every rank done with gloo before any tears it down
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
