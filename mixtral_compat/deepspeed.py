"""Every use of deepspeed internals (private or undocumented names) in this project, in one place.

CHECKED is the range of deepspeed versions these were checked against; `mixtral_compat.check_versions()`
refuses others at start-up with one line. Code elsewhere calls the functions here, never the
internals themselves.
"""

PACKAGE = "deepspeed"
CHECKED = ">=0.19,<0.20"


# --- faults: ZeRO-3 partitions and checkpoint loading (issue 17) ---


def local_parameter_data(param):
    """The values of `param` this rank holds: its ZeRO-3 partition (`ds_tensor`) when DeepSpeed
    partitioned it, else the parameter itself."""
    return param.ds_tensor if hasattr(param, "ds_id") and hasattr(param, "ds_tensor") else param


def route_checkpoint_engine_loads(load) -> None:
    """Idempotent: DeepSpeed's TorchCheckpointEngine.load (every model/optimizer state file of a
    DeepSpeed checkpoint, read with torch.load(weights_only=False)) calls `load(path, map_location)`
    instead."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if getattr(TorchCheckpointEngine.load, "_routed", False):
        return

    def routed_load(self, path: str, map_location=None):
        return load(path, map_location=map_location)

    routed_load._routed = True
    TorchCheckpointEngine.load = routed_load
