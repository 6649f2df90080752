"""`python bench/gpu_check.py` (or `python -m bench.gpu_check`): parse the options, run the sections in
order under the time budget, write the report files."""

import argparse
import sys
import time

import torch

import bench.gpu_check
from bench.gpu_check.attention import attention
from bench.gpu_check.common import REPO, Run, log
from bench.gpu_check.environment import environment
from bench.gpu_check.experts import experts
from bench.gpu_check.mixtral_8x7b_qlora import mixtral_8x7b_qlora
from bench.gpu_check.nf4_build import nf4_build
from bench.gpu_check.profile import profile
from bench.gpu_check.qlora_memory import qlora_memory
from bench.gpu_check.training import training

# seconds a section needs on a GPU: the whole model about a minute to build and run 10 steps on an H100
MIN_SECONDS = {"mixtral_8x7b_qlora": 90, "profile": 30}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=bench.gpu_check.__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default=str(REPO / "bench" / "results"), help="directory for the .md and .json"
    )
    parser.add_argument(
        "--budget-s", type=float, default=450.0, help="total seconds; later sections are skipped"
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (automatic without CUDA)")
    parser.add_argument("--layers", type=int, default=None, help="layers of the training comparison (GPU: 4)")
    parser.add_argument("--only", default=None, help="comma-separated section names to run (default: all)")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    run = Run(args)
    if run.dry:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    log(f"gpu_check on {run.gpu}: writing {run.md_path} and {run.json_path}")
    sections = [
        environment,
        nf4_build,
        attention,
        experts,
        training,
        qlora_memory,
        mixtral_8x7b_qlora,
        profile,
    ]
    only = set(args.only.split(",")) if args.only else {f.__name__ for f in sections}
    unknown = only - {f.__name__ for f in sections}
    if unknown:
        parser.error(
            f"--only: unknown sections {sorted(unknown)}; choose from {[f.__name__ for f in sections]}"
        )
    for fn in sections:
        if fn.__name__ in only:
            run.section(fn.__name__, fn, min_seconds=0 if run.dry else MIN_SECONDS.get(fn.__name__, 0))
    failed = [s.name for s in run.sections if s.status in ("error", "checks failed")]
    log(
        f"done in {time.perf_counter() - run.start:.0f} s; {run.md_path}; sections not ok: {failed or 'none'}"
    )
    return 0
