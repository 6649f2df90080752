"""Start-up messages a user cannot act on, dropped: imported first by `mixtral_model` (whose PEFT
compatibility shim imports PEFT, and with it bitsandbytes) and by the entry points before TRL, PEFT
or DeepSpeed.

- bitsandbytes (imported by PEFT on every run, QLoRA or not) warns on CPUs with AVX512-BF16 that an
  optional kernels-community 4-bit kernel is missing; it matters only to 4-bit matmuls on a CPU.
- kernels (transformers' kernel loader, which bitsandbytes asks for that kernel) says in offline mode
  that it skipped the publisher check of a kernel it then does not find anyway.
- DeepSpeed announces at import that it found no GPU and picked its CPU accelerator.
- PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model.
- DeepSpeed 0.19 calls torch's deprecated `all_gather_into_tensor` under ZeRO.
Everything else these loggers say still reaches the console.
"""

import logging
import warnings

UNACTIONABLE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "DeepSpeed": "Setting accelerator to CPU",
    "kernels._internals.hf_hub": "Skipping publisher trust check",
}


class DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


for logger_name, prefix in UNACTIONABLE.items():
    logging.getLogger(logger_name).addFilter(DropMessage(prefix))

warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
warnings.filterwarnings(
    "ignore", message="`torch.distributed.all_gather_into_tensor` is deprecated", category=FutureWarning
)
