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

from mixtral_model import load_tokenizer  # noqa: E402
from mixtral_model.zero import DeepSpeedMoETrainerMixin  # noqa: E402
from train import pipeline  # noqa: E402
from train.callbacks import RouterStatsLoggingMixin, RunSummaryCallback  # noqa: E402
from train.data import prepare_dpo_data  # noqa: E402
from train.model_factory import build_frozen_reference, build_model  # noqa: E402
from train.pipeline import ExpertParallelSaveMixin  # noqa: E402


class MixtralDPOTrainer(
    ExpertParallelSaveMixin, RouterStatsLoggingMixin, DeepSpeedMoETrainerMixin, DPOTrainer
):
    pass


def main(argv: list[str]) -> None:
    cfg = pipeline.config_from_argv("dpo", argv)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    data = pipeline.load_data_or_exit(prepare_dpo_data, cfg.data, tokenizer, cfg.trainer.seed)
    pipeline.report_data(data, cfg.data.max_reported_bad_rows)
    pipeline.configure_wandb(cfg)
    model, args = pipeline.build_model_and_args(
        cfg,
        tokenizer,
        lambda: DPOConfig(
            **pipeline.training_kwargs(cfg),
            max_length=cfg.data.max_length,
            beta=cfg.trainer.dpo.beta,
            loss_type=[cfg.trainer.dpo.loss_type],
            precompute_ref_log_probs=cfg.trainer.dpo.precompute_ref_log_probs,
        ),
        build_model,
    )
    trainer = MixtralDPOTrainer(
        model=model,
        ref_model=build_frozen_reference(cfg),
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
