"""Per-GPU memory and per-step communication of a training layout, estimated from the model's shape.

    python -m mixtral_tune.estimate +recipe=mixtral-8x7b/sft_lora_ep [--world-size 8] [any override]

prints the estimate for a recipe (or any command line of the pipelines) next to the same run without
expert parallelism under ZeRO-3 (`model.expert_parallel_size=1 deepspeed=zero3`).

Parameter counts come from the config by formula (tests/test_estimate.py holds them to built models:
ours, transformers' and PEFT's). Everything else is an estimate, under these assumptions:

Memory (bytes on one GPU):
- trainable values in mixed precision (ZeRO paper): a weight and its gradient in the training dtype,
  an fp32 master copy when that dtype is not fp32, AdamW's two fp32 moments (8-bit AdamW: 2 bytes);
  frozen base weights in the training dtype, or NF4 under QLoRA (two values a byte plus bitsandbytes'
  double-quantization constants; embeddings, head, router and norms stay in the compute dtype);
- ZeRO stage s shards the optimizer state (s >= 1), the gradients (s >= 2) and the weights (s = 3);
  a dense value is sharded over all W ranks, an expert value over its expert-data-parallel group (the
  W/n ranks holding the same experts); each rank holds E/n experts of every layer;
- optimizer offload (DeepSpeed ZeRO-Offload) moves the fp32 master copy, the moments and the
  gradient partitions to CPU memory (reported as `cpu_per_rank`);
- full-model DPO and KTO hold a frozen reference copy of the weights, placed like the policy's;
- ZeRO-3 also holds one layer gathered at a time (its attention and its rank's experts, weights and
  gradients): every MoE block is a ZeRO-3 leaf module, gathered whole;
- activations with gradient checkpointing: each layer's input (T x hidden) kept for the backward, plus
  one layer's working set recomputed at a time (`layer_work`: what a decoder layer saves for backward,
  tensor by tensor, held exactly to saved-tensor hooks on tiny models by tests/test_estimate.py, for
  the `per_expert` experts CUDA runs pick; plus the all-to-all buffers under EP); without checkpointing every layer's working set is kept, and with
  transformers' `every_n_layers` (trainer.activation_checkpointing_kwargs) that of every layer it leaves out.
  T = micro-batch x sequence length tokens (x2 under DPO, ORPO and CPO: chosen and
  rejected). The logits: one fp32 tile of TRL's fused LM head (up to 32768 tokens) and its gradient;
  ORPO and CPO (TRL's experimental trainers) build all T x vocab fp32 logits and their gradient;
- not counted: DeepSpeed's communication buckets, CUDA context and allocator fragmentation.

Communication (bytes each rank sends per optimizer step, = bytes it receives; ring collectives):
- ZeRO-3 all-gather of the weights: every micro-batch, once for the forward and once for the backward
  (the recomputation shares the backward's gather), once more for each further forward (DPO's
  reference; KTO's reference and its two no-gradient forwards on the KL completions: STAGE_PASSES); a shard
  group of size S sends (S-1)/S of the gathered bytes; experts are gathered only within their
  expert-data-parallel group (nothing moves when it is one rank);
- reduce-scatter of the trainable gradients: every micro-batch at ZeRO-2/3 (DeepSpeed reduces each
  micro-batch's gradients into their partitions), once per step at ZeRO-0/1 (counted as an
  all-reduce); ZeRO-1/2 all-gather the updated trainable weights once per step;
- expert-parallel all-to-all of the tokens: per MoE layer, the k rows of every token go to their
  experts (dispatch) and come back (combine): hidden x k x T x dtype bytes each way, once per forward
  (the recomputation and the further forwards of DPO and KTO included) and once in the backward; with uniform
  routing (n-1)/n of the rows leave the rank. The per-expert row counts (E int64) are not counted.
"""

