"""Every use of torch internals (private or undocumented names) in this project, in one place.

CHECKED is the range of torch versions these were checked against; `mixtral_compat.check_versions()`
refuses others at start-up with one line. Code elsewhere calls the functions here, never the
internals themselves.

- `has_hooks` / `has_global_forward_hooks`: the grouped expert kernels read expert weights without
  calling their modules, which is only right when nothing hooks those calls; torch has no public way
  to ask a module (or `nn.Module` globally) whether hooks are registered.
- `cpu_has_native_bf16`: `torch.cpu._is_avx512_bf16_supported`.
"""

import torch
from torch import nn

PACKAGE = "torch"
CHECKED = ">=2.11,<2.14"  # 2.11 (CUDA, bench/gpu_check.py on an H200) and 2.13 (CPU, the suite)


def has_hooks(module: nn.Module, backward: bool = True) -> bool:
    """Forward (pre-)hooks on `module`, and with backward=True its backward (pre-)hooks too."""
    hooked = bool(module._forward_hooks or module._forward_pre_hooks)
    if backward:
        hooked = hooked or bool(module._backward_hooks or getattr(module, "_backward_pre_hooks", None))
    return hooked


def has_global_forward_hooks() -> bool:
    """Hooks registered for every module (`nn.modules.module.register_module_forward_hook` and its pre form)."""
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16/AMX); False where torch cannot say."""
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
