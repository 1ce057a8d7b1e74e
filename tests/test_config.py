import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.metadata import DataError
from trainer.config import (
    ConfigError,
    ExperimentConfig,
    best_mode,
    check_environment,
    dump_yaml,
    load_config,
    parse_override,
    validate,
    validate_world,
)


def write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return str(p)


def synthetic_cfg(*overrides):
    base = ["run_dir=/tmp/x", "data.synthetic=true", "model.image_size=32", "model.channels=3",
            "model.num_classes=10", "train.steps_per_epoch=5"]
    return load_config(None, base + list(overrides))


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "run_dir: runs/a\ndata:\n  global_batch_size: 128\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["train.base_learning_rate=0.2", "allreduce.fp16_compression=true", "model.name=resnet20"])
    assert cfg.run_dir == "runs/a"
    assert cfg.data.global_batch_size == 128
    assert cfg.train.epochs == 3
    assert cfg.train.base_learning_rate == 0.2
    assert cfg.allreduce.fp16_compression is True
    assert cfg.model.name == "resnet20"
    # An int given for a float field is accepted as a float.
    assert load_config(None, ["train.base_learning_rate=1"]).train.base_learning_rate == 1.0
    # A str field keeps its text even when YAML would read a number.
    assert load_config(None, ["run_dir=2024"]).run_dir == "2024"


def test_dumped_config_loads_back_identically(tmp_path):
    cfg = synthetic_cfg("train.epochs=7", "data.seed=3")
    again = load_config(write(tmp_path, dump_yaml(cfg)))
    assert again == cfg


def test_floats_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 reads 5e-4 as a string; 5.0e-4 as a float.
    assert load_config(None, ["train.weight_decay=5e-4"]).train.weight_decay == 0.0005
    path = write(tmp_path, "train:\n  weight_decay: 1e-4\n  ema: 0.9999\n")
    assert load_config(path).train.weight_decay == 0.0001


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochz=3", "unknown config key 'train.epochz'"),
        ("bogus.x=1", "unknown config key 'bogus'"),
        ("train.epochs=three", "train.epochs='three': expected int"),
        ("train.epochs=2.5", "train.epochs=2.5: expected int"),
        # Both pass `> 0`-style checks: inf trained a whole run on a NaN loss, and inf warm-up epochs crashed.
        ("train.base_learning_rate=.inf", "train.base_learning_rate=inf: expected a finite number"),
        ("train.warmup_epochs=.nan", "train.warmup_epochs=nan: expected a finite number"),
        ("train.weight_decay=inf", "train.weight_decay='inf': expected float"),  # YAML's is .inf: a string
        ("train.resume=1", "train.resume=1: expected bool"),
        ("data=3", "data=3: expected a mapping"),
        ("noequals", "override 'noequals' is not key=value"),
    ],
)
def test_bad_keys_and_types_name_the_key_and_value(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.global_batch_size=0", "data.global_batch_size=0: must be > 0"),
        ("data.global_batch_size=-8", "data.global_batch_size=-8: must be > 0"),
        ("model.name=vgg", "model.name='vgg': is not a built-in model (simple_cnn, resnet20, resnet50) or a "
         "keras.applications name; did you mean VGG19 or VGG16?"),
        ("model.name=efficientnetv2-b0", "model.name='efficientnetv2-b0': is not a built-in model (simple_cnn, "
         "resnet20, resnet50) or a keras.applications name; did you mean EfficientNetV2B0 or EfficientNetV2B3 or "
         "EfficientNetV2B2?"),
        ("model.name=darknet", "model.name='darknet': is not a built-in model (simple_cnn, resnet20, resnet50) or "
         "a keras.applications name (docs/models.md lists them)"),
        ("model.builder=mymodels.build", "model.builder='mymodels.build': must be package.module:function"),
        ("model.builder_output=softmax",
         "model.builder_output='softmax': must be one of auto, probabilities, logits"),
        ("model.unfreeze_epoch=3", "model.unfreeze_epoch=3: needs model.freeze_until"),
        ("model.unfreeze_epoch=-1", "model.unfreeze_epoch=-1: must be >= 0"),
        ("train.epochs=0", "train.epochs=0: must be > 0"),
        ("train.base_learning_rate=0", "train.base_learning_rate=0.0: must be > 0"),
        ("train.optimizer=rmsprop", "train.optimizer='rmsprop': must be one of adam, sgd"),
        ("model.channels=2", "model.channels=2: must be 1, 3 or 0 (from the data)"),
        ("train.steps_per_epoch=0", "train.steps_per_epoch=0: must be set (> 0) with data.synthetic"),
        ("train.validate_every_epochs=-1", "train.validate_every_epochs=-1: must be >= 0"),
        ("train.best_metric=accuracy",
         "train.best_metric='accuracy': must be one of val_accuracy, val_loss, val_top5_accuracy or empty"),
        ("train.best_mode=lowest", "train.best_mode='lowest': must be one of auto, max, min"),
        ("data.augment.crop_area_min=0", "data.augment.crop_area_min=0.0: must be in (0, 1]"),
        ("data.crop_fraction=1.2", "data.crop_fraction=1.2: must be in (0, 1]"),
        ("train.precision=float16",
         "train.precision='float16': must be one of auto, float32, mixed_bfloat16, mixed_float16"),
        ("train.jit_compile=maybe", "train.jit_compile='maybe': must be auto, true or false"),
        ("train.accumulation_steps=0", "train.accumulation_steps=0: must be >= 1"),
        ("train.precise_bn=sometimes", "train.precise_bn='sometimes': must be auto, true or false"),
        ("runtime.bind_cores=fast", "runtime.bind_cores='fast': must be auto or none"),
        ("train.precise_bn_examples=0", "train.precise_bn_examples=0: must be >= 1"),
        ("train.initial_loss_scale=0.5", "train.initial_loss_scale=0.5: must be >= 1"),
        ("train.label_smoothing=1", "train.label_smoothing=1.0: must be in [0, 1)"),
        ("train.label_smoothing=-0.1", "train.label_smoothing=-0.1: must be in [0, 1)"),
        ("train.weight_decay=-0.01", "train.weight_decay=-0.01: must be in [0, 1)"),
        ("train.weight_decay=1", "train.weight_decay=1.0: must be in [0, 1)"),
        ("train.weight_decay_exclude=batchnorm,gamma", "train.weight_decay_exclude='batchnorm,gamma': must be empty "
                                                       "or a comma-separated list of batchnorm, bias"),
        ("train.ema=1", "train.ema=1.0: must be in [0, 1) (0: off)"),
        ("train.ema=-0.5", "train.ema=-0.5: must be in [0, 1) (0: off)"),
        ("data.augment.randaugment_layers=-1", "data.augment.randaugment_layers=-1: must be >= 0"),
        ("data.augment.randaugment_magnitude=1.5", "data.augment.randaugment_magnitude=1.5: must be in [0, 1]"),
        ("data.augment.randaugment_magnitude=-0.1", "data.augment.randaugment_magnitude=-0.1: must be in [0, 1]"),
        ("data.augment.mixup_alpha=-0.2", "data.augment.mixup_alpha=-0.2: must be >= 0 (0: off)"),
        ("data.augment.cutmix_alpha=-1", "data.augment.cutmix_alpha=-1.0: must be in [0, 1] (0: off)"),
        ("data.augment.cutmix_alpha=2", "data.augment.cutmix_alpha=2.0: must be in [0, 1] (0: off)"),
    ],
)
def test_bad_values_are_rejected_with_key_and_value(override, message):
    with pytest.raises(ConfigError) as e:
        validate(synthetic_cfg(override))
    assert str(e.value) == message
    assert "\n" not in str(e.value)


