"""Training pipelines for the native Mixtral: the `mixtral-tune` command (`mixtral_tune.cli`), typed Hydra
config (`mixtral_tune.config`), datasets (`mixtral_tune.data`), SFT and DPO entry points (`mixtral_tune.sft`,
`mixtral_tune.dpo`), adapter export and the demo.

Every command imports this package first: a library outside the versions `mixtral_compat` was checked on
stops it here, with one line and exit status 2, before any library is imported."""

from mixtral_compat import exit_on_unchecked_versions

exit_on_unchecked_versions()
