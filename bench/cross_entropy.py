"""Forward + backward of the chunked cross entropy (`mixtral_model/cross_entropy.py`) on (N, V) logits:
this worktree's version against the one at a git revision (default HEAD), in one process, and both
against float64 for accuracy.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/cross_entropy.py --before HEAD~1 [--rounds 7]
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/cross_entropy.py --chunk-kib 256 1024 4096   # sweep

Timing: CPU time (`time.process_time`, so page faults of the fresh gradient count) of
`loss = ce(logits, labels); autograd.grad(loss, logits)`, versions run round-robin, medians. Cases: bf16
and fp32 logits, with no ignored label and with a quarter of the rows ignored (a prompt of 128 masked in
each sequence of 512). `--chunk-kib` times this worktree's version at several CPU chunk sizes instead.
Accuracy, on fp32 logits: loss and gradient against `F.cross_entropy` in float64, as the tests measure
(max |x - x64| / max |x64|) and elementwise (max |x - x64| / |x64| over nonzero x64), for randn * 3
logits, the same with each label's logit + 15 (peaked), and randn * 4 + 200 (far from 0);
`F.cross_entropy(logits.float())` is the yardstick.
"""

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mixtral_model.testing import max_relative_diff

ROOT = Path(__file__).resolve().parents[1]
MODULE = "mixtral_model/cross_entropy.py"


def load_version(revision: str | None):
    """The cross-entropy module of this worktree (None) or of a git revision, imported under its own name."""
    if revision is None:
        path = ROOT / MODULE
    else:
        source = subprocess.run(
            ["git", "show", f"{revision}:{MODULE}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
        path = Path(tempfile.mkdtemp()) / "cross_entropy_before.py"
        path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"ce_{revision or 'worktree'}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fwd_bwd(module, logits, labels, divisor):
    logits = logits.detach().requires_grad_()
    loss = module.cross_entropy_sum(logits, labels, -100, divisor)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


def reference(logits, labels, divisor, dtype):
    logits = logits.detach().to(dtype).requires_grad_()
    loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / divisor
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


def max_elementwise_relative_diff(actual, expected):
    nonzero = expected != 0
    return ((actual.double() - expected)[nonzero].abs() / expected[nonzero].abs()).max().item()


def cpu_time(module, logits, labels, divisor):
    start = time.process_time()
    fwd_bwd(module, logits, labels, divisor)
    return time.process_time() - start


def median_cell(label, seconds):
    return (
        f"{label} {1e3 * statistics.median(seconds):6.1f} [{1e3 * min(seconds):.1f}-{1e3 * max(seconds):.1f}]"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="HEAD", help="git revision of the version to compare against")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--accuracy-rows", type=int, default=256)
    parser.add_argument(
        "--chunk-kib", type=int, nargs="*", help="sweep this version's CPU chunk (KiB of fp32)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    print(
        "\n".join(
            line for line in lscpu if line.split(":")[0] in ("Model name", "CPU(s)", "L2 cache", "L3 cache")
        )
    )
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, before = {args.before}")
    versions = {"before": load_version(args.before), "after": load_version(None)}

    g = torch.Generator().manual_seed(0)
    print("\naccuracy against float64, fp32 logits, relative differences")
    rows, vocab = args.accuracy_rows, args.vocab
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[: rows // 4] = -100
    logits = torch.randn(rows, vocab, generator=g) * 3
    peaked = logits.clone()
    peaked[torch.arange(rows), labels.clamp(min=0)] += 15
    far = torch.randn(rows, vocab, generator=g) * 4 + 200
    divisor = float((labels != -100).sum())
    print("  logits   version                loss     | gradient: max-scaled elementwise")
    for name, case in {"randn*3": logits, "peaked": peaked, "+200": far}.items():
        loss64, grad64 = reference(case, labels, divisor, torch.float64)
        results = {"F.cross_entropy fp32": reference(case, labels, divisor, torch.float32)}
        results |= {label: fwd_bwd(module, case, labels, divisor) for label, module in versions.items()}
        for label, (loss, grad) in results.items():
            print(
                f"  {name:8s} {label:22s} {max_relative_diff(loss, loss64):.2e} | "
                f"{max_relative_diff(grad, grad64):.2e} {max_elementwise_relative_diff(grad, grad64):.2e}"
            )

    print(
        f"\nfwd+bwd ms on ({args.rows}, {args.vocab}) logits, CPU time, median of {args.rounds} rounds [min-max]"
    )
    labels = torch.randint(0, args.vocab, (args.rows,), generator=g)
    masked = labels.clone().view(-1, 512)
    masked[:, :128] = -100
    cases = {}
    for dtype in (torch.bfloat16, torch.float32):
        logits = (torch.randn(args.rows, args.vocab, generator=g) * 3).to(dtype)
        for ignored, case_labels in (("none ignored", labels), ("1/4 ignored", masked.reshape(-1))):
            cases[f"{str(dtype)[6:]:8s} {ignored}"] = (
                logits,
                case_labels,
                float((case_labels != -100).sum()),
            )
    for case, (logits, case_labels, divisor) in cases.items():
        if args.chunk_kib:
            after = versions["after"]
            seconds = {kib: [] for kib in args.chunk_kib}
            for _ in range(args.rounds):
                for kib in args.chunk_kib:
                    after.CHUNK_ELEMENTS["cpu"] = kib * 1024 // 4
                    seconds[kib].append(cpu_time(after, logits, case_labels, divisor))
            print(f"  {case:22s} " + "  ".join(median_cell(f"{kib} KiB", s) for kib, s in seconds.items()))
            continue
        seconds = {label: [] for label in versions}
        for _ in range(args.rounds):
            for label, module in versions.items():
                seconds[label].append(cpu_time(module, logits, case_labels, divisor))
        ratio = statistics.median(seconds["before"]) / statistics.median(seconds["after"])
        cells = "  ".join(median_cell(label, s) for label, s in seconds.items())
        print(f"  {case:22s} {cells}  before/after {ratio:.2f}x")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
