"""What pretraining and distillation both run: the train state and optimiser, the jitted
step and the device batches it takes, checkpointing, multi-host start-up and metrics.
The trainer (`pretrain/train.py`) and compression (`ringmoe/compress/distill.py`) build on it."""
