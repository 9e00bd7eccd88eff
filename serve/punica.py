"""The gated punica wrapper: vLLM's own per-batch LoRA metadata, plus the gated layers' `SlotBatch`.

vLLM's LoRA model manager builds one punica wrapper per model part (`get_punica_wrapper`), calls its
`update_metadata` whenever the batch's token -> adapter mapping or the slot layout changes, and hands
the wrapper to every LoRA layer. The plugin swaps in `get_gated_punica_wrapper`: the platform's own
wrapper class (CPU or CUDA) with `update_metadata` extended to refresh the wrapper's `SlotBatch` from
`token_lora_indices`, which vLLM rewrites for every mapping (its no-adapter batches included; the
CUDA kernel metadata in `token_mapping_meta` is left stale then, so the gated layers never read it).
"""

from __future__ import annotations

from functools import cache

from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
from vllm.platforms import current_platform
from vllm.utils.import_utils import resolve_obj_by_qualname

from tspeft_rt.serve.state import SlotBatch


class GatedPunicaWrapper:
    """Mixin before a vLLM punica wrapper class: one `SlotBatch` refreshed with vLLM's metadata."""

    slot_batch: SlotBatch

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs) -> None:
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self.slot_batch.update(self.token_lora_indices)


@cache
def gated_punica_class(cls: type[PunicaWrapperBase]) -> type:
    return type(f"Gated{cls.__name__}", (GatedPunicaWrapper, cls), {})


def get_gated_punica_wrapper(max_num_batched_tokens: int, *args, **kwargs) -> PunicaWrapperBase:
    """vLLM's `get_punica_wrapper` (same arguments), returning the gated subclass of the platform's class."""
    cls = resolve_obj_by_qualname(current_platform.get_punica_wrapper())
    wrapper = gated_punica_class(cls)(max_num_batched_tokens, *args, **kwargs)
    wrapper.slot_batch = SlotBatch(max_num_batched_tokens, kwargs["lora_config"].max_loras, wrapper.device)
    return wrapper
