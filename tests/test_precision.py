"""The run's compute precision by device: what auto picks on CPUs and GPUs, what `on` refuses,
and the CPU flags read from /proc/cpuinfo."""

import pytest

from training.precision import choose_precision, cpu_flags

PLAIN_CPU = {"fma", "avx", "avx2"}
BF16_CPU = PLAIN_CPU | {"avx512f", "avx512_bf16", "amx_bf16"}


@pytest.mark.parametrize("gpus, flags, policy", [
    ([], PLAIN_CPU, "float32"),
    ([], BF16_CPU, "float32"),  # measured no faster; `on` asks for it
    ([(8, 0)], PLAIN_CPU, "mixed_bfloat16"),
    ([(9, 0), (8, 6)], PLAIN_CPU, "mixed_bfloat16"),
    ([(7, 5)], BF16_CPU, "mixed_float16"),
    ([(8, 0), (7, 0)], PLAIN_CPU, "mixed_float16"),  # one policy for every replica
])
def test_auto_never_picks_what_the_device_emulates(gpus, flags, policy):
    chosen = choose_precision("auto", gpus, flags)
    assert chosen.policy == policy and chosen.reason


def test_on_needs_hardware():
    assert choose_precision("on", [], BF16_CPU).policy == "mixed_bfloat16"
    assert choose_precision("on", [(7, 0)], PLAIN_CPU).policy == "mixed_float16"
    with pytest.raises(ValueError, match="avx512_bf16 and amx_bf16"):
        choose_precision("on", [], PLAIN_CPU)


@pytest.mark.parametrize("setting, policy", [
    ("off", "float32"), ("bfloat16", "mixed_bfloat16"), ("float16", "mixed_float16")])
def test_explicit_settings_are_kept(setting, policy):
    assert choose_precision(setting, [(8, 0)], PLAIN_CPU).policy == policy
    assert choose_precision(setting, [], PLAIN_CPU).policy == policy


def test_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\n"
                    "flags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()
