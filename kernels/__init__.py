"""spec_kernels: fused verification for speculative decoding (Triton kernels + float64 torch references).

    from spec_kernels import verify_chain, verify_tree, ChainResult, TreeResult

Imported as `spec_kernels` (the folder is kernels/): `kernels` is the import name of Hugging Face's
kernel-hub package, which transformers >= 5.25 requires and imports, so this package never installs a
top-level `kernels`. Only torch is imported here; triton is imported on the first call with
backend="triton", so set TRITON_INTERPRET=1 before that call to run the kernels on CPU tensors.
"""

if __name__ == "kernels":
    # This folder was found as a top-level `kernels` because the checkout's root is on sys.path
    # (`python -m ...` run from it). The name belongs to the kernel hub: load that package in this one's
    # place, from the rest of sys.path. Without it installed, stay an empty module with no version, which
    # transformers reads as "kernel hub not available".
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _rest = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _hub = _machinery.PathFinder.find_spec("kernels", _rest)
    if _hub is not None and _hub.loader is not None:
        _module = _util.module_from_spec(_hub)
        _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
        try:
            _hub.loader.exec_module(_module)
        except BaseException:
            del _sys.modules["kernels"]
            raise
else:
    from .api import verify_chain, verify_tree
    from .results import ChainResult, TreeResult

    __all__ = ["verify_chain", "verify_tree", "ChainResult", "TreeResult"]
