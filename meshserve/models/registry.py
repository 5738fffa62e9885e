"""Hugging Face `architectures` names -> our model classes."""

from __future__ import annotations

from meshserve.models.decoder import DecoderLM
from meshserve.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from meshserve.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from meshserve.models.granitemoe import GraniteMoeForCausalLM
from meshserve.models.llama import LlamaForCausalLM
from meshserve.models.mistral import MistralForCausalLM
from meshserve.models.mixtral import MixtralForCausalLM
from meshserve.models.olmoe import OlmoeForCausalLM
from meshserve.models.phi3 import Phi3ForCausalLM
from meshserve.models.qwen2 import Qwen2ForCausalLM
from meshserve.models.qwen2_moe import Qwen2MoeForCausalLM
from meshserve.models.qwen3 import Qwen3ForCausalLM
from meshserve.models.qwen3_moe import Qwen3MoeForCausalLM

ARCHITECTURES: dict[str, type[DecoderLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "OlmoeForCausalLM": OlmoeForCausalLM,
    "GraniteMoeForCausalLM": GraniteMoeForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}
# The same decoders saved without their LM head (LlamaModel, Qwen3Model, ...): embedding checkpoints.
ARCHITECTURES |= {name.removesuffix("ForCausalLM") + "Model": cls for name, cls in ARCHITECTURES.items()}
