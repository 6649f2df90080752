"""Training pipelines: typed Hydra config (`train.config`), datasets (`train.data`), SFT and DPO entry points."""
