"""meshserve: hybrid P/D/V LLM serving (XY-Serve) and wafer-scale MoE planning (MoEntwine)."""

__version__ = "0.1.0"
