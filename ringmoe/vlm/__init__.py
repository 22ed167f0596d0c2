"""RS-MoE: the vision-language model of instruction-routed lightweight LM experts over RingMoE."""
