"""refimpl: an executable specification of the openPangu language models in NumPy.

    import refimpl
    model = refimpl.init_model("tiny-dense", seed=0, numerics="fp32")
    logits = model.forward([1, 5, 7])          # [T, vocab]
    model = refimpl.load_model("DIR", numerics="bf16", backend="numba")   # a checkpoint
    tokens = refimpl.speculative_generate(model, refimpl.NgramDrafter(), [1, 5, 7], 4)
"""

from .cache import KVCache, PagedKVCache
from .io.checkpoint import load_model
from .config import PRESET_NAMES, ModelConfig, parameter_count, preset, weight_shapes
from .errors import RefimplError
from .generate import generate
from .model import Model
from .random_init import init_model, random_weights
from .speculative import ModelDrafter, NgramDrafter, SpeculativeStats, speculative_generate
from .taps import Taps
from .thinking import chat

__version__ = "0.1.0"

__all__ = ["KVCache", "PagedKVCache", "PRESET_NAMES", "ModelConfig", "parameter_count", "preset",
           "weight_shapes", "RefimplError", "generate", "Model", "init_model", "load_model",
           "random_weights", "Taps", "speculative_generate", "ModelDrafter", "NgramDrafter",
           "SpeculativeStats", "chat", "__version__"]