import argparse
import dataclasses
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from mixtral_tune.config import LORA_TARGET_MODULES, activation_checkpointing_kwargs

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LOGITS_TILE = 32768  # tokens per tile of TRL's fused LM head (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT = ("w1", "w2", "w3")
PEFT_METHODS = ("none", "lora", "qlora", "esft")


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int

    @classmethod
    def of(cls, config) -> "Shape":
        """From a MixtralConfig (ours or transformers'), a mapping, the pipelines' model.architecture, or a Shape."""
        if isinstance(config, Shape):
            return config

        def get(key):
            return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)

        heads, hidden = get("num_attention_heads"), get("hidden_size")
        head_dim = get("head_dim") or hidden // heads
        return cls(
            vocab=get("vocab_size"),
            hidden=hidden,
            intermediate=get("intermediate_size"),
            layers=get("num_hidden_layers"),
            heads=heads,
            kv_heads=get("num_key_value_heads"),
            head_dim=head_dim,
            experts=get("num_local_experts"),
            top_k=get("num_experts_per_tok"),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection of one layer (experts: one expert's)."""
        h, q, kv, f = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "w1": (h, f), "w2": (f, h), "w3": (h, f),
        }  # fmt: skip


def parameter_counts(config) -> dict[str, int]:
    """Parameters by part of the whole model (every expert): embed_tokens, attention, norms, router,
    experts, lm_head (Mixtral's head is not tied to the embedding)."""
    s = Shape.of(config)
    shapes = s.linear_shapes()
    return {
        "embed_tokens": s.vocab * s.hidden,
        "attention": s.layers * sum(i * o for name, (i, o) in shapes.items() if name in ATTENTION),
        "norms": (2 * s.layers + 1) * s.hidden,
        "router": s.layers * s.hidden * s.experts,
        "experts": s.layers * s.experts * sum(i * o for name, (i, o) in shapes.items() if name in EXPERT),
        "lm_head": s.vocab * s.hidden,
    }


def lora_parameter_counts(config, r: int, targets: str) -> dict[str, int]:
    """LoRA values (A: r x in, B: out x r per wrapped Linear) on `targets` (attention | experts | both),
    split into the attention part and the expert part (every expert)."""
    s = Shape.of(config)
    wrapped = LORA_TARGET_MODULES[targets]
    per_layer = {name: r * (i + o) for name, (i, o) in s.linear_shapes().items() if name in wrapped}
    return {
        "attention": s.layers * sum(v for name, v in per_layer.items() if name in ATTENTION),
        "experts": s.layers * s.experts * sum(v for name, v in per_layer.items() if name in EXPERT),
    }


# ---- QLoRA's persistent bytes: bitsandbytes NF4 with double quantization (tests/test_qlora_memory.py holds
# them to bitsandbytes' allocations and to a built QLoRA model's tensors) ----------------------------------

NF4_BLOCK, NESTED_BLOCK = 64, 256
# per quantized Linear: the NF4 code table (16 fp32), the nested quantization's code table (256 fp32)
# and its offset (one fp32)
NF4_TABLES = 4 * (16 + 256 + 1)
# optimizer state bytes per trained value: torch AdamW keeps two fp32 moments; bitsandbytes' 8-bit
# AdamW two uint8 moments plus one fp32 absmax per 256-value block and moment (tensors of at least
# 4096 values, as LoRA matrices of real models are)
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw_8bit": 2.0 + 2 * 4 / 256}


def nf4_bytes(numel: int) -> int:
    """Packed NF4 values (two a byte) and their constants: a uint8 absmax per 64-value block, an fp32
    absmax per 256 blocks."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return numel // 2 + blocks + 4 * math.ceil(blocks / NESTED_BLOCK)


def qlora_weight_bytes(config, compute_bytes: int = 2, expert_parallel_size: int = 1) -> dict[str, int]:
    """One rank's QLoRA base by component: `nf4_weights` (packed), `nf4_constants` (block scales and
    code tables), `unquantized` (embeddings, lm_head, routers and norms in `compute_bytes`, and the
    rotary frequencies in fp32), each split by `dense`/`experts` (this rank's E/n experts)."""
    s = Shape.of(config)
    shapes = s.linear_shapes()
    counts = parameter_counts(config)

    def packed(names, copies):
        values = [shapes[name][0] * shapes[name][1] for name in names]
        return (
            copies * sum(v // 2 for v in values),
            copies * sum(nf4_bytes(v) - v // 2 + NF4_TABLES for v in values),
        )

    dense_w, dense_c = packed(ATTENTION, s.layers)
    expert_w, expert_c = packed(EXPERT, s.layers * (s.experts // expert_parallel_size))
    unquantized = counts["embed_tokens"] + counts["lm_head"] + counts["router"] + counts["norms"]
    rotary = s.head_dim // 2 * 4
    return {
        "nf4_weights": {"dense": dense_w, "experts": expert_w},
        "nf4_constants": {"dense": dense_c, "experts": expert_c},
        "unquantized": {"dense": unquantized * compute_bytes + rotary, "experts": 0},
    }


def qlora_account(
    config, r: int, targets: str, unquantized_bytes: int = 2, optimizer: str = "adamw"
) -> dict[str, int]:
    """Persistent bytes of a single-GPU QLoRA run by component: NF4 weights, their constants, the
    unquantized weights (`unquantized_bytes` each: 4 after PEFT's fp32 upcast), the fp32 LoRA
    parameters on `targets` (attention | experts | both), their gradients and the optimizer's state
    (`memory_measure.tensor_account` sorts a real model's tensors into the same components)."""
    weights = qlora_weight_bytes(config, unquantized_bytes)
    lora = sum(lora_parameter_counts(config, r, targets).values())
    return {
        **{part: sum(split.values()) for part, split in weights.items()},
        "lora_params": 4 * lora,
        "lora_grads": 4 * lora,
        "optimizer_state": round(OPTIMIZER_STATE_BYTES[optimizer] * lora),
    }


@dataclass(frozen=True)
class Estimate:
    """Per-GPU bytes by part (`memory`), per-rank CPU bytes (`cpu_per_rank`), bytes each rank sends per
    optimizer step by collective (`communication`), and what they were computed for (`layout`)."""

    layout: dict
    memory: dict[str, int]
    communication: dict[str, int]
    cpu_per_rank: int = 0

    @property
    def memory_total(self) -> int:
        return sum(self.memory.values())

    @property
    def communication_total(self) -> int:
        return sum(self.communication.values())

    def summary(self) -> dict[str, float]:
        """The numbers a recipe header states, in GiB (rounded to 0.1)."""
        return {
            "gpu_memory_gib": round(self.memory_total / GIB, 1),
            "cpu_memory_gib": round(self.cpu_per_rank / GIB, 1),
            "all_gather_gib": round(self.communication["zero3_weight_all_gather"] / GIB, 1),
            "all_to_all_gib": round(self.communication["expert_token_all_to_all"] / GIB, 1),
            "grad_reduce_gib": round(
                (self.communication["gradient_reduce"] + self.communication["updated_weight_all_gather"])
                / GIB,
                1,
            ),
        }

    def table(self) -> str:
        lines = ["per GPU memory (GiB):"]
        lines += [f"  {name:<28}{size / GIB:9.2f}" for name, size in self.memory.items()]
        lines.append(f"  {'total':<28}{self.memory_total / GIB:9.2f}")
        if self.cpu_per_rank:
            lines.append(f"  {'CPU memory per rank (offload)':<28}{self.cpu_per_rank / GIB:9.2f}")
        lines.append("sent by each rank per optimizer step (GiB):")
        lines += [f"  {name:<28}{size / GIB:9.2f}" for name, size in self.communication.items()]
        lines.append(f"  {'total':<28}{self.communication_total / GIB:9.2f}")
        return "\n".join(lines)


# stage -> (sequences per row in the trained forward, forward passes per micro-batch not counting the
# recomputation, whether TRL scores the labels with its fused LM head). DPO: chosen and rejected, policy and
# reference; KTO: one completion, and a no-gradient forward of the policy and of the reference on the
# mismatched (KL) completions besides the two; ORPO and CPO: chosen and rejected, no reference, full logits.
STAGE_PASSES = {
    "sft": (1, 1, True),
    "dpo": (2, 2, True),
    "kto": (1, 4, True),
    "orpo": (2, 1, False),
    "cpo": (2, 1, False),
}
REFERENCE_STAGES = ("dpo", "kto")  # PEFT: adapter-disabled forwards; full: a frozen copy of the model


def estimate_layout(
    model_config,
    *,
    world_size: int,
    expert_parallel_size: int = 1,
    zero_stage: int = 3,
    peft: str = "none",
    lora_r: int = 16,
    lora_targets: str = "both",
    lora_dropout: float = 0.0,
    attention: str = "flash_attention_2",
    micro_batch: int = 1,
    seq_len: int = 4096,
    grad_accum: int = 1,
    dtype: str = "bfloat16",
    optimizer: str = "adamw",
    offload_optimizer: bool = False,
    activation_checkpointing: bool = True,
    checkpoint_every: int = 1,
    stage: str = "sft",
    esft_experts: int = 0,
) -> Estimate:
    """Per-GPU memory and per-step communication of one rank (see the module docstring for what is
    counted and how). `dtype` is the training (compute) dtype; `optimizer` adamw or adamw_8bit;
    `checkpoint_every` is transformers' `every_n_layers` (layers 0, n, 2n, ... are checkpointed);
    `esft_experts`, with peft="esft", the number of (layer, expert) pairs an ESFT selection trains
    (spread evenly over the expert-parallel ranks)."""
    s = Shape.of(model_config)
    W, n = world_size, expert_parallel_size
    if peft not in PEFT_METHODS or optimizer not in OPTIMIZER_STATE_BYTES or stage not in STAGE_PASSES:
        raise ValueError(f"peft={peft}, optimizer={optimizer}, stage={stage}: see estimate_layout's choices")
    if n < 1 or W % n or s.experts % n:
        raise ValueError(f"expert_parallel_size={n} must divide the world size {W} and {s.experts} experts")
    b = DTYPE_BYTES[dtype]
    edp = W // n  # ranks holding the same experts: expert values are sharded and reduced over these

    counts = parameter_counts(model_config)
    experts_local = counts["experts"] // n
    dense = sum(counts.values()) - counts["experts"]
    # frozen base (PEFT) or trainable (full) values on this rank, (dense, expert) parts
    if peft == "none":
        base_bytes = (0, 0)
        trainable = (dense, experts_local)
    elif peft == "esft":  # the selected experts train in place; everything else is frozen
        selected = counts["experts"] // (s.layers * s.experts) * esft_experts // n
        base_bytes = (dense * b, (experts_local - selected) * b)
        trainable = (0, selected)
    else:
        lora = lora_parameter_counts(model_config, lora_r, lora_targets)
        trainable = (lora["attention"], lora["experts"] // n)
        if peft == "lora":
            base_bytes = (dense * b, experts_local * b)
        else:
            weights = qlora_weight_bytes(model_config, b, n)
            base_bytes = tuple(
                sum(split[part] for split in weights.values()) for part in ("dense", "experts")
            )

    def sharded(values: tuple[int, int], per_value: float, shard: bool) -> float:
        dense_part, expert_part = values
        return (
            per_value * (dense_part / W + expert_part / edp)
            if shard
            else per_value * (dense_part + expert_part)
        )

    master = 4 if b < 4 else 0
    optimizer_bytes = master + OPTIMIZER_STATE_BYTES[optimizer]
    memory = {
        "frozen_base_weights": sharded(base_bytes, 1, zero_stage == 3),
        "trainable_weights": sharded(trainable, b, zero_stage == 3),
        "gradients": 0 if offload_optimizer else sharded(trainable, b, zero_stage >= 2),
        "optimizer_states": 0 if offload_optimizer else sharded(trainable, optimizer_bytes, zero_stage >= 1),
    }
    cpu = sharded(trainable, optimizer_bytes + 4, True) if offload_optimizer else 0  # + fp32 grad partitions
    sequences, forwards, fused_head = STAGE_PASSES[stage]
    if stage in REFERENCE_STAGES and peft in (
        "none",
        "esft",
    ):  # no adapters to disable: a frozen reference copy, placed like the policy
        memory["reference_weights"] = sharded((dense * b, experts_local * b), 1, zero_stage == 3)

    tokens = micro_batch * seq_len * sequences
    shapes = s.linear_shapes()
    attention_params = sum(i * o for name, (i, o) in shapes.items() if name in ATTENTION)
    expert_params = sum(i * o for name, (i, o) in shapes.items() if name in EXPERT)
    if zero_stage == 3:  # one layer's attention and local experts gathered (and their gradients if trained)
        if peft == "qlora":
            one_layer = qlora_weight_bytes(dataclasses.replace(s, layers=1), b, n)
            layer = sum(sum(one_layer[part].values()) for part in ("nf4_weights", "nf4_constants"))
        else:
            layer = (attention_params + s.experts // n * expert_params) * b
        memory["zero3_gathered_layer"] = layer * (2 if peft == "none" else 1)
    work = layer_work(
        s, tokens, peft=peft, lora_r=lora_r, lora_targets=lora_targets, lora_dropout=lora_dropout,
        dtype=dtype, attention=attention, expert_parallel_size=n,
    )  # fmt: skip
    layer_work_bytes = sum(work.values())
    checkpointed = checkpointed_layers(s.layers, checkpoint_every) if activation_checkpointing else 0
    # a checkpointed layer keeps its input and works once more in backward; the others keep their work
    memory["activations"] = (
        checkpointed * tokens * s.hidden * b + (s.layers - checkpointed) * layer_work_bytes
        + (layer_work_bytes if checkpointed else 0)
    )  # fmt: skip
    # fp32 logits and their gradient: a tile of them under TRL's fused LM head, all of them without it
    memory["logits_tile"] = (min(tokens, LOGITS_TILE) if fused_head else tokens) * s.vocab * 4 * 2

    # ---- communication, bytes each rank sends per optimizer step
    ring_dense, ring_expert = (W - 1) / W, (edp - 1) / edp
    gathered = (base_bytes[0] + trainable[0] * b) * ring_dense + (
        base_bytes[1] + trainable[1] * b
    ) * ring_expert
    grads = trainable[0] * b * ring_dense + trainable[1] * b * ring_expert
    communication = {
        "zero3_weight_all_gather": gathered * (forwards + 1) * grad_accum if zero_stage == 3 else 0,
        "gradient_reduce": grads * grad_accum if zero_stage >= 2 else 2 * grads,
        "updated_weight_all_gather": grads if zero_stage in (1, 2) else 0,
    }
    # per MoE layer: dispatch and combine in each forward and the recomputation, then in backward
    exchanges = s.layers * (2 * forwards + 2) + 2 * checkpointed
    row_bytes = tokens * s.top_k * s.hidden * b
    communication["expert_token_all_to_all"] = (
        exchanges * row_bytes * (n - 1) / n * grad_accum if n > 1 else 0
    )
    layout = dict(
        world_size=W, expert_parallel_size=n, zero_stage=zero_stage, peft=peft, lora_r=lora_r,
        lora_targets=lora_targets, lora_dropout=lora_dropout, attention=attention, micro_batch=micro_batch, seq_len=seq_len, grad_accum=grad_accum,
        dtype=dtype, optimizer=optimizer, offload_optimizer=offload_optimizer,
        activation_checkpointing=activation_checkpointing, checkpoint_every=checkpoint_every,
        checkpointed_layers=checkpointed, stage=stage, esft_experts=esft_experts,
    )  # fmt: skip
    return Estimate(
        layout=layout,
        memory={k: int(v) for k, v in memory.items()},
        communication={k: int(v) for k, v in communication.items()},
        cpu_per_rank=int(cpu),
    )


# ---- one decoder layer's bytes saved for backward ---------------------------------------------------------

ATTENTION_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")


def layer_work(
    s: Shape,
    tokens: int,
    *,
    peft: str = "none",
    lora_r: int = 16,
    lora_targets: str = "both",
    lora_dropout: float = 0.0,
    dtype: str = "bfloat16",
    attention: str = "sdpa",
    device: str = "cuda",
    expert_backend: str = "per_expert",
    expert_parallel_size: int = 1,
) -> dict[str, int]:
    """Bytes one decoder layer (not the first: its input takes gradients) keeps for backward on `tokens`
    tokens, by part, counted from what our modules save: mixtral_model/norm.py, attention.py, moe.py and
    grouped_experts.py's `grouped_loop` expert backend, under PEFT's LoRA layers (adapters in fp32, as
    `get_peft_model` makes them) and, for a 16-bit `dtype`, autocast to it (as the HF Trainer runs with
    bf16=True). Dropless routing: M = tokens x top_k expert rows. tests/test_estimate.py holds every part
    to saved-tensor hooks on tiny models (CPU).

    What our code adds to the libraries' sums: the rules below, one per saved tensor.
    - RMSNorm: its fp32 input and rsqrt; its 16-bit output too when its weight trains (full fine-tune);
    - a LoRA projection (A: r x in): A's input, (T, in) in the adapter GEMM's dtype (autocast's copy of
      PEFT's fp32 cast; without a cast or dropout the projections reading one input share it), A's output
      (T, r), and under autocast the 16-bit copies of A and B; with dropout its noise: the input's
      shape in the adapter input's dtype (on CUDA a bool mask); a frozen base projection keeps nothing,
      a trained one its input (full fine-tune: the norm's output and o_proj's input, which under
      sdpa/flash is a view of the attention output kept anyway and under eager a copy);
    - attention: sdpa and flash_attention_2 keep q, k (after RoPE), v, the output and the fp32
      logsumexp (flash_attention_2 is modelled as sdpa and not measured here); eager keeps q and the
      repeated k, v, the fp32 probabilities and their 16-bit cast;
    - the router: its weight's autocast copy (its input too when it trains), fp32 softmax, top-k
      values and indices, their sum; the dispatch: three (M,) int64 indices, the sorted rows, the
      experts' output, its routing-weighted copy and the (M, 1) fp32 weights;
    - the experts, `expert_backend` (moe.py): `per_expert` (what `moe.choose_expert_backend` picks on
      CUDA) keeps w1(x), w3(x) and silu(w1 x) of every row, and each projection's modules what they
      keep (a LoRA projection as above, with 16-bit copies of every local expert's A and B under
      autocast; a trained base its input: x and the SwiGLU product); `grouped_loop` (what it picks on
      CPU) keeps x, w1(x) and w3(x), each adapter's (M, r) product, and with dropout the noise of
      every adapter input in the adapter input's dtype; ESFT's experts are counted as all trained;
    - `dispatch_buffers` under expert parallelism: the all-to-all keeps nothing for backward, but each
      exchange holds its send and receive buffers, (M, hidden) each, while it runs.
    On CUDA, PEFT's 4-bit LoRA layer skips its input cast under autocast (`device` selects this rule
    and the dropout mask's dtype; the rest is device-independent)."""
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={attention}: one of {ATTENTION_IMPLEMENTATIONS}")
    if expert_backend not in ("per_expert", "grouped_loop"):
        raise ValueError(f"expert_backend={expert_backend}: per_expert or grouped_loop")
    T, D, F, k, E = tokens, s.hidden, s.intermediate, s.top_k, s.experts
    n = expert_parallel_size
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    M = T * k
    c = DTYPE_BYTES[dtype]
    autocast = c < 4
    full = peft == "none"  # ESFT: norms, attention and router frozen
    adapted = set(LORA_TARGET_MODULES[lora_targets]) if peft in ("lora", "qlora") else set()
    lora_mm = c if autocast else 4  # adapter GEMMs: autocast's dtype, else the adapters' fp32
    # the adapter input's dtype: PEFT casts it to the fp32 adapter, except its 4-bit layer under CUDA autocast
    lora_in = c if (peft == "qlora" and autocast and device == "cuda") else 4
    mask = 1 if device == "cuda" else lora_in  # dropout: CUDA keeps a bool mask, CPU the scaled noise

    norm = T * D * 4 + T * 4 + (T * D * c if full else 0)
    shapes = s.linear_shapes()
    attn = 0
    lora_attention = [name for name in ATTENTION if name in adapted]
    own_input = lora_dropout > 0 or lora_in != lora_mm  # each adapter gets its own copy of its input
    for name in lora_attention:
        i, o = shapes[name]
        attn += T * lora_r * lora_mm + (lora_r * (i + o) * c if autocast else 0)
        if lora_dropout > 0:
            attn += T * i * mask
        if own_input:
            attn += T * i * lora_mm
    # o_proj's input: under eager a copy of the attention output; under sdpa/flash a view of the kept output
    o_input = T * q if attention == "eager" else 0
    if lora_attention and not own_input:
        # one input shared by the adapters that read it: the norm's output (q, k, v), o_proj's input
        qkv = T * D if {"q_proj", "k_proj", "v_proj"} & adapted else 0
        attn += (qkv + (o_input if "o_proj" in adapted else 0)) * lora_mm
    if full:
        attn += (T * D + o_input) * c  # the trained projections' inputs
    if attention == "eager":
        attn += 3 * T * q * c + s.heads * T * T * (4 + (c if c < 4 else 0))
    else:
        attn += 2 * T * q * c + 2 * T * kv * c + s.heads * T * 4

    router = (D * E * c if autocast else 0) + (T * D * c if full else 0)  # weight copy; input if trained
    routing = T * E * 4 + T * k * 8 + T * k * 4 + T * 4
    # three (M,) int64 indices, the (M, 1) fp32 routing weights, the experts' output and its weighted copy
    dispatch = 3 * M * 8 + M * 4 + 2 * M * D * c
    lora_experts = {"w1", "w2", "w3"} <= adapted
    experts = 0
    if lora_experts:
        experts += 3 * M * lora_r * lora_mm  # each adapter's (M, r) product
        if lora_dropout > 0:
            experts += (2 * M * D + M * F) * (lora_in if expert_backend == "grouped_loop" else mask)
    if expert_backend == "grouped_loop":  # x, w1(x), w3(x); and the noise above
        experts += M * D * c + 2 * M * F * c
    else:  # per_expert: w1(x), w3(x), silu(w1 x), and what each projection's modules keep
        experts += 3 * M * F * c
        if lora_experts and own_input:  # each adapter's own copy of its input: x for w1 and w3, w2's input
            experts += (2 * M * D + M * F) * lora_mm + (3 * E // n * lora_r * (D + F) * c if autocast else 0)
        elif lora_experts:  # w1 and w3 share x, w2's adapter keeps the product
            experts += (M * D + M * F) * lora_mm + (3 * E // n * lora_r * (D + F) * c if autocast else 0)
        elif (
            full or peft == "esft"
        ):  # the trained bases: x (w1 and w3), the product (w2); ESFT: as if all trained
            experts += M * D * c + M * F * c
    return {
        "input_norm": norm,
        "attention": attn,
        "post_attention_norm": norm,
        "moe": router + routing + dispatch + experts,
        "dispatch_buffers": 2 * M * D * c if n > 1 else 0,
    }


# ---- a training config (the pipelines' composed Hydra config) -> estimate_layout's arguments -------------

OPTIMIZERS = {"adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "adamw_8bit", "adamw_bnb_8bit": "adamw_8bit"}


def checkpointed_layers(layers: int, every_n_layers: int) -> int:
    """How many of `layers` decoder layers transformers checkpoints for `every_n_layers`."""
    if every_n_layers < 1:
        raise ValueError(f"every_n_layers={every_n_layers}: must be 1 or more")
    return math.ceil(layers / every_n_layers)


def layout_of(cfg, world_size: int, **changes) -> dict:
    """estimate_layout's keyword arguments for a composed pipeline config run on `world_size` ranks;
    `changes` override any of them (e.g. expert_parallel_size=1, zero_stage=3)."""
    zero = dict(cfg.deepspeed or {}).get("zero_optimization", {}) or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    method = cfg.peft.method
    trainer = cfg.trainer
    layout = dict(
        world_size=world_size,
        expert_parallel_size=cfg.model.expert_parallel_size,
        zero_stage=int(zero.get("stage", 0)),
        peft=method,
        lora_r=cfg.peft.r,
        lora_targets=cfg.peft.targets,
        lora_dropout=cfg.peft.dropout if method in ("lora", "qlora") else 0.0,
        attention=cfg.model.attn_implementation,
        micro_batch=trainer.per_device_train_batch_size,
        seq_len=cfg.data.max_length,
        grad_accum=trainer.gradient_accumulation_steps,
        dtype=cfg.peft.quant.compute_dtype if method == "qlora" else cfg.model.dtype,
        optimizer=OPTIMIZERS.get(trainer.get("optim", "adamw_torch"), "adamw"),
        offload_optimizer=offload,
        activation_checkpointing=bool(trainer.activation_checkpointing),
        checkpoint_every=int(activation_checkpointing_kwargs(trainer).get("every_n_layers", 1)),
        stage=cfg.stage,
        esft_experts=esft_experts(cfg) if method == "esft" else 0,
    )
    return {**layout, **changes}


def esft_experts(cfg) -> int:
    """The (layer, expert) pairs peft.esft_selection trains."""
    from mixtral_tune.esft import load_selection

    return sum(len(kept) for kept in load_selection(cfg.peft.esft_selection))


BASELINE = "model.expert_parallel_size=1 deepspeed=zero3"  # what an expert-parallel recipe replaces
ROW_COLUMNS = ("GPU memory", "CPU memory", "weights all-gathered", "tokens all-to-all", "grads reduced")
LABEL_WIDTH = 48


def compose_run(overrides: list[str]):
    """The pipelines' composed config for a command line (its stage read from the recipe)."""
    from mixtral_tune.config import compose

    cfg = compose("sft", overrides)
    return cfg if cfg.stage == "sft" else compose(cfg.stage, overrides)


def estimate_run(overrides: list[str], world_size: int) -> Estimate:
    cfg = compose_run(overrides)
    return estimate_layout(cfg.model.architecture, **layout_of(cfg, world_size))


def row_overrides(label: str, recipe_overrides: list[str]) -> list[str]:
    """A header row's run: `this recipe`, `+ KEY=VALUE ...` (on top of the recipe) or `+recipe=NAME ...`."""
    if label == "this recipe":
        return list(recipe_overrides)
    if label.startswith("+ "):
        return [*recipe_overrides, *label[2:].split()]
    return label.split()


def format_row(label: str, estimate: Estimate) -> str:
    """One line of a recipe header's estimate table (tests/test_estimate.py parses it back)."""
    cells = [
        f"{value:.1f} GiB".rjust(len(column))
        for value, column in zip(estimate.summary().values(), ROW_COLUMNS, strict=True)
    ]
    return f"{label:<{LABEL_WIDTH}}" + " | ".join(cells)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=8, help="GPUs the run is launched on (default 8)")
    parser.add_argument(
        "--compare", action="append", default=[f"+ {BASELINE}"],
        help="another run: '+ KEY=VALUE ...' on top of this one, or '+recipe=NAME ...' (repeatable)",
    )  # fmt: skip
    args, overrides = parser.parse_known_args(argv)
    rows = []
    for label in ["this recipe", *args.compare]:
        estimate = estimate_run(row_overrides(label, overrides), args.world_size)
        print(f"== {label}: {estimate.layout}")
        print(estimate.table())
        rows.append(format_row(label, estimate))
    print(f"== per GPU, per optimizer step on {args.world_size} GPUs:")
    print(" " * LABEL_WIDTH + " | ".join(ROW_COLUMNS))
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
