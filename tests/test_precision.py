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
