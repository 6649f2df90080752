"""Supervised fine-tuning of the native Mixtral with TRL's SFTTrainer.

    torchrun --nproc_per_node=N train/sft.py +recipe=NAME [key=value ...]
    python train/sft.py +recipe=tiny/sft max_steps=50 output_dir=outputs/try

Steps: config (validated) -> tokenizer and data (validated) -> trainer arguments (starts
torch.distributed, DeepSpeed zero.Init) -> base model (+ PEFT, + DeepSpeed MoE wiring) -> train
(resumable) -> OUTPUT_DIR/final.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trl import SFTConfig, SFTTrainer  # noqa: E402

from mixtral_model import load_tokenizer  # noqa: E402
from mixtral_model.zero import DeepSpeedMoETrainerMixin  # noqa: E402
from train import pipeline  # noqa: E402
from train.callbacks import RouterStatsLoggingMixin, RunSummaryCallback  # noqa: E402
from train.data import prepare_sft_data  # noqa: E402
from train.model_factory import build_model  # noqa: E402
from train.pipeline import ExpertParallelSaveMixin  # noqa: E402


class MixtralSFTTrainer(
    ExpertParallelSaveMixin, RouterStatsLoggingMixin, DeepSpeedMoETrainerMixin, SFTTrainer
):
    pass


def main(argv: list[str]) -> None:
    cfg = pipeline.config_from_argv("sft", argv)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    data = pipeline.load_data_or_exit(prepare_sft_data, cfg.data, tokenizer, cfg.trainer.seed)
    pipeline.report_data(data, cfg.data.max_reported_bad_rows)
    pipeline.configure_wandb(cfg)
    model, args = pipeline.build_model_and_args(
        cfg,
        tokenizer,
        lambda: SFTConfig(
            **pipeline.training_kwargs(cfg),
            max_length=None if cfg.data.packing else cfg.data.max_length,  # packed rows already fit
            padding_free=cfg.data.packing,
        ),
        build_model,
    )
    trainer = MixtralSFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[RunSummaryCallback(cfg.output_dir)],
    )
    trainer.enable_router_stats(model)
    trainer.train(resume_from_checkpoint=pipeline.resume_path(cfg))
    pipeline.save_final(trainer, cfg, tokenizer)


if __name__ == "__main__":
    main(sys.argv[1:])
