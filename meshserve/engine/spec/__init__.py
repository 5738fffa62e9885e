"""Speculative decoding: proposers (n-gram prompt lookup, draft model) and the verify / accept rule.

Drafts are proposed before a step; the scheduler turns a request with k drafts into a verify work item of
k + 1 tokens in the same forward as other requests' prefill chunks and decodes; ``verify`` then keeps the
longest accepted prefix plus one target token, so the output (greedy or seeded sampling) is exactly the
target's own, token for token.
"""

from meshserve.engine.spec.config import SpecConfig
from meshserve.engine.spec.draft import DraftModelProposer
from meshserve.engine.spec.ngram import NgramProposer, propose_ngram
from meshserve.engine.spec.verify import VerifyResult, verify

__all__ = [
    "DraftModelProposer",
    "NgramProposer",
    "SpecConfig",
    "VerifyResult",
    "propose_ngram",
    "verify",
]
