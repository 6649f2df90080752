"""The demo (`./launch.sh demo`, mixtral_tune/demo.py) end to end, shortened to 2 optimizer steps per
stage: both stages save, wandb writes its offline runs, the held-out table has its three rows with the
numbers mixtral_tune/evaluate.py gives for the saved models, the random init answers nothing right,
and our model agrees with transformers' Mixtral on the DPO checkpoint."""

import re
import subprocess
import sys

import pytest
from pipeline_runs import run_env

from mixtral_model import MixtralForCausalLM, load_tokenizer
from mixtral_tune.evaluate import exact_match, read_jsonl
from mixtral_tune.shipped import DATA_DIR

SHORT = ["max_steps=2", "trainer.save_steps=2", "trainer.logging_steps=1"]
# the demo with every stage's overrides extended by SHORT (the demo takes no overrides of its own)
DRIVER = f"""
import sys
from mixtral_tune import demo
for stage in (demo.sft, demo.dpo):
    stage.main = (lambda main: lambda overrides: main([*overrides, *{SHORT!r}]))(stage.main)
demo.main(sys.argv[1:])
"""
ROW = re.compile(r"^\| (.+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+|-) \| ([-\d.]+|-) \|$", re.M)


@pytest.mark.slow
def test_demo_runs_both_stages_and_prints_the_held_out_table(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, "--output-dir", str(out), "--seed", "3"],
        env=run_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("sft", "dpo"):
        assert (out / stage / "final" / "model.safetensors").is_file(), stage
    assert len(list(out.glob("*/wandb/offline-run-*"))) == 2  # one offline run per stage
    rows = ROW.findall(result.stdout)
    assert [name for name, *_ in rows] == [
        "random init (before SFT)", "after SFT (before DPO)", "after DPO (reference: SFT model)",
    ]  # fmt: skip
    assert rows[0][1] == "0.000"  # a random init reverses no string
    tokenizer = load_tokenizer()
    sft_rows = read_jsonl(DATA_DIR / "sft_eval.jsonl")
    accuracy, _ = exact_match(
        MixtralForCausalLM.from_pretrained(out / "dpo" / "final").eval(), tokenizer, sft_rows
    )
    assert rows[2][1] == f"{accuracy:.3f}"
    agreement = re.search(r"max \|Δlogits\| = ([\d.e+-]+)", result.stdout)
    assert agreement and float(agreement.group(1)) < 1e-4
