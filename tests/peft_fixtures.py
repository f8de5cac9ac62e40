"""Helpers for tests that build adapters with peft itself."""

from __future__ import annotations


def randomize_lora_b(peft_model, seed: int, std: float):
    """peft initialises lora_B to zero (the adapter starts as a no-op); a test needs adapters that change the
    model, so every lora_B gets N(0, std) noise from `seed`."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return peft_model
