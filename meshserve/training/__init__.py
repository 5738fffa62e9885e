"""Train the tiny models meshserve ships (a MoE target and a dense draft) on the Python standard library."""
