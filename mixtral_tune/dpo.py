"""DPO alignment of the native Mixtral with TRL's DPOTrainer.

    mixtral-tune dpo +recipe=tiny/dpo model.name_or_path=outputs/tiny-sft/final
    torchrun --nproc_per_node=N -m mixtral_tune.dpo +recipe=NAME [key=value ...]
    (also: python -m mixtral_tune dpo ..., python -m mixtral_tune.dpo ..., torchrun train/dpo.py ...)

The reference model is the base with adapters disabled under PEFT, a frozen copy otherwise; the
policy's router terms (aux and z-loss, with the model config's coefficients) are added to the DPO
loss by mixtral_tune/training/objective.py and the reference forward carries none.
"""

import sys  # noqa: I001  (mixtral_model.quiet is imported first)

from mixtral_model import quiet  # noqa: F401  (before TRL: drops start-up messages nobody can act on)
from trl import DPOConfig, DPOTrainer

from mixtral_tune import pipeline
from mixtral_tune.training.trainers import mixtral_trainer
from mixtral_tune.data import prepare_dpo_data
from mixtral_tune.training.model_factory import build_frozen_reference


MixtralDPOTrainer = mixtral_trainer(DPOTrainer)


def dpo_arguments(cfg) -> DPOConfig:
    return DPOConfig(
        **pipeline.training_kwargs(cfg),
        max_length=cfg.data.max_length,
        truncation_mode=cfg.data.dpo_truncation_mode,
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
