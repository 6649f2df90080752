"""Training pipelines: typed Hydra config (`mixtral_tune.config`), datasets (`mixtral_tune.data`), SFT and DPO entry points."""
