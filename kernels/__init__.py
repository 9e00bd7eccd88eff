"""tspeft_rt.kernels: Triton kernels for gated adapters and their PyTorch reference implementations.

Installed under the `tspeft_rt` namespace (never as a top-level `kernels`, which transformers probes
for). The training path's PyTorch implementation lives in `tspeft_rt.layers`.
"""
