"""RS-MoE: the vision-language model over lightweight LM experts (grounded text so far)."""
