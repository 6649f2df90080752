"""One GPU command that measures everything GPU-only and writes it to a dated markdown + json file.

    python bench/gpu_check.py --out bench/results            # one H100/H200: stops itself after --budget-s (450)
    python bench/gpu_check.py --dry-run --out /tmp/check     # tiny shapes on CPU (automatic without CUDA), < 60 s
    python bench/gpu_check.py --only training,qlora_memory   # a subset of the sections below

It needs torch (CUDA), transformers >= 5.24, peft, bitsandbytes, sentencepiece (imported by
`mixtral_model`), hydra-core/omegaconf (imported by mixtral_tune/training/model_factory.py); flash-attn is optional.

Sections, in order (each one records its error and the script moves on; once the time budget
`--budget-s` is spent the remaining sections are skipped; the files are rewritten after every section):

1. environment: GPU, versions, the expert backend `auto` picks for plain bf16 experts;
2. nf4_build: the in-memory NF4 quantization used below (a model built on the GPU and quantized
   module by module) gives the same 4-bit weights and logits as `from_pretrained(quantization_config=
   mixtral_tune.training.model_factory.quantization_config(...))`, the factory's path;
3. attention: flash-attn 2 (if importable) and sdpa against an fp32 eager reference (outputs and q/k/v
   gradients; causal, sliding window, packed sequences with a window) and their fwd+bwd speed;
4. experts: our SparseMoeBlock's `grouped_loop` (and `auto`) against `per_expert`: output, input and every
   parameter gradient in bf16, and fwd+bwd speed;
5. training: Mixtral-8x7B-shaped layers (hidden 4096, intermediate 14336, 8 experts top-2, GQA 32/8,
   vocab 32000, batch 1 x 4096 tokens) for full bf16, LoRA and QLoRA (mixtral_tune.training.model_factory.apply_peft on
   configs/peft/{lora,qlora}.yaml), ours (`auto` and `per_expert` experts) against transformers'
   MixtralForCausalLM (+PEFT LoRA on its fused experts via `target_parameters`, +bitsandbytes) holding
   the same weights: tokens/s, MFU, peak memory, and auto-vs-per_expert parity of loss and gradients;
6. qlora_memory: QLoRA peak memory at 1 and N layers, per layer, extrapolated to 32 layers, beside the
   CPU estimate of mixtral_tune/estimate.py (tests/test_qlora_memory.py);
7. mixtral_8x7b_qlora: the whole 32-layer model, random init made on the GPU layer by layer and quantized
   as it is made, trained as recipes/mixtral-8x7b/sft_qlora.yaml does (the factory's 4-bit preparation,
   LoRA r=16 with dropout on attention and experts, gradient checkpointing, the recipe's optimizer
   paged_adamw_8bit, bf16 autocast as the HF Trainer runs a bf16 model, TRL's fused LM head), 10 steps at
   4096 tokens: peak memory (per phase of a step, and the allocator's reserved peak) and tokens/s, beside
   a memory account: the persistent tensors sorted into components (mixtral_tune/memory_measure.py's tensor_account,
   and qlora_account computed from the config), the checkpointed layer inputs, and the bytes one layer
   saves for backward while it is recomputed (saved-tensor hooks on the model cut to one layer);
8. profile: where a LoRA and a QLoRA step's time goes on one Mixtral-shaped layer, per expert backend
   (auto, grouped_loop, per_expert): GPU kernel time by kind (matmul, dequantize, attention, copy/cast,
   optimizer, ...), kernels launched per step, the GPU's busy share of the step, the largest kernels.

What a step is: forward (loss = CE + router aux loss, as the pipelines train) + backward; LoRA/QLoRA
also take an AdamW step on the adapters; full bf16 takes no optimizer step. Gradient checkpointing: off
for full bf16, on for LoRA/QLoRA (as the recipes). Timings: warm-up steps, then CUDA events around each
step, medians reported. MFU = FLOPs per token x tokens/s / bf16 dense peak of the detected GPU, with
FLOPs per token = 6 N_active + 6 L T d_attn for full training and 4 N_active + 6 L T d_attn for LoRA and
QLoRA (frozen weights need no weight gradient); N_active counts the attention projections, router, the
top-k experts and lm_head (not the embedding lookup); 6 L T d_attn is causal attention (QK^T and PV,
forward + backward, half of the T x T square); recomputation and LoRA adapter FLOPs are not counted.

QLoRA: ours goes through the factory (`mixtral_tune.training.model_factory.prepare_4bit_for_training`: frozen, unquantized
weights kept bf16); transformers' through `peft.prepare_model_for_kbit_training` (what TRL does for a 4-bit
model): every non-4-bit bf16 parameter becomes fp32, so its activations flow in fp32, and its fused
experts, which bitsandbytes does not quantize, are trained around in fp32. PEFT's
`target_parameters` (ParamWrapper) refuses lora_dropout != 0, so transformers' adapters run without the
recipe's dropout (0.05), which ours keeps.
"""