def test_weight_decay_times_the_peak_learning_rate_must_stay_below_1():
    validate(synthetic_cfg("train.weight_decay=0.5", "train.base_learning_rate=4"))  # peak 1: 0.5 a step
    with pytest.raises(ConfigError) as e:
        validate(synthetic_cfg("train.weight_decay=0.5", "train.base_learning_rate=8"))
    assert str(e.value) == ("train.weight_decay=0.5: times the peak learning rate 2 must be < 1: each step multiplies "
                            "the weights by 1 - their product")


def test_data_dir_checks(tmp_path):
    missing = load_config(None, ["run_dir=r", f"data.dir={tmp_path / 'nope'}"])
    validate(missing)  # the values alone are fine: the file system is check_environment's
    with pytest.raises(ConfigError, match="folder does not exist"):
        check_environment(missing)
    # A folder that exists but lacks its files is the data's fault, not the config's.
    empty = load_config(None, ["run_dir=r", f"data.dir={tmp_path}"])
    with pytest.raises(DataError, match="has no metadata.json"):
        check_environment(empty)
    (tmp_path / "metadata.json").write_text("{}")
    with pytest.raises(DataError, match=r"has no train-\*.tfrecord shards"):
        check_environment(empty)


def test_global_batch_must_divide_by_world_size():
    cfg = synthetic_cfg("data.global_batch_size=63")
    validate_world(cfg, 1)
    validate_world(cfg, 3)
    with pytest.raises(ConfigError) as e:
        validate_world(cfg, 2)
    assert str(e.value) == "data.global_batch_size=63: is not divisible by the world size 2"


@pytest.mark.parametrize("mix", ["data.augment.mixup_alpha=0.2", "data.augment.cutmix_alpha=1"])
def test_mixing_needs_two_examples_per_rank(mix):
    cfg = synthetic_cfg("data.global_batch_size=2", mix)
    validate_world(cfg, 1)
    with pytest.raises(ConfigError) as e:
        validate_world(cfg, 2)
    assert str(e.value) == ("data.global_batch_size=2: leaves 1 example per rank and step at the world size 2: "
                            "mixup and cutmix (data.augment.mixup_alpha, cutmix_alpha) need at least 2")
    validate_world(synthetic_cfg("data.global_batch_size=2"), 2)  # unmixed, one example per rank is fine
    validate_world(synthetic_cfg("data.global_batch_size=2", "train.accumulation_steps=2", mix), 2)  # 2 per step


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="No such file"):
        load_config(str(tmp_path / "missing.yaml"))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("run_dir: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(str(latin1))
    assert str(e.value) == f"config file {str(latin1)!r}: not UTF-8 (byte 0xe9 at offset 12)"


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    assert parse_override("a.b=") == ("a.b", "")


def test_shipped_configs_load():
    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_config(str(configs / "digits.yaml"))
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.model.name == "simple_cnn"
    for path in sorted(configs.glob("*.yaml")):  # every key known, every value valid
        validate(load_config(str(path)))


def test_best_mode_auto_minimises_losses_and_maximises_the_rest():
    assert best_mode(synthetic_cfg().train) == "max"  # val_accuracy, the default
    assert best_mode(synthetic_cfg("train.best_metric=val_loss").train) == "min"
    assert best_mode(synthetic_cfg("train.best_metric=val_loss", "train.best_mode=max").train) == "max"


def test_config_imports_without_tensorflow():
    # The launcher checks a config before it starts any worker: trainer.config
    # (and all it imports) must not pull in TensorFlow, Keras or Horovod.
    code = ("import sys, trainer.config; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'horovod') if m in sys.modules))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
