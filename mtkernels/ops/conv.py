"""CPU NHWC kernels of the fused inference path (``mtkernels._C``), checked and wrapped.

They take and return channels-last float32 tensors and exist where PyTorch's own kernels
are slow for the papers' shapes or do more work than needed: a 2x2 max-pool at batch 1,
the first conv layer, whose single input channel leaves oneDNN's GEMM-based path mostly
idle, and Winograd F(2x2, 3x3) convolution, which needs 2.25x fewer multiplications than
a direct 3x3 convolution (16 instead of 36 per 2x2 output block and channel pair) and
fuses bias, ReLU and the 2x2 max-pool into its output transform.
"""

from __future__ import annotations

import torch

from .. import _C
from ..lru import LruCache


def conv_weight_k_major(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, KH, KW] -> [KH * KW * C_in, C_out]: the GEMM operand of the NHWC kernels
    (the Triton implicit-GEMM conv and the single-channel C++ conv)."""
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()


def _check(name: str, x: torch.Tensor, channels: int | None = None) -> None:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise TypeError(f"{name} must be a float32 CPU tensor, got {x.dtype} on {x.device}")
    if x.dim() != 4 or (channels is not None and x.shape[1] != channels):
        raise ValueError(f"{name} must be [N, {channels if channels is not None else 'C'}, H, W], "
                         f"got {tuple(x.shape)}")


def _check_matrix(name: str, x: torch.Tensor) -> None:
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2:
        raise TypeError(f"{name} must be a 2-D float32 CPU tensor, got {x.dim()}-D {x.dtype} on {x.device}")


# The C++ kernels' element codes (csrc/element.h) per activation dtype.
ELEMENTS = {torch.float32: 0, torch.bfloat16: 1, torch.uint8: 2}


def maxpool2x2(x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``F.max_pool2d(x, 2, 2)`` (then ReLU if ``relu``) for a channels-last float32, bfloat16
    or uint8 CPU tensor (uint8: a quantized ReLU output, so ``relu`` changes nothing)."""
    if x.device.type != "cpu" or x.dtype not in ELEMENTS or x.dim() != 4:
        raise TypeError(f"x must be a 4-D float32, bfloat16 or uint8 CPU tensor, got {x.dim()}-D {x.dtype} "
                        f"on {x.device}")
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    out = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=torch.channels_last)
    _C.maxpool2x2_nhwc(x.data_ptr(), out.data_ptr(), n, h, w, c, relu, ELEMENTS[x.dtype], torch.get_num_threads())
    return out


def affine_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``relu(x * scale + shift)`` per channel of a 4-D channels-last float32 or bfloat16 CPU
    ``x`` with float32 ``scale`` and ``shift`` [C], in one pass (the training BatchNorm +
    ReLU's forward kernel), rounded once to x's dtype."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 4:
        raise TypeError(f"x must be a 4-D float32 or bfloat16 CPU tensor, got {x.dim()}-D {x.dtype} on {x.device}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t.dtype != torch.float32 or t.numel() != x.shape[1]:
            raise ValueError(f"{name} must be float32 with {x.shape[1]} values, got {t.dtype} {tuple(t.shape)}")
    x = x.contiguous(memory_format=torch.channels_last)
    scale, shift = scale.reshape(-1).contiguous(), shift.reshape(-1).contiguous()
    out = torch.empty_like(x, memory_format=torch.channels_last)
    _C.bn_relu_forward(x.data_ptr(), scale.data_ptr(), shift.data_ptr(), out.data_ptr(), x.numel() // x.shape[1],
                       x.shape[1], [], ELEMENTS[x.dtype], torch.get_num_threads())
    return out


def quantize_u8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, 0, 255)`` as uint8, in ``x``'s memory format
    (float32 or bfloat16 CPU ``x``; rounding half to even; NaN gives ``zero_point``)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"x must be a float32 or bfloat16 CPU tensor, got {x.dtype} on {x.device}")
    layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    x = x.contiguous(memory_format=layout)
    out = torch.empty(x.shape, dtype=torch.uint8, memory_format=layout)
    _C.quantize_u8(x.data_ptr(), out.data_ptr(), x.numel(), scale, zero_point, ELEMENTS[x.dtype],
                   torch.get_num_threads())
    return out


