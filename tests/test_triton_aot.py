"""Ahead-of-time compilation of every launch configuration the Triton launchers can choose
(their ``*_constexprs`` functions), per dtype, for sm_80 and sm_90, with the compiled kernel's
shared memory and registers checked against the target's limits: what a GPU would refuse at
launch, or run spilling, is found here without one.

The default run compiles the configurations the papers' networks and loss use; the rest are
marked ``aot_matrix`` and run in a separate step of .ci/run (minutes)."""

import itertools

import pytest
from torch import nn
from triton_checks import compile_for, cubin_resources

import models
from mtkernels.triton.conv import conv2d_bias_act_kernel, conv_constexprs, linear_bias_act_kernel, linear_constexprs
from mtkernels.triton.multitask_loss import MAX_BLOCK_C, loss_constexprs, multitask_loss_kernel

CAPABILITIES = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
# Per block: shared memory with the opt-in carve-out (A100: 163 KiB, H100: 227 KiB), and the
# register file a block may use; per thread at most 255 registers.
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}
REGISTERS_PER_BLOCK = 65536
MAX_REGISTERS_PER_THREAD = 255

# Conv kernel sizes the launcher is given: those of the papers' networks (checked below).
CONV_KERNEL_SIZES = ((1, 1), (3, 3))
# Channel counts that reach each BLOCK_N the launchers choose (16, 32, 64).
WIDTHS = (16, 32, 64)


def config_id(constexprs: dict) -> str:
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items())


def matrix(configs, default):
    """pytest params for (dtype, capability, constexprs); those for which ``default(constexprs)`` is
    false run only in the ``aot_matrix`` step."""
    params = []
    for constexprs, dtype, capability in itertools.product(configs, DTYPES, CAPABILITIES):
        marks = () if default(constexprs) else (pytest.mark.aot_matrix,)
        params.append(pytest.param(dtype, capability, constexprs, marks=marks,
                                   id=f"{dtype}-sm{capability}-{config_id(constexprs)}"))
    return params


def distinct(configs):
    return list({config_id(c): c for c in configs}.values())


LOSS_CONFIGS = distinct(loss_constexprs((classes,), kind, grad) for classes in (2 ** k for k in range(11))
                        for kind in ("ce", "svm") for grad in (True, False))
CONV_CONFIGS = distinct(conv_constexprs(size, c_out, relu, pool) for size in CONV_KERNEL_SIZES for c_out in WIDTHS
                        for relu in (True, False) for pool in (True, False))
LINEAR_CONFIGS = distinct(linear_constexprs(n_out, relu) for n_out in WIDTHS for relu in (True, False))


def assert_fits(compiled, name: str, capability: int) -> None:
    ptx = compiled.asm["ptx"]
    assert f".entry {name}" in ptx and f".target sm_{capability}" in ptx
    resources = cubin_resources(compiled.asm["cubin"])
    threads = compiled.metadata.num_warps * 32
    shared = compiled.metadata.shared + resources["SHARED"]
    assert shared <= MAX_SHARED_BYTES[capability], f"{shared} B of shared memory > sm_{capability}'s limit"
    assert resources["REG"] <= MAX_REGISTERS_PER_THREAD
    assert resources["REG"] * threads <= REGISTERS_PER_BLOCK, f"{resources['REG']} registers x {threads} threads"
    assert resources["LOCAL"] == 0, f"{resources['LOCAL']} bytes of register spills"


def loss_signature(dtype: str) -> dict:
    return {"logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "offsets_ptr": "*i32", "weights_ptr": "*fp32",
            "loss_ptr": "*fp32", "grad_ptr": f"*{dtype}", "invalid_ptr": "*i32", "n_rows": "i32",
            "logits_row_stride": "i32", "num_tasks": "i32", "row_scale": "fp32", "margin": "fp32",
            **{name: "constexpr" for name in ("BLOCK_N", "BLOCK_C", "IS_SVM", "COMPUTE_GRAD")}}


def bias_act_signature(dtype: str, sizes: tuple[str, ...], constexprs: dict) -> dict:
    return {**{name: f"*{dtype}" for name in ("x_ptr", "w_ptr", "bias_ptr", "out_ptr")},
            **{name: "i32" for name in sizes}, **{name: "constexpr" for name in constexprs}}


@pytest.mark.parametrize("dtype,capability,constexprs",
                         matrix(LOSS_CONFIGS, lambda c: c["BLOCK_C"] == 8 and c["COMPUTE_GRAD"]))
def test_loss_kernel(dtype, capability, constexprs):
    compiled = compile_for(multitask_loss_kernel, loss_signature(dtype), constexprs, capability)
    assert_fits(compiled, "multitask_loss_kernel", capability)


@pytest.mark.parametrize("dtype,capability,constexprs",
                         matrix(CONV_CONFIGS, lambda c: c["KH"] == 3 and c["BLOCK_N"] == 64 and c["RELU"]))
def test_conv_kernel(dtype, capability, constexprs):
    sizes = ("n_out_rows", "height", "width", "c_in", "c_out", "out_h", "out_w", "stride", "pad")
    compiled = compile_for(conv2d_bias_act_kernel, bias_act_signature(dtype, sizes, constexprs), constexprs,
                           capability)
    assert_fits(compiled, "conv2d_bias_act_kernel", capability)


@pytest.mark.parametrize("dtype,capability,constexprs",
                         matrix(LINEAR_CONFIGS, lambda c: c["BLOCK_N"] == 64 and c["RELU"]))
def test_linear_kernel(dtype, capability, constexprs):
    compiled = compile_for(linear_bias_act_kernel, bias_act_signature(dtype, ("rows", "n_out", "n_in"), constexprs),
                           constexprs, capability)
    assert_fits(compiled, "linear_bias_act_kernel", capability)


def test_the_matrix_covers_every_choice():
    """Every BLOCK_C the loss launcher can pick, every BLOCK_N of the conv / linear launchers,
    and every conv kernel size of the papers' networks."""
    assert {c["BLOCK_C"] for c in LOSS_CONFIGS} == {2 ** k for k in range(MAX_BLOCK_C.bit_length())}
    assert loss_constexprs((5000,), "ce", True)["BLOCK_C"] == MAX_BLOCK_C
    assert {c["BLOCK_N"] for c in CONV_CONFIGS} == {conv_constexprs((3, 3), n, True, True)["BLOCK_N"]
                                                    for n in range(1, 4096)}
    assert {c["BLOCK_N"] for c in LINEAR_CONFIGS} == {linear_constexprs(n, True)["BLOCK_N"] for n in range(1, 4096)}
    used = {m.kernel_size for name in models.MODELS for m in models.build_model(name).modules()
            if isinstance(m, nn.Conv2d)}
    assert used <= set(CONV_KERNEL_SIZES), used
    assert len(LOSS_CONFIGS) == 11 * 2 * 2  # BLOCK_C x kind x gradient
