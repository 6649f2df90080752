"""ORPO alignment of the native Mixtral with TRL's ORPOTrainer (experimental in TRL: trl.experimental.orpo).

    mixtral-tune orpo +recipe=tiny/orpo
    torchrun --nproc_per_node=N -m mixtral_tune.orpo +recipe=NAME [key=value ...]
    (also: python -m mixtral_tune orpo ..., python -m mixtral_tune.orpo ..., torchrun train/orpo.py ...)

Preference rows as DPO's (`prompt` / `chosen` / `rejected`). No reference model: the loss is the chosen
answers' NLL minus beta times the log-sigmoid of the odds ratio. The router terms (aux and z-loss, with
the model config's coefficients) are added to it by mixtral_tune/training/objective.py, in training and
in evaluation.
"""

import sys  # noqa: I001  (mixtral_model.quiet is imported first)

from mixtral_model import quiet  # noqa: F401  (before TRL: drops start-up messages nobody can act on)
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from mixtral_tune import pipeline
from mixtral_tune.training.trainers import mixtral_trainer
from mixtral_tune.data import prepare_dpo_data


MixtralORPOTrainer = mixtral_trainer(ORPOTrainer)


def orpo_arguments(cfg) -> ORPOConfig:
    # TRL keeps the prompt and cuts the completion (keep_start; config.py refuses keep_end)
    return ORPOConfig(**pipeline.paired_preference_kwargs(cfg), max_length=cfg.data.max_length)


def main(argv: list[str]) -> str:
    return pipeline.run("orpo", argv, prepare_dpo_data, orpo_arguments, MixtralORPOTrainer)


if __name__ == "__main__":
    main(sys.argv[1:])
