"""Forward + backward of the chunked cross entropy (`mixtral_model/cross_entropy.py`) on (N, V) logits:
this worktree's version against the one at a git revision (default HEAD), in one process, and both
against float64 for accuracy.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/cross_entropy.py --before HEAD~1 [--rounds 7]

Timing: CPU time (`time.process_time`) of `loss = ce(logits, labels); autograd.grad(loss, logits)`, the
versions run round-robin, medians. Cases: bf16 and fp32 logits, with no ignored label and with a
quarter of the rows ignored (a prompt masked in each sequence of 512). Accuracy: max relative
difference (max |x - x64| / max |x64|, the tests' measure) of loss and gradient against the same
formula in float64, on randn * 3 logits and on a peaked distribution (the label's logit + 15),
fp32 logits, and for `F.cross_entropy(logits.float())` as the yardstick.
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


def max_relative_diff(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="HEAD", help="git revision of the version to compare against")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--accuracy-rows", type=int, default=256)
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
    print("\naccuracy, fp32 logits, max relative diff against float64 (loss | gradient)")
    rows, vocab = args.accuracy_rows, args.vocab
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[: rows // 4] = -100
    logits = torch.randn(rows, vocab, generator=g) * 3
    peaked = logits.clone()
    peaked[torch.arange(rows), labels.clamp(min=0)] += 15
    divisor = float((labels != -100).sum())
    for name, case in {"randn*3": logits, "peaked": peaked}.items():
        loss64, grad64 = reference(case, labels, divisor, torch.float64)
        results = {"F.cross_entropy fp32": reference(case, labels, divisor, torch.float32)}
        results |= {label: fwd_bwd(module, case, labels, divisor) for label, module in versions.items()}
        for label, (loss, grad) in results.items():
            print(
                f"  {name:8s} {label:22s} {max_relative_diff(loss, loss64):.2e} | {max_relative_diff(grad, grad64):.2e}"
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
        seconds = {label: [] for label in versions}
        for _ in range(args.rounds):
            for label, module in versions.items():
                start = time.process_time()
                fwd_bwd(module, logits, case_labels, divisor)
                seconds[label].append(time.process_time() - start)
        cells = [
            f"{label} {1e3 * statistics.median(s):6.1f} [{1e3 * min(s):.1f}-{1e3 * max(s):.1f}]"
            for label, s in seconds.items()
        ]
        ratio = statistics.median(seconds["before"]) / statistics.median(seconds["after"])
        print(f"  {case:22s} " + "  ".join(cells) + f"  before/after {ratio:.2f}x")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
