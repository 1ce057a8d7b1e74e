"""Data-parallel training of Keras 3 CNNs with Horovod: config, step, loop and outputs."""

import os

# TensorFlow's C++ warnings are off unless the caller sets the variable (0 shows them all), as the launcher does
# for its ranks: for example the rendezvous that an image which does not decode aborts, which trainer.predict
# reports itself in one line. (TensorFlow's first start-up line is printed whatever the level.)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