def conv3x3_single_channel(x: torch.Tensor, weight_k_major: torch.Tensor, bias: torch.Tensor,
                           relu: bool) -> torch.Tensor:
    """3x3 / stride 1 / padding 1 convolution of [N, 1, H, W] + bias (+ ReLU), channels-last
    output. ``weight_k_major`` is [9, C_out] (see :func:`conv_weight_k_major`)."""
    _check("x", x, channels=1)
    if weight_k_major.shape[0] != 9 or weight_k_major.dim() != 2 or bias.shape != (weight_k_major.shape[1],):
        raise ValueError(f"weight_k_major must be [9, C_out] and bias [C_out], got "
                         f"{tuple(weight_k_major.shape)} and {tuple(bias.shape)}")
    x = x.contiguous()  # one channel: NCHW and NHWC are the same memory
    weight_k_major, bias = weight_k_major.contiguous(), bias.contiguous()
    n, _, h, w = x.shape
    c_out = weight_k_major.shape[1]
    out = torch.empty((n, c_out, h, w), memory_format=torch.channels_last)
    _C.conv3x3_single_channel_nhwc(x.data_ptr(), weight_k_major.data_ptr(), bias.data_ptr(), out.data_ptr(),
                                   n, h, w, c_out, relu, torch.get_num_threads())
    return out


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool) -> torch.Tensor:
    """``act(x[:, g*in:(g+1)*in] @ weight[g].T + bias[g*out:(g+1)*out])`` for every group g,
    side by side: ``x`` [N, G * in], ``weight`` [G, out, in], ``bias`` [G * out], float32 CPU.
    Each weight row is read once for the whole batch (the C++ kernel the fused nets' layer
    chains run at small batches)."""
    _check_matrix("x", x)
    if weight.dim() != 3 or x.shape[1] != weight.shape[0] * weight.shape[2] \
            or bias.shape != (weight.shape[0] * weight.shape[1],):
        raise ValueError(f"weight must be [G, out, in] with G * in = {x.shape[1]} (x's width) and bias [G * out], "
                         f"got {tuple(weight.shape)} and {tuple(bias.shape)}")
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    out = torch.empty(x.shape[0], bias.shape[0])
    if out.numel():
        _C.grouped_linear(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(), x.shape[0], weight.shape[0],
                       weight.shape[2], weight.shape[1], relu, torch.get_num_threads())
    return out


# Winograd F(2x2, 3x3) (Lavin & Gray 2016): Y = A^T [(G g G^T) * (B^T d B)] A.
_WINOGRAD_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]],
                           dtype=torch.float64)
# G g G^T of every 3x3 filter as one GEMM: row 4i + j, column 3k + l holds G[i, k] G[j, l].
_WINOGRAD_GG = torch.kron(_WINOGRAD_G, _WINOGRAD_G)


