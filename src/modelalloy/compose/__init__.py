"""Recombining structure: mixtures of experts from dense models (`moe`), LoRA adapters applied,
combined and extracted (`lora`), layer stacking and grafting (`stack`). Each builds on the merge
engine (a plan where it can) and is called by the CLI; nothing below imports this package."""
