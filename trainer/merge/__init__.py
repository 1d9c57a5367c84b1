"""Stage 4: LoRA experts merged into one multi-skill LoRA."""
