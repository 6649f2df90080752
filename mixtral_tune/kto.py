"""KTO alignment of the native Mixtral with TRL's KTOTrainer, on unpaired feedback.

    mixtral-tune kto +recipe=tiny/kto model.name_or_path=outputs/tiny-sft/final
    torchrun --nproc_per_node=N -m mixtral_tune.kto +recipe=NAME [key=value ...]
    (also: python -m mixtral_tune kto ..., python -m mixtral_tune.kto ..., torchrun train/kto.py ...)

Rows are `prompt` / `completion` / `label` (true: desirable, false: undesirable; mixtral_tune/data.py).
The reference model is the base with adapters disabled under PEFT, a frozen copy otherwise; the
policy's router terms (aux and z-loss, with the model config's coefficients) are added to the KTO loss
by mixtral_tune/training/objective.py -- those of the forward TRL trains on, not of its KL-estimate
forward -- and the reference forwards carry none.
"""

import sys  # noqa: I001  (mixtral_model.quiet is imported first)

from mixtral_model import quiet  # noqa: F401  (before TRL: drops start-up messages nobody can act on)
from trl import KTOConfig, KTOTrainer

from mixtral_tune import pipeline
from mixtral_tune.training.trainers import mixtral_trainer
from mixtral_tune.data import prepare_kto_data
from mixtral_tune.training.model_factory import build_frozen_reference


MixtralKTOTrainer = mixtral_trainer(KTOTrainer)


def kto_arguments(cfg) -> KTOConfig:
    # TRL's KTO collator truncates as DPO's keep_start does; data.py dropped rows whose prompt fills max_length
    return KTOConfig(**pipeline.training_kwargs(cfg), max_length=cfg.data.max_length)


def main(argv: list[str]) -> str:
    return pipeline.run(
        "kto",
        argv,
        prepare_kto_data,
        kto_arguments,
        MixtralKTOTrainer,
        reference_model=build_frozen_reference,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
