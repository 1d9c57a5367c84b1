"""The LoRA file format: kohya keys per architecture, reading, writing, metadata."""
