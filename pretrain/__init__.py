"""The pretraining entry point and its parts (trainer, state, step, checkpoints, metrics).

Depends on the `ringmoe` library; the library never imports this package.
"""
