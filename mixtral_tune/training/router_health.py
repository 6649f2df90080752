"""Router health made actionable: alerts on collapsing experts, routing drift at each evaluation, and
the step boundary of global-batch load balancing. Settings: the `router` section and
`model.router_balance` (mixtral_tune/config.py).

- `RouterAlertCallback`: after each training log (whose per-layer router statistics come from
  training/reporting.py), an expert whose share of its layer's assignments stays below
  `router.min_load` or above `router.max_load` times the balanced share 1/E, or a layer whose router
  entropy stays below `router.min_entropy` x ln(E), for `router.patience` consecutive logged steps,
  raises one line naming the layer, the expert and the numbers. The line prints on the console and
  `router/alerts` (how many conditions fired at this step) reaches the trackers and the log history.
  `router.alert=warn` goes on; `stop` ends training (every rank, together) and the pipeline exits 3
  without writing `final`.
- `RoutingDrift`: at each evaluation, per layer, the share of real eval tokens whose top-k experts
  differ from the base model's, and the mean KL(base || tuned) of their router distributions, logged
  as `eval_router_drift/...` and written into the model card. The base: under PEFT the
  adapter-disabled model, run at each evaluation on the same batches; under full fine-tuning the
  routing of the model at step 0 of the run, recorded once on the eval set when training starts
  (fp32 router logits on the CPU: layers x experts floats per eval token). A resumed full
  fine-tune has no step-0 routing: drift is then not measured, and one line says so.
- `GlobalBatchStepCallback`: starts a new step of accumulated load fractions at every optimizer step.
"""

import math

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from mixtral_model.router_stats import routing_drift


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RouterWatch:
    """The alert rule over consecutive logged router statistics (see the module docstring)."""

    def __init__(self, min_load: float, max_load: float, min_entropy: float, patience: int):
        self.min_load, self.max_load, self.min_entropy, self.patience = (
            min_load,
            max_load,
            min_entropy,
            patience,
        )
        self.streaks: dict[tuple, int] = {}

    def conditions(self, logs: dict) -> dict[tuple, str]:
        """(layer, expert or 'entropy', kind) -> what is out of bounds, for this log's statistics."""
        experts = sum(1 for key in logs if key.startswith("router/layer_0/expert_"))
        layers = sorted(
            {int(k.split("/")[1][len("layer_") :]) for k in logs if k.startswith("router/layer_")}
        )
        found = {}
        for layer in layers:
            prefix = f"router/layer_{layer}"
            for expert in range(experts):
                load = logs[f"{prefix}/expert_{expert}_fraction"] * experts  # 1 = balanced
                if load < self.min_load:
                    found[(layer, expert, "low")] = (
                        f"load {load:.2f}x balanced < router.min_load={self.min_load}"
                    )
                elif load > self.max_load:
                    found[(layer, expert, "high")] = (
                        f"load {load:.2f}x balanced > router.max_load={self.max_load}"
                    )
            entropy, ceiling = logs[f"{prefix}/entropy"], math.log(experts)
            if entropy < self.min_entropy * ceiling:
                found[(layer, "entropy", "low")] = (
                    f"router entropy {entropy:.3f} < router.min_entropy={self.min_entropy} x ln({experts})"
                )
        return found

    def check(self, logs: dict, step: int) -> list[str]:
        """Alert lines for the conditions that have now held for `patience` consecutive logged steps
        (each fires once, and again only after it cleared)."""
        found = self.conditions(logs)
        self.streaks = {key: self.streaks.get(key, 0) + 1 for key in found}
        lines = []
        for key, what in found.items():
            if self.streaks[key] == self.patience:
                layer, expert, _ = key
                who = f"layer {layer}" + ("" if expert == "entropy" else f" expert {expert}")
                lines.append(f"router alert at step {step}: {who}: {what} for {self.patience} logged steps")
        return lines


