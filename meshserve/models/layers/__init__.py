"""Building blocks shared by every architecture: norm, rotary embedding, gated MLP, attention, MoE."""
