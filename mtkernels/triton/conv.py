"""Triton kernels for the fused inference path (CUDA / ROCm), NHWC activations.

``conv2d_bias_act_kernel``: implicit-GEMM convolution, GEMM rows = output pixels, columns
= output channels, K = (kh, kw, c_in). Epilogue: + bias, ReLU, and optionally the 2x2/2
max-pool: rows are then ordered (pooled pixel, window position) so that groups of 4
consecutive rows form one window; the tile is reshaped to [pixels, 4, channels], reduced
with max, and only the pooled output is written.

``linear_bias_act_kernel``: y = x @ w.T + bias (+ ReLU), for the fused multi-task heads
(the concatenated first layers and the block-diagonal later layers).

float32 inputs use TF32 tensor cores; float16 / bfloat16 accumulate in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .float_ops import max_nan, relu_nan


@triton.jit
def conv2d_bias_act_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    n_out_rows, height, width, c_in, c_out, out_h, out_w, stride, pad,
    KH: tl.constexpr, KW: tl.constexpr, RELU: tl.constexpr, POOL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # n_out_rows counts written pixels: pooled ones when POOL. out_h/out_w: the conv's output.
    WINDOW: tl.constexpr = 4 if POOL else 1
    ROWS: tl.constexpr = BLOCK_M * WINDOW
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    r = tl.arange(0, ROWS)
    pixel = pid_m * BLOCK_M + r // WINDOW  # written pixel of this GEMM row
    pixel_ok = pixel < n_out_rows
    if POOL:
        pooled_w = out_w // 2
        pooled_h = out_h // 2
        img = pixel // (pooled_h * pooled_w)
        rem = pixel % (pooled_h * pooled_w)
        oy = (rem // pooled_w) * 2 + (r % WINDOW) // 2
        ox = (rem % pooled_w) * 2 + (r % WINDOW) % 2
    else:
        img = pixel // (out_h * out_w)
        rem = pixel % (out_h * out_w)
        oy = rem // out_w
        ox = rem % out_w
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < c_out
    k_total = KH * KW * c_in
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_total, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_total
        tap = k // c_in
        ci = k % c_in
        iy = oy[:, None] * stride - pad + (tap // KW)[None, :]
        ix = ox[:, None] * stride - pad + (tap % KW)[None, :]
        a_ok = pixel_ok[:, None] & k_ok[None, :] & (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
        a_off = ((img[:, None].to(tl.int64) * height + iy) * width + ix) * c_in + ci[None, :]
        a = tl.load(x_ptr + a_off, mask=a_ok, other=0.0)
        b = tl.load(w_ptr + k[:, None] * c_out + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    if POOL:
        acc = tl.reduce(tl.reshape(acc, [BLOCK_M, WINDOW, BLOCK_N]), 1, max_nan)
    acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = relu_nan(acc)
    out_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out_off = out_rows[:, None].to(tl.int64) * c_out + cols[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty),
             mask=(out_rows < n_out_rows)[:, None] & col_ok[None, :])


@triton.jit
def linear_bias_act_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, rows, n_out, n_in,
    RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + r[:, None].to(tl.int64) * n_in + k[None, :],
                    mask=(r < rows)[:, None] & (k < n_in)[None, :], other=0.0)
        b = tl.load(w_ptr + c[None, :].to(tl.int64) * n_in + k[:, None],  # w is [n_out, n_in]
                    mask=(k < n_in)[:, None] & (c < n_out)[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    acc += tl.load(bias_ptr + c, mask=c < n_out, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = relu_nan(acc)
    tl.store(out_ptr + r[:, None].to(tl.int64) * n_out + c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(r < rows)[:, None] & (c < n_out)[None, :])


def _block_n(c_out: int) -> int:
    return max(16, min(64, triton.next_power_of_2(c_out)))


# Every launch configuration comes from these two functions, so the ahead-of-time tests
# (tests/test_triton_aot.py) compile exactly what the launchers can choose.
def conv_constexprs(kernel_size: tuple[int, int], c_out: int, relu: bool, pool: bool) -> dict:
    return dict(KH=kernel_size[0], KW=kernel_size[1], RELU=relu, POOL=pool,
                BLOCK_M=16 if pool else 64,  # GEMM rows per program: 64 either way
                BLOCK_N=_block_n(c_out), BLOCK_K=32)


def linear_constexprs(n_out: int, relu: bool) -> dict:
    return dict(RELU=relu, BLOCK_M=32, BLOCK_N=_block_n(n_out), BLOCK_K=32)


def conv2d_bias_act(x: torch.Tensor, weight_k_major: torch.Tensor, bias: torch.Tensor, kernel_size: tuple[int, int],
                    stride: int, padding: int, relu: bool, pool: bool) -> torch.Tensor:
    """NHWC conv (groups=1, square stride and padding) + bias (+ ReLU) (+ 2x2/2 max-pool).
    ``x`` is [N, C, H, W] in channels_last memory; returns the same layout. ``weight_k_major``
    comes from ``mtkernels.ops.conv.conv_weight_k_major``."""
    n, c_in, height, width = x.shape
    kh, kw = kernel_size
    c_out = weight_k_major.shape[1]
    out_h = (height + 2 * padding - kh) // stride + 1
    out_w = (width + 2 * padding - kw) // stride + 1
    final_h, final_w = (out_h // 2, out_w // 2) if pool else (out_h, out_w)
    out = torch.empty((n, c_out, final_h, final_w), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    rows = n * final_h * final_w
    constexprs = conv_constexprs(kernel_size, c_out, relu, pool)
    grid = (triton.cdiv(rows, constexprs["BLOCK_M"]), triton.cdiv(c_out, constexprs["BLOCK_N"]))
    if rows:
        conv2d_bias_act_kernel[grid](
            x.contiguous(memory_format=torch.channels_last), weight_k_major, bias, out,
            rows, height, width, c_in, c_out, out_h, out_w, stride, padding, **constexprs)
    return out


def linear_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool) -> torch.Tensor:
    x = x.contiguous()
    rows, n_in = x.shape
    n_out = weight.shape[0]
    out = torch.empty((rows, n_out), dtype=x.dtype, device=x.device)
    constexprs = linear_constexprs(n_out, relu)
    grid = (triton.cdiv(rows, constexprs["BLOCK_M"]), triton.cdiv(n_out, constexprs["BLOCK_N"]))
    if rows:
        linear_bias_act_kernel[grid](x, weight.contiguous(), bias, out, rows, n_out, n_in, **constexprs)
    return out
