"""What the pipelines add to TRL's trainers: router statistics in every training log, and a run
summary (steps, tokens/s, final metrics, where the outputs are) at the end."""

import time

import torch
from transformers import TrainerCallback

from mixtral_model.moe import Router
from mixtral_model.router_stats import router_statistics


class RouterLogitsRecorder:
    """Keeps the router logits (and attention mask) of the latest training forward of `model`.

    Forward hooks on every router; a forward counts as training when it builds a graph, so the
    no-grad DPO reference forward and evaluation never overwrite what the logger reports.
    """

    def __init__(self, model: torch.nn.Module):
        self.routers = [module for module in model.modules() if isinstance(module, Router)]
        self.logits: list[torch.Tensor | None] = [None] * len(self.routers)
        self.attention_mask: torch.Tensor | None = None
        for index, router in enumerate(self.routers):
            router.register_forward_hook(self._keep_logits(index))
        model.register_forward_pre_hook(self._keep_attention_mask, with_kwargs=True)

    def _keep_logits(self, index: int):
        def hook(module, inputs, logits_NE):
            if torch.is_grad_enabled():
                self.logits[index] = logits_NE.detach()

        return hook

    def _keep_attention_mask(self, module, args, kwargs):
        if torch.is_grad_enabled():
            self.attention_mask = kwargs.get("attention_mask")

    def statistics(self, top_k: int, capacity_factor: float | None) -> dict[str, float]:
        if not self.routers or any(logits is None for logits in self.logits):
            return {}
        mask = self.attention_mask
        if mask is not None and mask.numel() != self.logits[0].shape[0]:
            mask = None
        return router_statistics(tuple(self.logits), top_k, mask, capacity_factor=capacity_factor)


class RouterStatsLoggingMixin:
    """Put first in a trainer's bases: adds per-layer router statistics to each training log."""

    def enable_router_stats(self, base_model) -> None:
        self.router_recorder = RouterLogitsRecorder(self.model)
        self.router_config = base_model.config

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        recorder = getattr(self, "router_recorder", None)
        if recorder is not None and "loss" in logs:
            config = self.router_config
            logs.update(recorder.statistics(config.num_experts_per_tok, config.expert_capacity_factor))
        super().log(logs, *args, **kwargs)


class RunSummaryCallback(TrainerCallback):
    """Prints a short summary on the main process when training ends."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.started = time.perf_counter()
        self.last_logs: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.last_logs.update({k: v for k, v in (logs or {}).items() if isinstance(v, int | float)})

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        seconds = time.perf_counter() - self.started
        tokens = state.num_input_tokens_seen
        metrics = {
            k: self.last_logs[k]
            for k in (
                "loss",
                "train_loss",
                "aux_loss",
                "z_loss",
                "eval_loss",
                "rewards/accuracies",
                "rewards/margins",
            )
            if k in self.last_logs
        }
        print(f"[summary] steps: {state.global_step}, wall time: {seconds:.1f}s", flush=True)
        if tokens:
            print(
                f"[summary] tokens seen: {tokens} ({tokens / max(seconds, 1e-9):.0f} tokens/s on all ranks)"
            )
        print("[summary] final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        print(f"[summary] outputs: {self.output_dir} (final model in {self.output_dir}/final)")
