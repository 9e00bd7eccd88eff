"""tspeft-rt: a runtime for token-selective fine-tuning (TS-PEFT) and serving of LoRA/DoRA adapters."""

__version__ = "0.1.0"
