"""Test probe, on PYTHONPATH only in tests that set RANK_PROBE_DIR: after `Trainer.train` returns, each
torchrun rank writes a sha256 of every trainable parameter it holds (gathered under ZeRO-3), by name, to
RANK_PROBE_DIR/rank<RANK>.json, so a test can check that every rank holds the same result. Under expert
parallelism a rank holds its own experts, named by their global index."""

import os

if os.environ.get("RANK_PROBE_DIR") and os.environ.get("RANK") is not None:
    import hashlib
    import json
    from pathlib import Path

    import transformers

    train = transformers.Trainer.train

    def train_then_write_digests(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        import deepspeed

        shared = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in shared]):
            digests = {
                name: hashlib.sha256(param.detach().float().cpu().numpy().tobytes()).hexdigest()
                for name, param in shared
            }
        path = Path(os.environ["RANK_PROBE_DIR"]) / f"rank{os.environ['RANK']}.json"
        path.write_text(json.dumps(digests))
        return result

    transformers.Trainer.train = train_then_write_digests
