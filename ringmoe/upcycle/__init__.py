"""Sparse upcycling: a dense SwinV2 checkpoint turned into the hierarchical MoE (Komatsuzaki
et al., ICLR 2023), the inverse of `ringmoe.compress`. `plan` says where every parameter of
the MoE comes from, `routers` how the fresh routers start, `build` makes the step-0 train
state, sharded like training, and writes it where `pretrain.train --workdir` resumes."""
