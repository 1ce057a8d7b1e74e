"""Evaluates a checkpoint on the validation split, on one or more ranks, and can export it.

    python -m trainer.evaluate --config configs/digits.yaml --checkpoint best [--export DIR]
    horovodrun -np 2 python -m trainer.evaluate --config configs/digits.yaml --checkpoint best

`--checkpoint` is `latest`, `best` (see checkpoints/best.json) or a checkpoint
folder of the config's run_dir. Any number of ranks gives the same result (up
to float rounding): each evaluates its own part of the split and the sums are
combined (trainer.evaluation). A run with train.ema is evaluated (and exported)
with its averaged weights, as its validation was (train.ema_evaluate: false,
the training weights). Rank 0 prints one line, `evaluation {json}`,
and with `--export DIR` writes a SavedModel of that checkpoint to DIR, which
must not exist yet. Nothing in run_dir is written.

Exit codes: 0 done; 2 bad config, data or checkpoint (one line on stderr); 74 the
export could not be written (one line: the file and the errno); 1 anything else.
"""

import logging
import os

from data_pipeline.arguments import ArgumentParser
from trainer import exit_after_collecting
from trainer.config import ConfigError, check_environment, load_config, validate
from trainer.data_spec import check_evaluation, model_signature, resolve_data
from trainer.exit_codes import EXIT_WRITE_FAILED
from trainer.train import report_stop, run_reporting_bad_input, setup_logging


def parse_args(argv):
    parser = ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML experiment file of the run (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    parser.add_argument("--checkpoint", default="best", help="latest, best (default) or a checkpoint folder")
    parser.add_argument("--export", default="", metavar="DIR", help="write a SavedModel of the checkpoint to DIR")
    return parser.parse_args(argv)


def evaluate_checkpoint(cfg, ctx, which: str, export_dir: str) -> None:
    from trainer.assembly import build_compiled_model, run_precision
    from trainer.data import make_evaluator
    from trainer.ema import EvaluatedWeights, averages
    from trainer.outputs import make_outputs
    from trainer.resume import broadcast_restore
    from trainer.schedule import make_schedule

    spec = resolve_data(cfg)
    # Any batch evaluates the same examples; the training one need not divide by this world size.
    per_replica = max(1, cfg.data.global_batch_size // ctx.size)
    model = build_compiled_model(cfg, spec, make_schedule(cfg.train, cfg.data.global_batch_size, ctx.size,
                                                          spec.steps_per_epoch), precision=run_precision(cfg, ctx))
    evaluator = make_evaluator(cfg, spec, ctx, per_replica)
    outputs = make_outputs(ctx, cfg)
    state = broadcast_restore(ctx, lambda: outputs.restore(model, which, model_signature(cfg, spec)))
    ctx.broadcast_variables(model.variables, "eval.model")  # rank 0 alone loaded the checkpoint
    ctx.broadcast_variables(averages(model.optimizer), "eval.average")
    # The weights the run validated: the average with train.ema (and train.ema_evaluate), for the export too.
    with EvaluatedWeights(model, cfg.train.ema_evaluate).swapped() as weights:
        result = evaluator.evaluate(model)
        report = {
            "checkpoint": state["path"], "epoch": state.get("epoch"), "global_step": state.get("global_step"),
            "config_sha256": state.get("config_sha256"), "evaluated_weights": weights.name,
            "precision": model.dtype_policy.name,
            "world_size": ctx.size, "val_examples": result["examples"], "eval_time_sec": round(result["time_sec"], 3),
            **{f"val_{k}": v for k, v in result.items() if k not in ("examples", "time_sec")},
        }
        outputs.report_evaluation(model, report, export_dir)


def checked_config(args):
    """The config, after every check that needs no TensorFlow, the checkpoint's model among them."""
    cfg = load_config(args.config, args.overrides)
    validate(cfg)
    check_environment(cfg)
    if args.export and os.path.exists(args.export):
        raise ConfigError(f"--export {args.export!r}: already exists; name a new folder")
    if args.export and not os.path.isdir(os.path.dirname(os.path.abspath(args.export))):
        raise ConfigError(f"--export {args.export!r}: its folder does not exist")
    check_evaluation(cfg, args.checkpoint)
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    os.umask(0o027)
    cfg, code = run_reporting_bad_input(lambda: checked_config(args))
    if code:
        return code

    from trainer.distributed import DistContext

    ctx = DistContext.initialize(cfg.runtime.intra_op_threads, cfg.runtime.inter_op_threads,
                                 cfg.runtime.bind_cores)
    setup_logging(lambda: ctx.rank, ctx.is_chief or cfg.runtime.log_all_ranks)
    logging.getLogger("trainer.evaluate").info("rank %d of %d evaluating checkpoint %s", ctx.rank, ctx.size,
                                                args.checkpoint)
    ctx.log_binding(logging.getLogger("trainer.evaluate"))
    from trainer.failures import WriteFailed

    try:
        _, code = run_reporting_bad_input(lambda: evaluate_checkpoint(cfg, ctx, args.checkpoint, args.export))
    except WriteFailed as e:  # rank 0's export
        return report_stop(f"write error: {e}", EXIT_WRITE_FAILED)
    return code


if __name__ == "__main__":
    exit_after_collecting(main())
