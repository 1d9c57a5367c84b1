"""Stage 1: skill-specific prompts from an LLM, kept diverse by ROUGE-L."""
