"""Text encoding: the CLIP tokenizer and prompt -> conditioning."""