def winograd_filter_transform(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """[C_out, C_in, 3, 3] -> U = G g G^T as [16, C_in, C_out], in ``weight``'s dtype. With
    ``transposed``, U of the filters the input gradient is convolved with (each flipped, C_in
    and C_out swapped): [16, C_out, C_in]."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [C_out, C_in, 3, 3], got {tuple(weight.shape)}")
    c_out, c_in = weight.shape[:2]
    taps = (weight.flip(2, 3) if transposed else weight).reshape(c_out * c_in, 9)
    u = (_WINOGRAD_GG.to(weight.dtype) @ taps.t()).view(16, c_out, c_in)
    return u if transposed else u.transpose(1, 2).contiguous()


def winograd_filter_gradient(grad_u: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`winograd_filter_transform`: d U [16, C_in, C_out] -> d weight
    [C_out, C_in, 3, 3] (d g = G^T d U G per filter)."""
    c_in, c_out = grad_u.shape[1:]
    taps = _WINOGRAD_GG.to(grad_u.dtype).t() @ grad_u.reshape(16, c_in * c_out)
    return taps.view(3, 3, c_in, c_out).permute(3, 2, 0, 1).contiguous()


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, 3, 3] -> U = G g G^T as [16, C_in, C_out] float32 (computed in float64)."""
    return winograd_filter_transform(weight.detach().double().cpu()).float()


def winograd_weight_blocked(u: torch.Tensor) -> torch.Tensor:
    """U [16, C_in, C_out] -> [ceil(C_out / B), 16, C_in, B] (B = ``_C.winograd_block_channels``),
    zero-padded: each block of output channels contiguous, as :func:`winograd_conv3x3_one_pass`
    reads it."""
    if u.dim() != 3 or u.shape[0] != 16:
        raise ValueError(f"u must be [16, C_in, C_out], got {tuple(u.shape)}")
    block = _C.winograd_block_channels
    blocks = -(-u.shape[2] // block)
    padded = torch.nn.functional.pad(u, (0, blocks * block - u.shape[2]))
    return padded.reshape(16, u.shape[1], blocks, block).permute(2, 0, 1, 3).contiguous()


class WinogradBuffers:
    """Per input shape: the chunking of the batch and the transformed-input and GEMM-output
    buffers, kept so neither is recomputed (at batch 1 that bookkeeping costs about a tenth
    of a layer) nor page-faulted in again on every call. At most ``capacity`` shapes are kept
    (least recently used dropped), so a stream of batch sizes cannot grow them forever."""

    def __init__(self, capacity: int = 4):
        self._plans = LruCache(capacity)

    def tensors(self) -> list:
        """The plans, holding the buffers (for :func:`mtkernels.lru.tensor_bytes`)."""
        return self._plans.tensors()

    @staticmethod
    def _tiling(shape: torch.Size, c_out: int, pool: bool) -> tuple[int, tuple[int, ...]]:
        """(tiles per image, output shape) for input ``shape``."""
        n, _, h, w = shape
        return ((h + 1) // 2) * ((w + 1) // 2), ((n, c_out, h // 2, w // 2) if pool else (n, c_out, h, w))

    def plan(self, shape: torch.Size, c_out: int, pool: bool, images_per_chunk: int | None):
        """(output shape, [(first image, images, V buffer, M buffer)], bytes per input image,
        bytes per output image) for input ``shape``."""
        key = (tuple(shape), c_out, pool, images_per_chunk)
        found = self._plans.get(key)
        if found is None:
            n, c_in, h, w = shape
            tiles_per_image, out_shape = self._tiling(shape, c_out, pool)
            if images_per_chunk is None:  # about 4 MB of transformed tiles per chunk
                images_per_chunk = max(1, (4 << 20) // (64 * tiles_per_image * max(c_in, c_out)))
            buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            chunks = []
            for start in range(0, n, images_per_chunk):
                images = min(images_per_chunk, n - start)
                if images not in buffers:
                    buffers[images] = (torch.empty(16, images * tiles_per_image, c_in),
                                       torch.empty(16, images * tiles_per_image, c_out))
                chunks.append((start, images, *buffers[images]))
            found = (out_shape, chunks, 4 * h * w * c_in, 4 * out_shape[2] * out_shape[3] * c_out)
            self._plans[key] = found
        return found

    def one_pass_plan(self, shape: torch.Size, c_out: int, pool: bool, images_per_chunk: int | None):
        """(output shape, images per chunk, V buffer) of :func:`winograd_conv3x3_one_pass`."""
        key = ("one pass", tuple(shape), c_out, pool, images_per_chunk)
        found = self._plans.get(key)
        if found is None:
            n, c_in = shape[:2]
            tiles_per_image, out_shape = self._tiling(shape, c_out, pool)
            if images_per_chunk is None:  # V of about 1 MB, read from the L2 cache by every channel block
                images_per_chunk = max(1, (1 << 20) // (64 * tiles_per_image * c_in))
            images_per_chunk = max(1, min(images_per_chunk, n))
            found = (out_shape, images_per_chunk, torch.empty(16, images_per_chunk * tiles_per_image, c_in))
            self._plans[key] = found
        return found


def _check_winograd_options(x: torch.Tensor, pool: bool, images_per_chunk: int | None) -> None:
    if pool and (x.shape[2] % 2 or x.shape[3] % 2):
        raise ValueError(f"the fused max-pool needs an even height and width, got {x.shape[2]}x{x.shape[3]}")
    if images_per_chunk is not None and images_per_chunk < 1:
        raise ValueError(f"images_per_chunk must be >= 1, got {images_per_chunk}")


def winograd_conv3x3_bias_act(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor, relu: bool, pool: bool,
                     buffers: WinogradBuffers | None = None, images_per_chunk: int | None = None) -> torch.Tensor:
    """3x3 / stride 1 / padding 1 convolution + bias (+ ReLU) (+ 2x2 / stride 2 max-pool) of a
    float32 [N, C_in, H, W] by Winograd F(2x2, 3x3), channels-last output; ``u`` from
    :func:`winograd_weight`. Images go through in chunks of ``images_per_chunk`` so the
    transformed tiles stay in cache (default: about 4 MB of them)."""
    _check("x", x, channels=u.shape[1] if u.dim() == 3 else None)
    if u.dim() != 3 or u.shape[0] != 16 or bias.shape != (u.shape[2],):
        raise ValueError(f"u must be [16, C_in, C_out] and bias [C_out], got {tuple(u.shape)} and {tuple(bias.shape)}")
    _check_winograd_options(x, pool, images_per_chunk)
    return winograd_conv3x3_bias_act_unchecked(x.contiguous(memory_format=torch.channels_last), u, bias.contiguous(),
                                               relu, pool, buffers or WinogradBuffers(), images_per_chunk)


def winograd_conv3x3_one_pass(x: torch.Tensor, u_blocked: torch.Tensor, bias: torch.Tensor, relu: bool, pool: bool,
                              buffers: WinogradBuffers | None = None,
                              images_per_chunk: int | None = None) -> torch.Tensor:
    """:func:`winograd_conv3x3_bias_act` as one C++ pass per chunk of images (the GEMM in registers
    between the two transforms, no PyTorch GEMM); ``u_blocked`` from
    :func:`winograd_weight_blocked`."""
    block = _C.winograd_block_channels
    if u_blocked.dim() != 4 or u_blocked.shape[1] != 16 or u_blocked.shape[3] != block:
        raise ValueError(f"u_blocked must be [blocks, 16, C_in, {block}], got {tuple(u_blocked.shape)}")
    _check("x", x, channels=u_blocked.shape[2])
    if bias.dim() != 1 or not 0 <= u_blocked.shape[0] * block - bias.shape[0] < block:
        raise ValueError(f"bias must be [C_out] with C_out output channels in {u_blocked.shape[0]} blocks of {block}, "
                         f"got {tuple(bias.shape)}")
    _check_winograd_options(x, pool, images_per_chunk)
    return winograd_conv3x3_one_pass_unchecked(x.contiguous(memory_format=torch.channels_last), u_blocked.contiguous(),
                                       bias.contiguous(), relu, pool, buffers or WinogradBuffers(), images_per_chunk)


def winograd_conv3x3_one_pass_unchecked(x: torch.Tensor, u_blocked: torch.Tensor, bias: torch.Tensor, relu: bool,
                                        pool: bool, buffers: WinogradBuffers,
                                        images_per_chunk: int | None = None) -> torch.Tensor:
    """:func:`winograd_conv3x3_one_pass` without its checks, for callers that made them once."""
    n, c_in, h, w = x.shape
    c_out = bias.shape[0]
    out_shape, images_per_chunk, v = buffers.one_pass_plan(x.shape, c_out, pool, images_per_chunk)
    out = torch.empty(out_shape, memory_format=torch.channels_last)
    _C.winograd_conv3x3_one_pass_nhwc(x.data_ptr(), u_blocked.data_ptr(), bias.data_ptr(), v.data_ptr(),
                                      out.data_ptr(), n, h, w, c_in, c_out, images_per_chunk, relu, pool,
                                      torch.get_num_threads())
    return out


def winograd_conv3x3_bias_act_unchecked(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor, relu: bool, pool: bool,
                       buffers: WinogradBuffers, images_per_chunk: int | None = None) -> torch.Tensor:
    """:func:`winograd_conv3x3_bias_act` without its checks, for callers that made them once."""
    _, _, h, w = x.shape
    c_in, c_out = u.shape[1], u.shape[2]
    out_shape, chunks, in_bytes, out_bytes = buffers.plan(x.shape, c_out, pool, images_per_chunk)
    out = torch.empty(out_shape, memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    x_ptr, out_ptr, bias_ptr = x.data_ptr(), out.data_ptr(), bias.data_ptr()
    for start, images, v, m in chunks:
        _C.winograd_input_nhwc(x_ptr + start * in_bytes, v.data_ptr(), images, h, w, c_in, threads)
        torch.bmm(v, u, out=m)
        _C.winograd_output_nhwc(m.data_ptr(), bias_ptr, out_ptr + start * out_bytes, images, h, w, c_out, relu, pool,
                                threads)
    return out
