"""Recombining structure: mixtures of experts from dense models (`moe`; its config, router and
tensor names in `moe_config`, `moe_router`, `moe_layout`), LoRA adapters applied, combined and
extracted (`lora`), layer stacking and grafting (`stack`). Each builds on the merge
engine (a plan where it can) and is called by the CLI; nothing below imports this package."""