class RouterAlertCallback(TrainerCallback):
    """`router.alert` over the training logs; insert it before the trackers' callbacks so the
    `router/alerts` it adds to the log reaches them (`add_router_callbacks` does)."""

    def __init__(self, watch: RouterWatch, stop: bool):
        self.watch, self.stop = watch, stop
        self.stopped: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "router/entropy" not in logs:
            return
        lines = self.watch.check(logs, state.global_step)
        logs["router/alerts"] = len(lines)
        if state.log_history:
            state.log_history[-1]["router/alerts"] = len(lines)
        prefix = f"[rank {dist.get_rank()}] " if distributed() else ""
        for line in lines:
            print(prefix + line, flush=True)
        if self.stop and self.agreed(bool(lines), args.device):
            self.stopped = self.stopped or (lines[0] if lines else "router alert on another rank")
            control.should_training_stop = True

    @staticmethod
    def agreed(fired: bool, device) -> bool:
        """Whether any rank fired: each rank watches its own tokens, and all ranks stop together."""
        if not distributed():
            return fired
        flag = torch.tensor([int(fired)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class RoutingDrift:
    """Routing drift of the trained model from its base on the eval set (see the module docstring)."""

    def __init__(self, trainer, is_peft: bool):
        self.trainer, self.is_peft = trainer, is_peft
        self.recorded: list[tuple[torch.Tensor, ...]] | None = None  # full fine-tuning: step-0 logits
        self.unavailable: str | None = None

    def backbone(self):
        model = self.trainer.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return base.model, base.config.num_experts_per_tok

    # the tokens of an eval batch, by what each TRL collator calls them: SFT/DPO `input_ids`; ORPO and CPO
    # `chosen_input_ids` (drift is measured on the chosen sequences); KTO `completion_input_ids`
    TOKEN_PREFIXES = ("", "chosen_", "completion_")

    def batches(self):
        for batch in self.trainer.get_eval_dataloader():
            prefix = next((p for p in self.TOKEN_PREFIXES if f"{p}input_ids" in batch), None)
            if prefix is None:
                continue
            yield {
                key: batch[f"{prefix}{key}"].to(self.trainer.args.device)
                for key in ("input_ids", "attention_mask", "position_ids")
                if f"{prefix}{key}" in batch
            }

    @torch.no_grad()
    def router_logits(self, batch) -> tuple[torch.Tensor, ...]:
        backbone, _ = self.backbone()
        return backbone(**batch, use_cache=False).router_logits

    def record_base(self) -> None:
        """Full fine-tuning, at step 0: the routing every later evaluation is held to."""
        training = self.trainer.model.training
        self.trainer.model.eval()
        self.recorded = [
            tuple(logits.float().cpu() for logits in self.router_logits(batch)) for batch in self.batches()
        ]
        self.trainer.model.train(training)

    def base_logits(self, index: int, batch):
        if not self.is_peft:
            return self.recorded[index]
        with self.trainer.model.disable_adapter():
            return self.router_logits(batch)

    def measure(self) -> dict[str, float]:
        """`eval_router_drift/layer_L/{top_k_changed,kl}` and their means over layers."""
        if self.unavailable or (not self.is_peft and self.recorded is None):
            return {}
        model = self.trainer.model
        training = model.training
        model.eval()
        _, top_k = self.backbone()
        changed_L = kl_L = tokens = 0.0
        for index, batch in enumerate(self.batches()):
            tuned = self.router_logits(batch)
            base = tuple(logits.to(tuned[0].device) for logits in self.base_logits(index, batch))
            changed, kl, real = routing_drift(base, tuned, top_k, batch.get("attention_mask"))
            changed_L, kl_L, tokens = changed_L + changed, kl_L + kl, tokens + real
        model.train(training)
        sums = torch.cat([torch.as_tensor(changed_L).reshape(-1), torch.as_tensor(kl_L).reshape(-1)])
        sums = torch.cat([sums.float(), torch.as_tensor(tokens, dtype=torch.float32).reshape(1)])
        if distributed():
            sums = sums.to(self.trainer.args.device)
            dist.all_reduce(sums)
        sums = sums.cpu()
        layers = (sums.numel() - 1) // 2
        changed_L, kl_L = sums[:layers] / sums[-1], sums[layers:-1] / sums[-1]
        logs = {}
        for layer in range(layers):
            logs[f"eval_router_drift/layer_{layer}/top_k_changed"] = changed_L[layer].item()
            logs[f"eval_router_drift/layer_{layer}/kl"] = kl_L[layer].item()
        logs["eval_router_drift/top_k_changed"] = changed_L.mean().item()
        logs["eval_router_drift/kl"] = kl_L.mean().item()
        return logs


class RoutingDriftCallback(TrainerCallback):
    """Records the step-0 base routing of a full fine-tune when training starts."""

    def __init__(self, drift: RoutingDrift):
        self.drift = drift

    def on_train_begin(self, args, state, control, **kwargs):
        if self.drift.is_peft:
            return
        if state.global_step == 0:
            self.drift.record_base()
        elif self.drift.recorded is None:
            self.drift.unavailable = (
                "routing drift: not measured in this resumed full fine-tune (the base routing is recorded "
                "at step 0 of a run)"
            )
            if state.is_world_process_zero:
                print(self.drift.unavailable, flush=True)


class GlobalBatchStepCallback(TrainerCallback):
    """A new optimizer step forgets the previous step's load fractions (global-batch balance)."""

    def __init__(self, load):
        self.load = load

    def on_step_begin(self, args, state, control, **kwargs):
        self.load.new_step()


def add_router_callbacks(trainer, cfg, model) -> None:
    """The router settings of `cfg` wired into `trainer`: global-batch balance, alerts, drift."""
    if cfg.model.router_balance == "global_batch":
        from mixtral_parallel.global_balance import use_global_batch_balance

        trainer.add_callback(GlobalBatchStepCallback(use_global_batch_balance(model)))
    watch = cfg.router
    if watch.alert != "off":
        rule = RouterWatch(watch.min_load, watch.max_load, watch.min_entropy, watch.patience)
        trainer.router_alerts = RouterAlertCallback(rule, stop=watch.alert == "stop")
        trainer.callback_handler.callbacks.insert(0, trainer.router_alerts)
    if watch.drift and trainer.eval_dataset is not None:
        trainer.routing_drift = RoutingDrift(trainer, is_peft=hasattr(trainer.model, "disable_adapter"))
        trainer.add_callback(RoutingDriftCallback(trainer.routing_drift))
