import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The suite is a CPU suite (references on CPU, gloo ranks); only tests marked `cuda` use a GPU. On a
# GPU machine everything else must run exactly as on a CPU one: in-process code that asks
# torch.cuda.is_available() (the HF Trainer's device, flash-attn checks) is told no, and subprocesses
# (torchrun, pipeline runs) see no GPU. The real answer is read once here, before any test runs, so
# the CUDA runtime is initialised with the machine's own device list.
CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("cuda") and not CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (runs on GPU machines)"))


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request, monkeypatch):
    if CUDA and request.node.get_closest_marker("cuda") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(autouse=True)
def _no_stale_extension_build_locks():
    """A test that kills a process while it loads one of DeepSpeed's JIT-built ops (a torchrun timeout,
    a rank stopped by its peer's error) leaves the op's build lock behind, and every later test loading
    that op would wait on it until its timeout: each test starts without such locks (held ones stay)."""
    from mixtral_compat.torch import clear_stale_extension_locks

    clear_stale_extension_locks()


# Shared by the data tests (tests/test_data.py, tests/test_data_formats.py).


@pytest.fixture(scope="module")
def tokenizer():
    """Mixtral's tokenizer (mixtral_model.load_tokenizer: the one mistral-common ships), once per module."""
    from mixtral_model import load_tokenizer

    return load_tokenizer()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """Every test prepares data into its own cache, unless it passes cache_dir itself (a module uses
    it for all its tests with `pytestmark = pytest.mark.usefixtures("fresh_cache")`)."""
    import mixtral_tune.data as data_module

    monkeypatch.setattr(data_module, "cache_root", lambda cfg: Path(cfg.cache_dir or tmp_path / "cache"))
