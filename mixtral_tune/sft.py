"""Supervised fine-tuning of the native Mixtral with TRL's SFTTrainer.

    mixtral-tune sft +recipe=tiny/sft max_steps=50 output_dir=outputs/try
    torchrun --nproc_per_node=N -m mixtral_tune.sft +recipe=NAME [key=value ...]
    (also: python -m mixtral_tune sft ..., python -m mixtral_tune.sft ..., torchrun train/sft.py ...)

The steps (mixtral_tune/pipeline.py `run`): config (validated) -> tokenizer and data (validated) ->
trainer arguments and model (+ PEFT, + DeepSpeed MoE wiring) -> train (resumable) ->
OUTPUT_DIR/final.
"""

import sys  # noqa: I001  (mixtral_model.quiet is imported first)

from mixtral_model import quiet  # noqa: F401  (before TRL: drops start-up messages nobody can act on)
from trl import SFTConfig, SFTTrainer

from mixtral_tune import pipeline
from mixtral_tune.training.trainers import mixtral_trainer
from mixtral_tune.data import prepare_sft_data


MixtralSFTTrainer = mixtral_trainer(SFTTrainer)


def sft_arguments(cfg) -> SFTConfig:
    return SFTConfig(
        **pipeline.training_kwargs(cfg),
        max_length=None,  # mixtral_tune/data.py already truncated (or dropped) long rows and packed
        padding_free=cfg.data.packing,  # packed rows: no attention mask, position ids mark the sequences
        dataset_kwargs={"skip_prepare_dataset": True},  # rows come tokenized, labelled, packed, cached
    )


def main(argv: list[str]) -> str:
    return pipeline.run("sft", argv, prepare_sft_data, sft_arguments, MixtralSFTTrainer)


if __name__ == "__main__":
    main(sys.argv[1:])
