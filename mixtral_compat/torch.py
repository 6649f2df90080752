"""Every use of torch internals (private or undocumented names) in this project, in one place.

CHECKED is the range of torch versions these were checked against; `mixtral_compat.check_versions()`
refuses others at start-up with one line. Code elsewhere calls the functions here, never the
internals themselves.

- `has_hooks` / `has_global_forward_hooks`: the grouped expert kernels read expert weights without
  calling their modules, which is only right when nothing hooks those calls; torch has no public way
  to ask a module (or `nn.Module` globally) whether hooks are registered.
- `grouped_mm`: `torch._grouped_mm` (one GEMM over row groups of several weight matrices).
- `cpu_has_native_bf16`: `torch.cpu._is_avx512_bf16_supported`.
- `repoint_parameter`: `param.data = tensor`, which keeps the Parameter object (what optimizers, PEFT's
  base layers and state dicts hold) and swaps its storage.
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


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm(a, b, offs=offs)`: rows of `a` up to each offset times the matching matrix of `b`."""
    return torch._grouped_mm(a, b, offs=offs)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16/AMX); False where torch cannot say."""
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


def repoint_parameter(param: nn.Parameter, tensor: torch.Tensor) -> None:
    """Make `param` (the same object) use `tensor` as its data."""
    param.data = tensor
