"""The workers' exit codes (`python -m trainer.train`, `trainer.evaluate`), which the launcher passes on.

TensorFlow-free: the launcher reads them to tell a worker that explained its
own end in one line from one that crashed or was killed.
"""

EXIT_BAD_INPUT = 2  # a bad config, data or checkpoint, or a run folder in use: one line on stderr
EXIT_NONFINITE = 3  # the loss or the weights became non-finite (train.stop_on_nonfinite)
EXIT_WRITE_FAILED = 74  # a write of the run failed (EX_IOERR); the earlier checkpoints are intact
EXIT_STOPPED = 143  # 128 + SIGTERM, whichever signal asked for the stop: resumable

# A worker that ends with one of these has found what is wrong, and said it in its own line.
CAUSES = frozenset({EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_WRITE_FAILED})
# ... and with these it has said why it ended.
OWN_LINE = CAUSES | {EXIT_STOPPED}
