"""Prefill/decode disaggregation: a prefill engine runs prompts and samples the first token, then the request
and its KV blocks move to a decode engine, which continues it token for token as a mixed engine would.

handoff.py   what moves besides the KV (tokens, sampling state), and the decode side's block allocation
kv_blocks.py whole blocks gathered into one contiguous tensor, and scattered back
local.py     both roles in one process (tests, and the reference for the transfer)
link.py      the transport: a torch.distributed store for control, a gloo group for the KV
sender.py    the prefill side of one transfer; receiver.py: the decode side
instance.py  one role's process loop; frontend.py: PDEngine, a prefill and a decode process behind one API
"""
