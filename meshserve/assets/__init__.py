"""Files shipped with meshserve: the trained tiny models (docs/models.md) and their wafer presets."""

from pathlib import Path

ASSETS = Path(__file__).parent
TINY_MOE = ASSETS / "models" / "tiny-moe"  # DeepSeek-V3-style: MLA, 64 experts top-8 in 8 groups
TINY_DRAFT = ASSETS / "models" / "tiny-draft"  # Llama-style draft for speculative decoding
TINY_MOE_WAFER = ASSETS / "wafer" / "tiny-moe.yaml"  # tiny-moe's shape as a wafer model preset
WSC_2X4 = ASSETS / "wafer" / "wsc-2x4.yaml"  # a 2x4-die mesh: one die per expert group of tiny-moe
