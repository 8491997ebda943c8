"""LoRA adapters: PEFT folders loaded beside the base model, one batch mixing adapters and the base.

adapter.py reads PEFT folders (torch-free to import, for the CLI), manager.py stacks them into a built model,
layers.py holds the wrapped linears and the per-step context; the update itself is kernels/lora.py.
"""
