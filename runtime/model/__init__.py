"""Architectures modelrun runs, each a small file on the shared skeleton in base.py."""

from runtime.hparams import unsupported_architecture_message

from .base import HParams, Matrix, Transformer, UnsupportedModelError
from .kv_cache import KVCache
from .gemma import Gemma
from .gemma2 import Gemma2
from .gemma3 import Gemma3
from .gemma4 import Gemma4
from .gptoss import GptOss
from .granite import Granite
from .llama import Llama
from .mistral3 import Mistral3
from .olmo2 import Olmo2
from .phi3 import Phi3
from .qwen2 import Qwen2
from .qwen3 import Qwen3
from .qwen3moe import Qwen3Moe
from .qwen35 import Qwen35
from .qwen35moe import Qwen35Moe
from .smollm3 import SmolLM3

ARCHITECTURES: dict[str, type[Transformer]] = {
    cls.architecture: cls for cls in (Llama, Qwen2, Qwen3, Qwen3Moe, Qwen35, Qwen35Moe, Gemma3, Gemma4, Gemma, Gemma2,
                                       Granite, Mistral3, Olmo2, Phi3, SmolLM3, GptOss)
}


def load_model(gguf_file) -> Transformer:
    """The model in an opened runtime.gguf.GGUFFile; weights stay views on its memory map.

    Raises UnsupportedModelError naming the architecture, or UnsupportedTypeError naming
    the tensor and its type, before any computation starts.
    """
    arch = str(gguf_file.metadata.get("general.architecture", ""))
    cls = ARCHITECTURES.get(arch)
    if cls is None:
        raise UnsupportedModelError(unsupported_architecture_message(arch))
    return cls(gguf_file)


__all__ = ["ARCHITECTURES", "HParams", "KVCache", "Matrix", "Transformer",
           "UnsupportedModelError", "load_model"]
