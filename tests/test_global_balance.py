"""Global-batch load balancing (mixtral_parallel/global_balance.py, model.router_balance=global_batch):
on one process over accumulated micro-batches, and on 2 gloo ranks (tests/distributed/global_balance.py),
against transformers' `load_balancing_loss_func` on the concatenated batch; and 2-rank pipeline runs
under ZeRO-3 and under expert parallelism."""

import json

import pytest
import torch
from mixtral_reference import tiny_config
from pipeline_runs import SFT, log_history, run_pipeline
from test_expert_parallel import torchrun
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mixtral_model import MixtralConfig, MixtralForCausalLM
from mixtral_parallel.global_balance import use_global_batch_balance

TOL = 1e-5


def micro_batches(vocab: int, count: int = 3):
    g = torch.Generator().manual_seed(5)
    batches = []
    for k in range(count):
        input_ids = torch.randint(0, vocab, (2, 8), generator=g)
        mask = torch.ones_like(input_ids)
        mask[k % 2, : k + 1] = 0
        batches.append((input_ids, mask))
    return batches


def test_one_process_accumulation_equals_the_concatenated_batch():
    """Without torch.distributed: the step's accumulated fractions and step_loss() are those of the
    concatenated micro-batches; a new step starts from scratch; micro_batch mode is unchanged."""
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**tiny_config()))
    batches = micro_batches(model.config.vocab_size)
    plain = [model(input_ids=i, attention_mask=m, output_router_logits=True).aux_loss for i, m in batches]
    load = use_global_batch_balance(model)
    for _ in range(2):  # two optimizer steps over the same micro-batches: the same numbers
        load.new_step()
        auxes = [model(input_ids=i, attention_mask=m, output_router_logits=True).aux_loss for i, m in batches]
        input_ids, mask = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        with torch.no_grad():  # not a micro-batch of the step
            logits = model(input_ids=input_ids, attention_mask=mask, output_router_logits=True).router_logits
        expected = load_balancing_loss_func(logits, 4, 2, mask)
        torch.testing.assert_close(load.step_loss(), expected.detach(), rtol=TOL, atol=0)
        assert load.micro_batches == 3
    own = load_balancing_loss_func(
        model(input_ids=batches[0][0], attention_mask=batches[0][1], output_router_logits=True).router_logits,
        4, 2, batches[0][1],
    )  # fmt: skip
    torch.testing.assert_close(plain[0], own, rtol=TOL, atol=0)  # micro_batch mode: transformers' own
    torch.testing.assert_close(auxes[0], plain[0], rtol=TOL, atol=0)  # the first micro-batch sees itself
    assert abs(auxes[-1].item() - plain[-1].item()) > 1e-4  # later ones see the step's fractions so far
    with torch.no_grad():  # evaluation keeps each forward's own fractions
        evaluated = model(input_ids=batches[1][0], attention_mask=batches[1][1], output_router_logits=True)
    torch.testing.assert_close(evaluated.aux_loss, plain[1], rtol=TOL, atol=0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("global_balance") / "report.json"
    torchrun("global_balance.py", str(out), timeout=300)
    report = json.loads(out.read_text())
    print(json.dumps(report, indent=1))
    return report


@pytest.mark.distributed
def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_ranks):
    dp, accumulation, ep = two_ranks["dp"], two_ranks["dp_accumulation"], two_ranks["ep"]
    for case, key in ((dp, "aux_diff"), (dp, "step_loss_diff"), (dp, "grad_diff"), (ep, "aux_diff"),
                      (ep, "dense_grad_diff"), (accumulation, "step_loss_diff"),
                      (accumulation, "last_fractions_diff"), (accumulation, "grad_diff")):  # fmt: skip
        assert case[key] <= TOL, (key, case)
    # what micro-batch mode would have given differs far beyond that
    for case in (dp, accumulation):
        assert abs(case["aux_micro_batch_mode_rank_mean"] - case["aux_reference"]) > 1e-3
    assert accumulation["first_fractions_vs_global"] > 1e-2


@pytest.mark.distributed
@pytest.mark.parametrize(
    "extra",
    [["deepspeed=zero3"], ["deepspeed=zero2", "model.expert_parallel_size=2"]],
    ids=["zero3", "zero2-ep2"],
)
def test_global_batch_balance_runs_under_zero3_and_expert_parallelism(tmp_path, extra):
    out = tmp_path / "run"
    run_pipeline(
        "sft",
        [*SFT, *extra, f"output_dir={out}", "max_steps=2", "model.router_balance=global_batch",
         "trainer.gradient_accumulation_steps=2", "trainer.per_device_train_batch_size=4"],
        nproc=2,
    )  # fmt: skip
    aux = [entry["aux_loss"] for entry in log_history(out / "final") if "loss" in entry]
    # transformers' load_balancing_loss_func gives top_k for balanced routing (uniform logits: 2.0) and E
    # when every token picks the same top_k experts (4.0): a random-init router is near the first, off the second
    top_k, experts = 2, 4  # pipeline_runs.SMALL_MODEL over configs/model/tiny.yaml
    assert len(aux) == 2 and all(top_k / 2 < value < experts for value in aux)
