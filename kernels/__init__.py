"""spec_kernels: fused verification for speculative decoding (Triton kernels + float64 torch references).

    from spec_kernels import verify_chain, verify_tree, ChainResult, TreeResult

Imported as `spec_kernels` (the folder is kernels/): `kernels` is the import name of Hugging Face's
kernel-hub package, which transformers probes, so this package never installs a top-level `kernels`.
Only torch is imported here; triton is imported on the first call with backend="triton", so set
TRITON_INTERPRET=1 before that call to run the kernels on CPU tensors.
"""

from .api import verify_chain, verify_tree
from .results import ChainResult, TreeResult

__all__ = ["verify_chain", "verify_tree", "ChainResult", "TreeResult"]
