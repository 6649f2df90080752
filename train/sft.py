"""Supervised fine-tuning of the native Mixtral with TRL's SFTTrainer.

    torchrun --nproc_per_node=N train/sft.py +recipe=NAME [key=value ...]
    python train/sft.py +recipe=tiny/sft max_steps=50 output_dir=outputs/try

The steps (train/pipeline.py `run`): config (validated) -> tokenizer and data (validated) ->
trainer arguments and model (+ PEFT, + DeepSpeed MoE wiring) -> train (resumable) ->
OUTPUT_DIR/final.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixtral_model import quiet  # noqa: E402, F401, I001  (before TRL: drops start-up messages nobody can act on)
from trl import SFTConfig, SFTTrainer  # noqa: E402

from mixtral_model.zero import DeepSpeedMoETrainerMixin  # noqa: E402
from train import pipeline  # noqa: E402
from train.callbacks import RouterStatsLoggingMixin  # noqa: E402
from train.checkpoints import ResumeMixin  # noqa: E402
from train.data import prepare_sft_data  # noqa: E402
from train.objective import RouterObjectiveMixin  # noqa: E402


class MixtralSFTTrainer(
    ResumeMixin,
    pipeline.ExpertParallelSaveMixin,
    RouterStatsLoggingMixin,
    RouterObjectiveMixin,
    DeepSpeedMoETrainerMixin,
    SFTTrainer,
):
    pass


def sft_arguments(cfg) -> SFTConfig:
    return SFTConfig(
        **pipeline.training_kwargs(cfg),
        max_length=None,  # train/data.py already truncated (or dropped) long rows and packed
        padding_free=cfg.data.packing,  # packed rows: no attention mask, position ids mark the sequences
        dataset_kwargs={"skip_prepare_dataset": True},  # rows come tokenized, labelled, packed, cached
    )


def main(argv: list[str]) -> str:
    return pipeline.run("sft", argv, prepare_sft_data, sft_arguments, MixtralSFTTrainer)


if __name__ == "__main__":
    main(sys.argv[1:])
