"""`train.precision: auto`: which policy it resolves to, from the device and the CPU's bfloat16 instructions."""

import pytest

# An AVX-512 CPU without bfloat16 (Skylake-SP), then the flags that add it (Cooper Lake, Sapphire Rapids).
SKYLAKE = "fpu vme de pse tsc msr sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx512f avx512dq avx512bw avx512vl"


@pytest.mark.parametrize("flags, expected", [
    (SKYLAKE, False),
    ("", False),
    (SKYLAKE + " avx512_bf16", True),
    (SKYLAKE + " amx_bf16 amx_tile amx_int8", True),
    ("avx512_bf16\n", True),
    # Whole flags only: neither a prefix nor an unrelated flag with bf16 in its name.
    (SKYLAKE + " avx512_bf16x avx_ne_convert", False),
    (SKYLAKE + " avx512_fp16 amx_fp16", False),
])
def test_cpu_bfloat16_support_is_read_from_the_cpu_flags(flags, expected):
    from trainer.assembly import cpu_has_bfloat16

    assert cpu_has_bfloat16(flags) is expected


@pytest.mark.parametrize("precision, capability, cpu_bfloat16, expected", [
    ("auto", None, True, "mixed_bfloat16"),
    ("auto", None, False, "float32"),
    # GPUs: their compute capability decides, whatever the host CPU.
    ("auto", (8, 0), False, "mixed_bfloat16"),
    ("auto", (7, 5), True, "mixed_float16"),
    # An explicit value is kept.
    ("float32", None, True, "float32"),
    ("mixed_float16", None, True, "mixed_float16"),
    ("mixed_bfloat16", None, False, "mixed_bfloat16"),
])
def test_auto_precision_follows_the_device(precision, capability, cpu_bfloat16, expected):
    from trainer.assembly import resolve_precision

    assert resolve_precision(precision, capability, cpu_bfloat16) == expected


def test_the_built_model_computes_in_the_precision_auto_resolves_to_on_this_machine():
    import keras

    from trainer.assembly import build_compiled_model, cpu_flags, cpu_has_bfloat16, gpu_compute_capability
    from trainer.config import load_config
    from trainer.data_spec import DataSpec

    # What this machine's first processor lists, read independently of trainer.assembly.
    with open("/proc/cpuinfo") as f:
        first = next((line.split(":", 1)[1] for line in f if line.startswith("flags")), "")
    assert cpu_flags().split() == first.split()
    expected = "mixed_bfloat16" if {"avx512_bf16", "amx_bf16"} & set(first.split()) else "float32"
    if gpu_compute_capability() is not None:
        pytest.skip("a GPU decides the precision")
    assert cpu_has_bfloat16(cpu_flags()) is (expected == "mixed_bfloat16")
    cfg = load_config("configs/digits.yaml", [])
    assert cfg.train.precision == "auto"
    model = build_compiled_model(cfg, DataSpec((8, 8, 1), 10, 2, [], []), 0.01)
    assert model.dtype_policy.name == expected
    assert model.layers[1].compute_dtype == ("bfloat16" if expected == "mixed_bfloat16" else "float32")
    assert model.output.dtype == "float32" and all(w.dtype == "float32" for w in model.weights)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left as it was


@pytest.mark.parametrize("devices, expected", [
    ([(None, True), (None, True)], "mixed_bfloat16"),
    ([(None, False), (None, False)], "float32"),
    # A CPU without bfloat16 among them: the one every CPU runs.
    ([(None, True), (None, False)], "float32"),
    # Ampere beside Volta: mixed_float16, which both run; not bfloat16 on one and float16 on the other.
    ([((8, 0), False), ((7, 0), False)], "mixed_float16"),
    ([((8, 0), False), ((9, 0), True)], "mixed_bfloat16"),
    ([((8, 0), False), (None, False)], "float32"),
])
def test_ranks_on_different_devices_agree_on_one_policy(devices, expected):
    from trainer.assembly import agreed_precision

    assert agreed_precision("auto", devices) == expected
    assert agreed_precision("float32", devices) == "float32"  # an explicit value is kept


AGREE = r"""
import json, sys
import horovod.tensorflow as hvd
from trainer import assembly
from trainer.config import load_config
from trainer.data_spec import DataSpec
from trainer.distributed import DistContext

ctx = DistContext.initialize(1, 1)
# Rank 1 stands for a host whose CPU lists the flags given (the probe of /proc/cpuinfo is replaced there only).
if ctx.rank == 1:
    assembly.cpu_flags = lambda: sys.argv[1]
cfg = load_config("configs/digits.yaml", [])
local = assembly.resolve_precision("auto", *assembly.this_device())
precision = assembly.run_precision(cfg, ctx)
model = assembly.build_compiled_model(cfg, DataSpec((8, 8, 1), 10, 2, [], []), 0.01, precision=precision)
print("REPORT " + json.dumps({"rank": ctx.rank, "local": local, "policy": model.dtype_policy.name}), flush=True)
"""


@pytest.mark.horovod
def test_two_ranks_whose_cpus_differ_train_in_one_precision(tmp_path):
    from helpers import worker_reports
    from trainer.assembly import cpu_flags, cpu_has_bfloat16

    if not cpu_has_bfloat16(cpu_flags()):
        pytest.skip("needs a CPU with bfloat16 instructions, so that the two ranks' `auto` differ")
    r0, r1 = worker_reports(tmp_path, AGREE, SKYLAKE)
    assert (r0["local"], r1["local"]) == ("mixed_bfloat16", "float32")
    assert r0["policy"] == r1["policy"] == "float32"


def test_an_elastic_worker_whose_precision_differs_from_rank_0s_is_refused():
    from trainer.config import ConfigError
    from trainer.elastic import check_precision

    check_precision("mixed_bfloat16", "mixed_bfloat16", "auto")
    with pytest.raises(ConfigError, match=r"train.precision=auto: this worker's device gives float32, rank 0's "
                                          r"mixed_bfloat16"):
        check_precision("mixed_bfloat16", "float32", "auto")
