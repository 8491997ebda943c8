"""LoRA adapters: PEFT folders loaded beside the base model, one batch mixing adapters and the base."""

from lmserve.lora.adapter import MAX_LORA_RANK, LoRAAdapter, load_adapter, parse_adapters
from lmserve.lora.manager import LoRAManager, adapter_slot, attach_adapters

__all__ = [
    "MAX_LORA_RANK",
    "LoRAAdapter",
    "LoRAManager",
    "adapter_slot",
    "attach_adapters",
    "load_adapter",
    "parse_adapters",
]
