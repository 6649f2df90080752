"""CPO and SimPO alignment of the native Mixtral with TRL's CPOTrainer (experimental in TRL:
trl.experimental.cpo). SimPO is CPO's `loss_type=simpo` (with `cpo_alpha=0` for pure SimPO), as TRL
exposes it; `recipes/tiny/simpo.yaml` sets both.

    mixtral-tune cpo +recipe=tiny/simpo
    mixtral-tune cpo +recipe=tiny/simpo trainer.cpo_alpha=0.05      (CPO-SimPO: SimPO plus an NLL term)
    torchrun --nproc_per_node=N -m mixtral_tune.cpo +recipe=NAME [key=value ...]
    (also: python -m mixtral_tune cpo ..., python -m mixtral_tune.cpo ..., torchrun train/cpo.py ...)

Preference rows as DPO's (`prompt` / `chosen` / `rejected`). No reference model. The router terms (aux
and z-loss, with the model config's coefficients) are added to the loss by
mixtral_tune/training/objective.py, in training and in evaluation.
"""

import sys  # noqa: I001  (mixtral_model.quiet is imported first)

from mixtral_model import quiet  # noqa: F401  (before TRL: drops start-up messages nobody can act on)
from trl.experimental.cpo import CPOConfig, CPOTrainer

from mixtral_tune import pipeline
from mixtral_tune.training.trainers import mixtral_trainer
from mixtral_tune.data import prepare_dpo_data


MixtralCPOTrainer = mixtral_trainer(CPOTrainer)


def cpo_arguments(cfg) -> CPOConfig:
    # TRL keeps the prompt and cuts the completion (keep_start; config.py refuses keep_end)
    return CPOConfig(**pipeline.paired_preference_kwargs(cfg), max_length=cfg.data.max_length)


def main(argv: list[str]) -> str:
    return pipeline.run("cpo", argv, prepare_dpo_data, cpo_arguments, MixtralCPOTrainer)


if __name__ == "__main__":
    main(sys.argv[1:])
