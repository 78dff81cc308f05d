import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import minibild

# The test models are tiny: extra threads only add synchronisation, and on a loaded machine OpenMP's
# waiting threads make each small op up to 100x slower.
torch.set_num_threads(1)

# scripts/ is not a package: put it on the path so tests can `import prepare_data` etc.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

# The fixtures below import transformers (through hf_oracle) only when a test asks for them, so test
# files that do not compare with Hugging Face neither need it nor wait for its import.


@dataclass
class Checkpoint:
    """A random T5 saved by transformers, and the same weights converted by scripts/convert_hf_t5.py."""
    name: str
    config: dict  # the keyword arguments given to transformers' T5Config
    hf_dir: Path
    minibild_dir: Path

    def hf(self, dtype=torch.float32):
        from hf_oracle import load_hf
        return load_hf(self.hf_dir, dtype)

    def minibild(self, dtype=torch.float32):
        return minibild.load(self.minibild_dir, dtype=dtype)


@pytest.fixture(scope="session", params=["v1.0", "v1.1", "odd"])  # hf_oracle.CONFIGS
def checkpoint(request, tmp_path_factory) -> Checkpoint:
    from convert_hf_t5 import convert
    from hf_oracle import CONFIGS, random_hf_t5

    root = tmp_path_factory.mktemp(request.param)
    random_hf_t5(**CONFIGS[request.param]).save_pretrained(root / "hf")
    convert(root / "hf", root / "minibild")  # the converter script's own code path
    return Checkpoint(request.param, CONFIGS[request.param], root / "hf", root / "minibild")


@pytest.fixture
def hf_float64(monkeypatch):
    """Make transformers' T5 exact in float64: the only change the tests make to the oracle (see
    hf_oracle.float64_faithful_layer_norm). Without it, float64 agreement stops near 1e-6."""
    from hf_oracle import float64_faithful_layer_norm
    from transformers.models.t5 import modeling_t5

    monkeypatch.setattr(modeling_t5.T5LayerNorm, "forward", float64_faithful_layer_norm)
