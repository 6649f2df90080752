"""What the pipelines add to TRL's trainers: router statistics in every training log, a lean
console (one line of training numbers and one MoE line per log step; the per-layer statistics go
to the trackers and the saved log history only), and a run summary at the end."""

import math
import time

import torch
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

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
        drift = getattr(self, "routing_drift", None)  # training/router_health.py
        if drift is not None and "eval_loss" in logs:
            logs.update(drift.measure())
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


class ConsoleLogCallback(ProgressCallback):
    """transformers' progress bar, with each log printed as two short lines instead of the whole dict:

        step 2/4 (50%) | loss 10.42 | lr 3.00e-03 | grad_norm 1.26 | aux_loss 2.002 | 221 tok/s | eta 0m03s
          moe: router entropy 1.38/1.39 | busiest expert 1.38x balanced  [| dropped 0.3% with a capacity factor]

    Evaluation logs print their scalar metrics on one line; per-layer router keys never print.
    """

    TRAIN_KEYS = (("loss", "loss", ".4g"), ("learning_rate", "lr", ".2e"), ("grad_norm", "grad_norm", ".3g"),
                  ("aux_loss", "aux_loss", ".4g"), ("rewards/accuracies", "reward_acc", ".3g"),
                  ("rewards/margins", "reward_margin", ".3g"))  # fmt: skip

    def __init__(self, show_bar: bool = True):
        super().__init__()
        self.show_bar = show_bar
        self.started = self.last_time = time.perf_counter()
        self.first_step = self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if self.show_bar:
            super().on_train_begin(args, state, control, **kwargs)
        self.started = self.last_time = time.perf_counter()
        self.first_step, self.last_tokens = state.global_step, state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            lines = [self.train_line(state, logs), self.moe_line(logs)]
        elif any(key.startswith("eval_") for key in logs):
            lines = [self.eval_line(state, logs)]
        else:  # the end-of-training summary: RunSummaryCallback prints it
            return
        for line in filter(None, lines):
            self.training_bar.write(line) if self.training_bar is not None else print(line, flush=True)

    def train_line(self, state, logs: dict) -> str:
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        tokens_per_second = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, tokens
        done = state.global_step - self.first_step
        remaining = (now - self.started) / max(done, 1) * (state.max_steps - state.global_step)
        parts = [
            f"step {state.global_step}/{state.max_steps} ({state.global_step / max(state.max_steps, 1):.0%})"
        ]
        parts += [f"{label} {logs[key]:{spec}}" for key, label, spec in self.TRAIN_KEYS if key in logs]
        if tokens:
            parts.append(f"{tokens_per_second:.0f} tok/s")
        parts.append(f"eta {format_duration(remaining)}")
        return " | ".join(parts)

    @staticmethod
    def moe_line(logs: dict) -> str | None:
        if "router/entropy" not in logs:
            return None
        experts = sum(1 for key in logs if key.startswith("router/layer_0/expert_"))
        parts = [f"router entropy {logs['router/entropy']:.3g}/{math.log(max(experts, 1)):.3g}"]
        parts.append(f"busiest expert {logs['router/max_expert_load']:.3g}x balanced")
        if logs.get("router/dropped_fraction"):
            parts.append(f"dropped {logs['router/dropped_fraction']:.1%}")
        return "  moe: " + " | ".join(parts)

    @staticmethod
    def eval_line(state, logs: dict) -> str:
        metrics = [
            f"{key} {value:.4g}"
            for key, value in logs.items()
            if key.startswith("eval_") and "/layer_" not in key and isinstance(value, int | float)
            and not key.endswith(("_runtime", "_per_second", "num_tokens"))
        ]  # fmt: skip
        return f"eval at step {state.global_step}: " + " | ".join(metrics)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds % 60:02d}s"


def use_lean_console(trainer) -> None:
    """Replace transformers' console logging (the whole log dict per step) with ConsoleLogCallback."""
    show_bar = any(isinstance(callback, ProgressCallback) for callback in trainer.callback_handler.callbacks)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ConsoleLogCallback(show_bar=show_bar))
