"""Demo of the native Mixtral: a tiny random-init model with the real Mixtral tokenizer and chat
format, saved as a hub-layout checkpoint, reloaded by our class and by transformers', and held
against it on the same prompt (logits and greedy tokens).

    python train/demo.py [--output-dir outputs/demo]
"""

import argparse
import time
from pathlib import Path

import torch
import transformers

from mixtral_model import MixtralConfig, MixtralForCausalLM, encode_chat, load_tokenizer

TINY_MIXTRAL = dict(
    hidden_size=128,
    intermediate_size=224,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    rope_theta=1e6,
)


def build_tiny_checkpoint(output_dir: Path, tokenizer) -> None:
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_MIXTRAL)
    MixtralForCausalLM(config).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo/tiny-mixtral"))
    args = parser.parse_args()

    started = time.perf_counter()
    tokenizer = load_tokenizer()
    build_tiny_checkpoint(args.output_dir, tokenizer)
    ours = MixtralForCausalLM.from_pretrained(args.output_dir)
    reference = transformers.MixtralForCausalLM.from_pretrained(args.output_dir)
    print(f"checkpoint: {args.output_dir} ({sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters)")

    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    prompt_ids = torch.tensor([encode_chat(tokenizer, messages, add_generation_prompt=True)["input_ids"]])
    print(f"prompt: {tokenizer.decode(prompt_ids[0])!r}")
    with torch.no_grad():
        logits_diff = (ours(prompt_ids).logits - reference(prompt_ids).logits).abs().max().item()
        generate = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        ours_tokens = ours.generate(prompt_ids, **generate)[0, prompt_ids.shape[1] :]
        reference_tokens = reference.generate(prompt_ids, **generate)[0, prompt_ids.shape[1] :]
    print(f"max |logits(ours) - logits(transformers)| = {logits_diff:.2e}")
    print(f"greedy tokens, ours:         {ours_tokens.tolist()}")
    print(f"greedy tokens, transformers: {reference_tokens.tolist()}")
    print(f"identical generations: {torch.equal(ours_tokens, reference_tokens)}")
    print(f"(random weights, so the text is noise) {tokenizer.decode(ours_tokens)!r}")
    print(f"done in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
