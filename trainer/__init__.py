"""Data-parallel training of Keras 3 CNNs with Horovod: config, step, loop and outputs."""
