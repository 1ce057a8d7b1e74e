"""The launcher's check of the model a config builds, run apart: `python -m trainer.model_check JSON`.

For what can be checked only by building the model: model.builder (imports,
builds, its shapes), model.initial_weights (a file that matches no layer) and
model.freeze_until (a layer name the model has). trainer.data_spec.check_model
runs it in a child process on the CPU when any of them is set, so the
launcher, which stays up for the whole job, neither holds TensorFlow's memory
nor a GPU. The one line of a failure goes to stderr; the exit code is 2.

With `"count": true` it builds the model only (as it trains once unfrozen, no
initial weights) and prints one line, SIZE_PREFIX and a JSON object: what
every step allreduces (trainer/step.py), for `python -m launch plan`.
"""

import json
import sys

from trainer.config import ModelConfig

ERROR_PREFIX = "model check: "  # the line the launcher takes, among whatever TensorFlow logs
SIZE_PREFIX = "model size: "


def check(model_cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """Builds the model as a worker does, then loads its initial weights and finds its freeze layer."""
    from trainer.freeze import freeze_layers
    from trainer.initial_weights import load_initial_weights
    from trainer.models import build_net

    model = build_net(model_cfg, input_shape, num_classes)
    if model_cfg.initial_weights:
        load_initial_weights(model, model_cfg.initial_weights)
    if model_cfg.freeze_until:
        freeze_layers(model, model_cfg.freeze_until)


def size(model_cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> dict:
    """The trainable variables (whose gradients are allreduced) and the float state: counts and bytes."""
    import numpy as np

    from trainer.models import build_net
    from trainer.step import float_state

    model = build_net(model_cfg, input_shape, num_classes)
    state = float_state(model.non_trainable_variables)

    def count(variables, nbytes=False):
        return sum(int(np.prod(v.shape)) * (np.dtype(v.dtype).itemsize if nbytes else 1) for v in variables)

    trainable = model.trainable_variables
    return {"trainable_params": count(trainable), "trainable_bytes": count(trainable, True),
            "trainable_tensors": len(trainable),
            "state_params": count(state), "state_bytes": count(state, True), "state_tensors": len(state),
            # each tensor's bytes, in the order of the step's allreduce: for Horovod's fusion
            "trainable_tensor_bytes": [count([v], True) for v in trainable],
            "state_tensor_bytes": [count([v], True) for v in state]}


def main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    try:
        if args.get("count"):
            print(SIZE_PREFIX + json.dumps(size(ModelConfig(**args["model"]), tuple(args["input_shape"]),
                                                int(args["num_classes"]))))
            return 0
        check(ModelConfig(**args["model"]), tuple(args["input_shape"]), int(args["num_classes"]))
    except ValueError as e:  # ConfigError and InitialWeightsError: bad input, one line
        print(ERROR_PREFIX + str(e).splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
