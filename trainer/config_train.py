"""The `train` section of an experiment config: the optimisation. TensorFlow-free, like trainer.config.

Apart from trainer.config, which re-exports it, for the length of its key
reference (the docstring below is the source of docs/configuration.md).
"""

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """The optimisation.

    Attributes:
      epochs: total epochs of the run (a resumed run continues up to this).
      base_learning_rate: learning rate at reference_batch_size; the peak
        learning rate is base_learning_rate * global_batch_size /
        reference_batch_size (the linear scaling rule, Goyal et al. 2017).
      reference_batch_size: the batch size base_learning_rate is quoted for.
      warmup_epochs: epochs of linear warmup from the single-rank learning rate
        (peak / world_size) to the peak.
      lr_decay: after warmup, `cosine` (to 0 at the last step) or `constant`.
      optimizer: adam or sgd (with momentum, Nesterov).
      momentum: SGD momentum.
      weight_decay: decoupled weight decay (Loshchilov and Hutter 2019): every
        optimizer step first multiplies each decayed weight by
        1 - learning_rate x weight_decay (Keras's weight_decay: with adam the
        optimizer is AdamW, with sgd Keras's SGD with it), apart from the
        gradient, which it does not enter; 0 turns it off. The L2
        kernel_regularizer of resnet20 (and of nothing else) stays in the loss
        besides it: see docs/training.md#weight-decay.
      weight_decay_exclude: what weight_decay leaves alone, comma-separated:
        `batchnorm` (the scale gamma and offset beta of BatchNorm layers),
        `bias` (every layer's bias); empty: every trainable weight decays.
      ema: momentum of an exponential moving average of the trainable weights,
        updated after every applied optimizer step (Keras's optimizer EMA:
        average = ema x average + (1 - ema) x weights); 0 turns it off, 0.999
        to 0.9999 are usual. Checkpoints keep the training weights and the
        average (a resume continues both exactly); see train.ema_evaluate.
      ema_evaluate: with train.ema, validation (and so the best checkpoint),
        the export, trainer.evaluate and the summary use the averaged weights
        (the epoch line says `(EMA weights)`, summary.json
        `"evaluated_weights": "ema"`); false: the training weights.
      label_smoothing: the training loss is the cross-entropy against labels
        smoothed by this much: 1 - label_smoothing + label_smoothing / classes
        for the true class, label_smoothing / classes for each other (Szegedy
        et al. 2016; 0.1 in the usual ImageNet recipe). The training `loss` is
        that smoothed loss, which cannot fall below the entropy of the smoothed
        labels; val_loss stays the plain cross-entropy, and the accuracies are
        unchanged in meaning.
      steps_per_epoch: 0 derives it from the training set size:
        examples // (global_batch_size * accumulation_steps), identical on
        every rank.
      resume: continue from the latest checkpoint in run_dir.
      keep_checkpoints: how many of the latest epoch checkpoints to keep.
      validate_every_epochs: evaluate on the whole validation split every N
        epochs, on all ranks at once; 0 evaluates only after the last epoch
        (which is always evaluated).
      best_metric: validation metric that picks the best checkpoint, kept
        besides the latest ones (val_accuracy, val_loss, val_top5_accuracy;
        empty: keep only the latest).
      best_mode: `max` or `min` for best_metric; `auto` is min for losses,
        max otherwise.
      seed: model initialisation seed (rank 0's weights are broadcast);
        0 to 2**31 - 1.
      export: write a TensorFlow SavedModel for serving at the end (RUN_DIR/export;
        see docs/serving.md).
      export_top_k: how many of the most probable classes (indices and names)
        the export's signatures return per image; at most the class count.
      elastic_commit_steps: in elastic mode (launch --elastic), also commit the
        training state every this many steps (0: at epoch ends only). A commit
        copies the variables to host memory and checks for added or removed
        hosts; a failed worker costs the steps since the last commit.
      precision: float32, mixed_bfloat16 or mixed_float16 (the Keras dtype
        policy: float32 weights, the layers compute in the 16-bit type; the
        last layer and its softmax stay float32); `auto` is mixed_bfloat16 on
        GPUs of compute capability >= 8.0, mixed_float16 on older GPUs,
        mixed_bfloat16 on CPUs with bfloat16 instructions (the avx512_bf16 or
        amx_bf16 flag in /proc/cpuinfo) and float32 on other CPUs; summary.json
        says which (docs/training.md). Ranks on different devices take one
        policy: the common one, else mixed_float16 on GPUs and float32 with
        a CPU among them (an elastic worker that differs from rank 0 is
        refused).
      initial_loss_scale: with mixed_float16, the loss scale to start from; it
        halves on every step whose gradients overflow (that step is skipped on
        all ranks) and doubles after 2000 steps without overflow.
      jit_compile: `true` XLA-compiles the gradient computation and the
        optimizer update (the allreduce between them stays outside XLA);
        `auto` does so on GPUs only, as it measured slower on CPU.
      accumulation_steps: micro-batches per optimizer step: their gradients
        are summed locally, then allreduced and applied once (Horovod's
        backward_passes_per_step). The effective global batch, for the
        learning-rate scaling, steps per epoch and checkpoints, is
        global_batch_size * accumulation_steps.
      stop_on_nonfinite: stop every rank at the step where the loss (averaged
        over ranks) or a weight becomes NaN or inf, with exit code 3; no
        checkpoint is written of it, so the newest stays the last finite one.
        Under mixed_float16 a step whose gradients overflow is skipped, not a
        divergence. false: training goes on and the epoch line shows `nan`
        (checkpoints of non-finite weights are still never written).
      precise_bn: recompute the population mean and variance of every
        BatchNorm layer from the current weights over
        train.precise_bn_examples training examples (all ranks pooled, the
        training preprocessing), at the end of each validated epoch before
        its validation, and before the final weights are validated or
        exported; the checkpoint and the export then hold them (Wu and
        Johnson, "Rethinking 'Batch' in BatchNorm", 2021). `auto` does so,
        with one warning, only while the moving averages cannot have
        converged: while momentum ** (steps x accumulation_steps) > 0.001,
        the weight they still give their initial values (fewer than 688
        updates at Keras's momentum 0.99: small data sets, few epochs).
        `true`: at every validation; `false`: never (docs/training.md).
      precise_bn_examples: training examples over all ranks that each
        recomputation of train.precise_bn reads, at most the training set,
        rounded up to whole batches of data.global_batch_size.
    """

    epochs: int = 10
    base_learning_rate: float = 0.1
    reference_batch_size: int = 256
    warmup_epochs: float = 0.0
    lr_decay: str = "cosine"
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    weight_decay_exclude: str = "batchnorm,bias"
    ema: float = 0.0
    ema_evaluate: bool = True
    label_smoothing: float = 0.0
    steps_per_epoch: int = 0
    resume: bool = True
    keep_checkpoints: int = 3
    validate_every_epochs: int = 1
    best_metric: str = "val_accuracy"
    best_mode: str = "auto"
    seed: int = 42
    export: bool = True
    export_top_k: int = 5
    elastic_commit_steps: int = 0
    precision: str = "auto"
    initial_loss_scale: float = 32768.0
    jit_compile: str = "auto"
    accumulation_steps: int = 1
    stop_on_nonfinite: bool = True
    precise_bn: str = "auto"
    precise_bn_examples: int = 4096
