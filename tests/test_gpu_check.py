"""bench/gpu_check.py's CPU dry run: every section runs on tiny shapes (CUDA-only parts skip with a
reason), the report files are written, and the parity checks it carries pass on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = [
    "environment",
    "nf4_build",
    "attention",
    "experts",
    "training",
    "qlora_memory",
    "mixtral_8x7b_qlora",
    "profile",
]


def test_gpu_check_dry_run_writes_every_section_and_its_checks_pass(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (md,) = tmp_path.glob("gpu_*_cpu-dry-run.md")
    (js,) = tmp_path.glob("gpu_*_cpu-dry-run.json")
    report = json.loads(js.read_text())
    sections = report["sections"]
    assert list(sections) == SECTIONS
    not_ok = {name: (s["status"], s["reason"]) for name, s in sections.items() if s["status"] != "ok"}
    assert not not_ok, not_ok
    text = md.read_text()
    for name in SECTIONS:
        assert f"## {name} (ok" in text

    checks = {c["name"]: c for s in sections.values() for c in s["checks"]}
    assert all(c["passed"] for c in checks.values()), [c for c in checks.values() if not c["passed"]]
    assert checks["packed NF4 bytes differing (fraction)"]["value"] == 0
    assert any(name.startswith("sdpa vs fp32 eager, packed") for name in checks)
    assert "grouped_loop vs per_expert (bf16): max of out/dx/weight grads" in checks
    assert "[full] loss rel diff, ours vs transformers (same weights, bf16)" in checks
    assert sections["attention"]["data"]["flash_skipped"].startswith("flash-attn needs CUDA")

    rows = sections["training"]["data"]["rows"]
    assert {(r["mode"], r["model"]) for r in rows} == {
        (mode, model) for mode in ("full", "lora", "qlora") for model in ("ours", "transformers")
    }
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert sections["qlora_memory"]["data"]["cpu_estimate_gib"] < 32
    assert sections["mixtral_8x7b_qlora"]["data"]["steps"] == 2

    profiled = sections["profile"]["data"]["rows"]  # CPU: aten ops' own time, by kind
    assert [(r["mode"], r["backend"]) for r in profiled] == [
        (mode, backend) for mode in ("lora", "qlora") for backend in ("grouped_loop", "per_expert")
    ]
    for row in profiled:
        assert row["ms_by_kind"]["matmul"] > 0 and row["ms_by_kind"]["attention"] > 0, row
        assert 0 < row["busy"] <= 1 and row["launches"] > 100, row
