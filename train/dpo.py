"""DPO alignment of the native Mixtral with TRL's DPOTrainer.

    torchrun --nproc_per_node=N train/dpo.py +recipe=NAME [key=value ...]
    python train/dpo.py +recipe=tiny/dpo model.name_or_path=outputs/tiny-sft/final

The reference model is the base with adapters disabled under PEFT, a frozen copy otherwise; the
router aux loss is added to the policy loss with model.router_aux_loss_coef (TRL's
router_aux_loss_coef is set to the same value) and the reference forward carries none.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trl import DPOConfig, DPOTrainer  # noqa: E402

from mixtral_model.zero import DeepSpeedMoETrainerMixin  # noqa: E402
from train import pipeline  # noqa: E402
from train.callbacks import RouterStatsLoggingMixin  # noqa: E402
from train.data import prepare_dpo_data  # noqa: E402
from train.model_factory import build_frozen_reference  # noqa: E402


class MixtralDPOTrainer(
    pipeline.ExpertParallelSaveMixin, RouterStatsLoggingMixin, DeepSpeedMoETrainerMixin, DPOTrainer
):
    pass


def dpo_arguments(cfg) -> DPOConfig:
    return DPOConfig(
        **pipeline.training_kwargs(cfg),
        max_length=cfg.data.max_length,
        truncation_mode=cfg.data.dpo_truncation_mode,
        beta=cfg.trainer.dpo.beta,
        loss_type=[cfg.trainer.dpo.loss_type],
        precompute_ref_log_probs=cfg.trainer.dpo.precompute_ref_log_probs,
    )


def main(argv: list[str]) -> str:
    return pipeline.run(
        "dpo",
        argv,
        prepare_dpo_data,
        dpo_arguments,
        MixtralDPOTrainer,
        reference_model=build_frozen_reference,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
