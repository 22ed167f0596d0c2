"""Language models: the decoder of the lightweight LM experts (RS-MoE), its import, tokenizer and generation."""
