"""Training pipelines for the native Mixtral: the `mixtral-tune` command (`mixtral_tune.cli`), typed Hydra
config (`mixtral_tune.config`), datasets (`mixtral_tune.data`), SFT and DPO entry points (`mixtral_tune.sft`,
`mixtral_tune.dpo`), adapter export and the demo."""
