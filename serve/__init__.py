"""tspeft_rt.serve: the vLLM plugin and server launcher for token-gated adapters.

Installed under the `tspeft_rt` namespace (never as a top-level `serve`).
"""
