"""The fused layers that ``fuse_for_inference`` builds: conv (+ BN) + bias (+ ReLU)
(+ 2x2 max-pool), linear (+ BN) + bias (+ ReLU), BN + ReLU, multi-task heads, and the
channels-last flatten between them.

Each keeps what it derives from its parameters (packed or transformed weights, buffers per
input shape) only while those parameters are the ones it was derived from: a change of
dtype or device (any ``_apply``: ``.to()``, ``.double()``, ``.cuda()``, ...), a
``load_state_dict``, or an in-place update of a weight (its version counter moves) drops
it, and it is rebuilt on the next call.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..device_path import takes_cuda_path
from ..lru import LruCache, tensor_bytes
from . import tuning

__all__ = ["FusedConv2d", "FusedLinear", "AffineReLU", "FusedHeads", "FusedBranches", "ChannelsLastFlatten",
           "fold_batchnorm", "parameter_epoch"]

# Bumped whenever any fused module's tensors are moved, converted or loaded, so every plan
# built from them (here and in mtkernels.fuse.plans) knows to rebuild.
_EPOCH = [0]


def parameter_epoch() -> int:
    return _EPOCH[0]


class DerivedState(nn.Module):
    """A module whose caches are derived from its tensors: moving, converting or loading
    them (here or in any parent) bumps the epoch that invalidates every such cache."""

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        _EPOCH[0] += 1
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        _EPOCH[0] += 1

    def in_dtype(self, dtype: torch.dtype, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``tensors`` (this module's own) converted to ``dtype`` once, not on every call."""
        if all(t.dtype == dtype for t in tensors):
            return tensors
        derived = self.derived()
        key = ("in_dtype", dtype, tuple(id(t) for t in tensors))
        if key not in derived:
            derived[key] = tuple(t.to(dtype) for t in tensors)
        return derived[key]

    def _state_token(self) -> tuple:
        # The module's own dicts, not parameters(recurse=False): that generator's bookkeeping
        # cost a ResNet at batch 1 about 0.5 ms a forward (its 73 layers ask on every call).
        own = [t for t in (*self._parameters.values(), *self._buffers.values()) if t is not None]
        return (_EPOCH[0], *((t.data_ptr(), t._version) for t in own))

    def derived(self) -> dict:
        """This module's caches, emptied when its tensors changed since they were filled."""
        token = self._state_token()
        if getattr(self, "_derived_token", None) != token:
            self._derived_token, self._derived_cache = token, {}
        return self._derived_cache

    def derived_bytes(self, seen: Optional[set[int]] = None) -> int:
        """Bytes held by this module's caches (not its parameters)."""
        return tensor_bytes(getattr(self, "_derived_cache", {}), seen)


def _has_hooks(module: nn.Module) -> bool:
    """Whether a forward (pre-)hook, the module's own or a global one, would see a call of it."""
    from torch.nn.modules import module as module_state

    return bool(module._forward_hooks or module._forward_pre_hooks or module_state._global_forward_hooks
                or module_state._global_forward_pre_hooks)


@functools.lru_cache(maxsize=None)
def _onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = scale * x + shift, per channel."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0.0)
    return scale.detach().clone(), shift.detach().clone()


def fold_batchnorm(weight: torch.Tensor, bias: Optional[torch.Tensor],
                   bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(layer(x))`` for a conv / linear ``layer`` (eval-mode BN)."""
    scale, shift = _bn_affine(bn)
    folded_w = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    folded_b = shift if bias is None else bias * scale + shift
    return folded_w.detach().clone(), folded_b.detach().clone()


Layer = Callable[[torch.Tensor], torch.Tensor]


def layer_signature(layer: nn.Module) -> str:
    """What identifies a layer's computation (not its values) in a tuning key."""
    return f"{type(layer).__name__}({layer.extra_repr()})"


class FusedConv2d(DerivedState):
    """conv (BN folded in) + bias (+ ReLU) (+ 2x2/2 max-pool), channels-last activations.

    On the CPU each input kind (per-image shape, dtype, batch bucket) runs the candidate
    measured fastest for it (see :mod:`mtkernels.fuse.tuning`): ``aten`` (``F.conv2d`` +
    in-place ReLU), ``onednn`` (oneDNN's convolution, weights packed once, then ReLU; not its
    ReLU post-op, which turns NaN into 0), ``single_channel`` (a direct C++ kernel for the
    one-input-channel first layer), and for 3x3 / stride 1 convs Winograd F(2x2, 3x3) as C++ transforms around PyTorch's
    batched GEMM (``winograd``) or as one C++ pass (``winograd_one_pass``); the last two pool
    in their output transform, the others are followed by a C++ NHWC pool. bfloat16 input may
    also run mtkernels' direct bf16 conv (``direct_bf16``: 3x3 or 1x1, stride 1 or 2, ReLU and
    pool in its epilogue) or its bf16 Winograd F(2x2, 3x3) conv (``winograd_bf16``: 3x3, stride
    1, even maps, whole blocks of input channels). CUDA: the Triton implicit-GEMM kernel, the pool in its epilogue."""

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None, relu: bool = False,
                 pool: bool = False):
        super().__init__()
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(f"FusedConv2d supports numeric zero padding, got {conv.padding!r}/{conv.padding_mode!r}")
        weight, bias = conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone()
        if bn is not None:
            weight, bias = fold_batchnorm(weight, bias, bn)
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        self.weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last), requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = (
            list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        self.relu, self.pool = relu, pool
        self.chosen: dict[tuple, str] = {}  # (bucket, dtype, per-image shape) -> candidate name
        # One stride and one padding for both axes, no groups or dilation: what the Triton
        # implicit-GEMM conv and the direct bf16 conv take.
        self.square_geometry = (self.groups == 1 and self.dilation == [1, 1] and len(set(self.stride)) == 1
                                and len(set(self.padding)) == 1)
        plain_3x3 = (tuple(weight.shape[2:]) == (3, 3) and self.stride == [1, 1] and self.padding == [1, 1]
                     and self.dilation == [1, 1] and self.groups == 1)
        self.single_channel_3x3 = plain_3x3 and weight.shape[1] == 1
        self.winograd_ok = plain_3x3 and weight.shape[1] > 1
        # fuse_for_inference(..., winograd=False) turns every Winograd algorithm off.
        self.allow_winograd = True
        # Set by fuse_for_inference(precision=...): the dtype activations are computed in, and
        # the uint8 encodings of an int8 conv (mtkernels.fuse.precision).
        self.compute_dtype = torch.float32
        self.int8 = None

    @property
    def winograd_allowed(self) -> bool:
        """Whether a Winograd algorithm (float32's or bf16's) may run this layer's geometry."""
        return self.winograd_ok and self.allow_winograd

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, kernel={tuple(self.weight.shape[2:])}, "
                f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, dilation={tuple(self.dilation)}, "
                f"groups={self.groups}, relu={self.relu}, pool={self.pool}")

    # -- candidates -------------------------------------------------------------------------
    # aten and onednn return the conv + bias; the ReLU runs in the epilogue (see build): oneDNN's
    # ReLU post-op returns 0 for NaN, where eager PyTorch returns NaN.
    def _aten(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.in_dtype(x.dtype, self.weight, self.bias)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _packed_onednn_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        derived = self.derived()
        key = ("onednn", tuple(x.shape[1:]), x.dtype)
        packed = derived.get(key)
        if packed is None:
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                weight, self.padding, self.stride, self.dilation, self.groups, list(x.shape))
            derived[key] = packed
        return packed

    def _onednn(self, x: torch.Tensor, post_op: str = "none") -> torch.Tensor:
        weight, bias = self.in_dtype(x.dtype, self.weight, self.bias)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed_onednn_weight(x, weight), bias, self.padding, self.stride, self.dilation, self.groups,
            post_op, [], "")

    def _onednn_relu(self, x: torch.Tensor) -> torch.Tensor:
        """oneDNN's conv with its ReLU post-op (NaN -> 0): offered for bfloat16 only, where the
        network flags non-finite images itself (see mtkernels.fuse.precision)."""
        return self._onednn(x, "relu")

    def _direct_bf16_ok(self, shape: torch.Size) -> bool:
        """Whether mtkernels' direct bf16 conv runs this layer on input of ``shape``."""
        from ..ops.conv_bf16 import output_size, supports

        if not self.square_geometry:
            return False
        stride = self.stride[0]
        even_output = all(output_size(size, stride) % 2 == 0 for size in shape[2:])
        return (supports(self.weight.shape, stride, self.padding[0]) and self.weight.dtype == torch.float32
                and (even_output or not self.pool))

    def _winograd_bf16_ok(self, shape: torch.Size) -> bool:
        """Whether mtkernels' bf16 Winograd conv runs this layer on input of ``shape``."""
        from ..ops.conv_winograd_bf16 import supports

        return (self.winograd_allowed and self.weight.dtype == torch.float32
                and supports(self.weight.shape, self.stride[0], self.padding[0], shape[2], shape[3]))

    def _bordered_buffer(self, x: torch.Tensor) -> torch.Tensor:
        """The bf16 kernels' zero-bordered input buffer for ``x``, kept per input shape (only its
        interior is written again)."""
        from ..ops.conv_bf16 import bordered_input

        buffers = self.derived().setdefault("bf16_buffers", LruCache(4))
        buffer = buffers.get(x.shape)
        if buffer is None:
            buffer = bordered_input(x.shape[0], x.shape[2], x.shape[3], x.shape[1], self.weight.shape[2] // 2)
            buffers[x.shape] = buffer
        return buffer

    def _direct_bf16(self, x: torch.Tensor) -> torch.Tensor:
        """mtkernels' direct bf16 conv, bias, ReLU and pool in one pass (a 3x3 conv's input is
        first copied into a zero-bordered buffer)."""
        from ..ops.conv_bf16 import conv_bf16_unchecked

        buffer = self._bordered_buffer(x) if self.weight.shape[2] == 3 or x.shape[1] % 2 else None
        return conv_bf16_unchecked(x, self.bf16_weight(), self.bias, self.relu, self.pool, torch.bfloat16,
                                   self.stride[0], buffer)

    def _winograd_bf16(self, x: torch.Tensor) -> torch.Tensor:
        """mtkernels' bf16 Winograd conv, bias, ReLU and pool in one pass, reading the
        channels-last bfloat16 ``x`` where it is."""
        from ..ops.conv_winograd_bf16 import conv_winograd_bf16_unchecked

        return conv_winograd_bf16_unchecked(x, self.winograd_bf16_weight(), self.bias, self.relu, self.pool,
                                            torch.bfloat16, None)

    def _int8_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """oneDNN's packed int8 weight (symmetric, per output channel), its scales and zero points."""
        derived = self.derived()
        if "int8" not in derived:
            weight = self.weight.detach().float()
            scale = (weight.abs().amax(dim=(1, 2, 3)) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
            quantized = torch.round(weight / scale.view(-1, 1, 1, 1)).clamp(-127, 127).to(torch.int8)
            encoding = self.int8.input
            packed = torch.ops.onednn.qconv_prepack(
                quantized.contiguous(memory_format=torch.channels_last), scale, encoding.scale, encoding.zero_point,
                self.stride, self.padding, self.dilation, self.groups, None)
            derived["int8"] = (packed, scale, torch.zeros(scale.shape, dtype=torch.int64))
        return derived["int8"]

    def _int8_conv(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 x int8 conv (+ ReLU) of float, bfloat16 or (already encoded) uint8 ``x``; uint8
        out where the next conv reads it, else bfloat16; then the pool."""
        from ..ops.conv import maxpool2x2

        encoding, out = self.int8.input, self.int8.output
        q = x if x.dtype == torch.uint8 else encoding.quantize(x)
        packed, scale, zero = self._int8_weight()
        y = torch.ops.onednn.qconv2d_pointwise(
            q, encoding.scale, encoding.zero_point, packed, scale, zero, self.bias, self.stride, self.padding,
            self.dilation, self.groups, out.scale if out else 1.0, out.zero_point if out else 0,
            None if out else torch.bfloat16, "relu" if self.relu else "none", [], "")
        return maxpool2x2(y) if self.pool else y

    def weight_k_major(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight as [KH * KW * C_in, C_out] and bias, in ``dtype`` on the weight's device."""
        derived = self.derived()
        key = ("k_major", dtype)
        if key not in derived:
            from ..ops.conv import conv_weight_k_major

            derived[key] = (conv_weight_k_major(self.weight).to(dtype), self.bias.to(dtype))
        return derived[key]

    def _single_channel(self, x: torch.Tensor) -> torch.Tensor:
        from ..ops.conv import conv3x3_single_channel

        return conv3x3_single_channel(x, *self.weight_k_major(torch.float32), self.relu)

    def _triton(self, x: torch.Tensor) -> torch.Tensor:
        from ..triton.conv import conv2d_bias_act

        weight, bias = self.weight_k_major(x.dtype)
        return conv2d_bias_act(x, weight, bias, tuple(self.weight.shape[2:]), self.stride[0], self.padding[0],
                               self.relu, self.pool)

    def winograd_operands(self):
        """(U [16, C_in, C_out], U packed per channel block, its per-shape buffers)."""
        derived = self.derived()
        if "winograd" not in derived:  # the shapes were checked when this candidate was offered
            from ..ops.conv import WinogradBuffers, winograd_weight, winograd_weight_blocked

            u = winograd_weight(self.weight)
            derived["winograd"] = (u, winograd_weight_blocked(u), WinogradBuffers())
        return derived["winograd"]

    def _winograd(self, x: torch.Tensor) -> torch.Tensor:
        from ..ops.conv import winograd_conv3x3_bias_act_unchecked

        u, _, buffers = self.winograd_operands()
        return winograd_conv3x3_bias_act_unchecked(x, u, self.bias, self.relu, self.pool, buffers)

    def _winograd_one_pass(self, x: torch.Tensor) -> torch.Tensor:
        from ..ops.conv import winograd_conv3x3_one_pass_unchecked

        _, u_blocked, buffers = self.winograd_operands()
        return winograd_conv3x3_one_pass_unchecked(x, u_blocked, self.bias, self.relu, self.pool, buffers)

    def _epilogue(self, impl: Layer, relu: bool) -> Layer:
        """``impl`` followed by the ReLU (if ``relu``) and the 2x2 max-pool, in one C++ pass
        where there is a pool (for implementations without them fused)."""
        if not self.pool:
            return (lambda x: F.relu_(impl(x))) if relu else impl

        def run(x: torch.Tensor) -> torch.Tensor:
            y = impl(x)
            if y.device.type == "cpu" and y.dtype in (torch.float32, torch.bfloat16) and not takes_cuda_path(y):
                from ..ops.conv import maxpool2x2

                return maxpool2x2(y, relu)
            return F.max_pool2d(F.relu_(y) if relu else y, 2, 2)
        return run

    def candidates(self, x: torch.Tensor) -> list[str]:
        """Names of the implementations that can run ``x`` (CPU)."""
        names = ["aten"]
        if x.dtype not in (torch.float32, torch.bfloat16):
            return names
        # PyTorch's bf16 oneDNN weight packing refuses CPUs (or ONEDNN_MAX_CPU_ISA caps) below AVX-512.
        if _onednn_available() and (x.dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            names.append("onednn")
            if x.dtype == torch.bfloat16 and self.relu:
                names.append("onednn_relu")
        if x.dtype == torch.bfloat16 and self._direct_bf16_ok(x.shape):
            names.append("direct_bf16")
        if x.dtype == torch.bfloat16 and self._winograd_bf16_ok(x.shape):
            names.append("winograd_bf16")
        if x.dtype != torch.float32:
            return names
        if self.single_channel_3x3:
            names.append("single_channel")
        if self.winograd_allowed and not (self.pool and (x.shape[2] % 2 or x.shape[3] % 2)):
            names += ["winograd", "winograd_one_pass"]
        return names

    def build(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        impl = getattr(self, "_" + name)
        if name.startswith("winograd") or name == "direct_bf16":  # ReLU and pool in the kernel's epilogue
            # (winograd, winograd_one_pass, winograd_bf16)
            return impl
        return self._epilogue(impl, relu=self.relu and name not in ("single_channel", "onednn_relu"))

    @staticmethod
    def heuristic(names: Sequence[str]) -> str:
        """Without timing: the C++ kernels where they apply (measured fastest on most of the
        papers' layers, all of BKNet's at batch 1), else oneDNN, else ATen."""
        for name in ("single_channel", "winograd_one_pass", "onednn"):
            if name in names:
                return name
        return "aten"

    def to_compute_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in this layer's compute dtype (float32 layers keep what they are given)."""
        if self.compute_dtype != torch.float32 and x.dtype != self.compute_dtype:
            return x.to(self.compute_dtype)
        return x

    def implementation(self, x: torch.Tensor, bucket: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The implementation for CPU input like ``x`` in batch bucket ``bucket`` (timed on ``x``
        only if no decision for it is stored)."""
        if self.int8 is not None:
            return self._int8_conv
        if self.compute_dtype != torch.float32 and x.dtype != self.compute_dtype:
            impl = self.implementation(self.to_compute_dtype(x), bucket)
            return lambda h: impl(self.to_compute_dtype(h))
        return self.build(self.implementation_name(x, bucket))

    def implementation_name(self, x: torch.Tensor, bucket: str) -> str:
        """The candidate chosen for CPU input like ``x`` (in the compute dtype)."""
        kind = (bucket, x.dtype, tuple(x.shape[1:]))
        name = self.chosen.get(kind)
        if name is None:
            names = self.candidates(x)
            key = f"conv:{layer_signature(self)}:in{'x'.join(map(str, x.shape[1:]))}:{x.dtype}:cpu:b{bucket}"
            name = tuning.choose(key, names, self.build, x, self.heuristic(names))
            self.chosen[kind] = name
        return name

    def forward_add(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``self(x) + skip`` for a layer without ReLU or pool (a residual branch's last conv).
        Where oneDNN runs the layer, the sum is its binary post-op, added in float32 before
        the one rounding of the output: the output is written once, not written, read with
        ``skip`` and written again (ResNet ver1's first stage, bf16 at batch 128: 28 -> 16 ms
        a layer)."""
        if self.relu or self.pool or self.int8 is not None or _has_hooks(self):
            return self(x) + skip  # hooks (int8 calibration's among them) see the conv as a module call
        x = self.to_compute_dtype(x.contiguous(memory_format=torch.channels_last))
        fusable = (x.device.type == "cpu" and not takes_cuda_path(x) and x.shape[0] > 0 and skip.dtype == x.dtype
                   and skip.is_contiguous(memory_format=torch.channels_last))
        if not fusable or self.implementation_name(x, tuning.batch_bucket(x.shape[0])) != "onednn":
            return self(x) + skip
        weight, bias = self.in_dtype(x.dtype, self.weight, self.bias)
        packed = self._packed_onednn_weight(x, weight)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, skip, packed, bias, self.padding, self.stride, self.dilation, self.groups, "add", 1.0, None, [], None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        if takes_cuda_path(x):
            x = self.to_compute_dtype(x)
            return self._triton(x) if self.square_geometry else self.build("aten")(x)  # Triton: pool in its epilogue
        if x.shape[0] == 0 or x.device.type != "cpu":
            return self.build("aten")(self.to_compute_dtype(x))
        return self.implementation(x, tuning.batch_bucket(x.shape[0]))(x)

    # -- layer chains -----------------------------------------------------------------------
    def chain_output_shape(self, shape: torch.Size, bf16: bool = False) -> Optional[tuple[int, ...]]:
        """Output shape for CPU input of ``shape`` if a C++ kernel does the whole layer (so it can
        join a ``_C.LayerChain``), else None: in float32, or with ``bf16`` in bfloat16 (the direct
        conv_bf16 kernel, which needs whole blocks of output channels)."""
        n, _, h, w = shape
        c_out = self.weight.shape[0]
        if self.pool and (h % 2 or w % 2):
            return None
        out = (n, c_out, h // 2, w // 2) if self.pool else (n, c_out, h, w)
        if bf16:  # 3x3 / stride 1 only: each conv writes the next one's zero-bordered input
            plain_3x3 = self.single_channel_3x3 or self.winograd_ok
            return out if plain_3x3 and self._direct_bf16_ok(shape) else None
        if self.single_channel_3x3 and not self.pool:
            return out
        return out if self.winograd_allowed else None

    def append_to_chain(self, chain, shape: torch.Size, dst: Optional[torch.Tensor], bf16: bool = False,
                        winograd: bool = False) -> None:
        """Append this layer (``chain_output_shape(shape, bf16)`` not None) to a ``_C.LayerChain``,
        writing to ``dst`` (None: the chain's output). With ``bf16`` the layer reads a bordered
        bfloat16 input (``mtkernels.ops.conv_bf16.bordered_input``) and writes ``dst``'s
        dtype: a bordered bfloat16 buffer (the next conv's input), or float32 [N, C, H, W];
        with ``winograd`` too it runs the bf16 Winograd conv where that takes the layer."""
        n, c_in, h, w = shape
        if bf16:
            from ..ops.conv import ELEMENTS
            from ..ops.conv_bf16 import even

            bordered = dst is not None and dst.dtype == torch.bfloat16
            dst_element = ELEMENTS[torch.bfloat16 if bordered else torch.float32]
            c_out = self.bias.shape[0]
            if winograd and self._winograd_bf16_ok(shape):
                chain.add_conv_winograd_bf16(self.winograd_bf16_weight(), self.bias, dst, n, h, w, c_in, c_out,
                                             int(bordered), self.relu, self.pool, dst_element)
            else:
                chain.add_conv_bf16(self.bf16_weight(), self.bias, dst, n, h, w, even(c_in), c_out, 3, 1,
                                    int(bordered), self.relu, self.pool, dst_element)
        elif self.single_channel_3x3:
            weight, bias = self.weight_k_major(torch.float32)
            chain.add_single_channel(weight, bias, dst, n, h, w, weight.shape[1], self.relu)
        else:
            _, u_blocked, buffers = self.winograd_operands()
            _, images_per_chunk, v = buffers.one_pass_plan(shape, self.bias.shape[0], self.pool, None)
            chain.add_winograd_conv3x3_one_pass(u_blocked, self.bias, v, dst, n, h, w, c_in, self.bias.shape[0],
                                                images_per_chunk, self.relu, self.pool)

    def bf16_weight(self) -> torch.Tensor:
        """The weight in conv_bf16's packed bfloat16 pair layout, packed once."""
        derived = self.derived()
        if "bf16_packed" not in derived:
            from ..ops.conv_bf16 import pack_conv_bf16_weight

            derived["bf16_packed"] = pack_conv_bf16_weight(self.weight)
        return derived["bf16_packed"]

    def winograd_bf16_weight(self) -> torch.Tensor:
        """The weight transformed for the bf16 Winograd conv, in its pair layout, packed once."""
        derived = self.derived()
        if "winograd_bf16_packed" not in derived:
            from ..ops.conv_winograd_bf16 import pack_conv_winograd_bf16_weight

            derived["winograd_bf16_packed"] = pack_conv_winograd_bf16_weight(self.weight)
        return derived["winograd_bf16_packed"]


class FusedLinear(DerivedState):
    """linear (BN folded in) + bias (+ ReLU). A block-diagonal layer of equal blocks may also
    carry them as ``blocks`` ([T, out, in]): the CPU then runs one batched GEMM over the
    blocks instead of reading the zeros of the block-diagonal weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, relu: bool, blocks: Optional[torch.Tensor] = None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.relu = relu
        self.compute_dtype = torch.float32  # bfloat16 with fuse_for_inference(precision="bf16" / "int8")
        self.blocks = None
        if blocks is not None:
            if blocks.dim() != 3 or blocks.shape[0] * blocks.shape[1] != weight.shape[0] \
                    or blocks.shape[0] * blocks.shape[2] != weight.shape[1]:
                raise ValueError(f"blocks must be [T, out, in] tiling weight {tuple(weight.shape)}, "
                                 f"got {tuple(blocks.shape)}")
            self.blocks = nn.Parameter(blocks.detach().clone().contiguous(), requires_grad=False)

    def chain_output_shape(self, shape: torch.Size, bf16: bool = False) -> Optional[tuple[int, ...]]:
        """Output shape for float32 CPU input of ``shape`` (a ``_C.LayerChain`` can run it). A
        chain runs linear layers in float32, ``bf16`` or not: at the small batches chains serve,
        they stream their weights once, and the heads' share of the time is small."""
        return (shape[0], self.weight.shape[0]) if len(shape) == 2 and shape[1] == self.weight.shape[1] else None

    def append_to_chain(self, chain, shape: torch.Size, dst: Optional[torch.Tensor], bf16: bool = False) -> None:
        rows = self.weight.unsqueeze(0) if self.blocks is None else self.blocks  # [groups, out, in]
        chain.add_grouped_linear(rows, self.bias, dst, shape[0], rows.shape[0], rows.shape[2], rows.shape[1],
                                 self.relu)

    @classmethod
    def from_layers(cls, linear: nn.Linear, bn: Optional[nn.BatchNorm1d] = None, relu: bool = False):
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        if bn is not None:
            weight, bias = fold_batchnorm(weight, bias, bn)
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        return cls(weight, bias, relu)

    def extra_repr(self) -> str:
        blocks = "" if self.blocks is None else f", blocks={tuple(self.blocks.shape)}"
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, relu={self.relu}{blocks}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype != torch.float32:
            x = x.to(self.compute_dtype)
        if takes_cuda_path(x):
            from ..triton.conv import linear_bias_act

            return linear_bias_act(x, *self.in_dtype(x.dtype, self.weight, self.bias), self.relu)
        if self.blocks is not None:
            n, (count, _, width_in) = x.shape[0], self.blocks.shape
            blocks, bias = self.in_dtype(x.dtype, self.blocks, self.bias)
            y = torch.baddbmm(bias.view(count, 1, -1), x.reshape(n, count, width_in).transpose(0, 1),
                              blocks.transpose(1, 2))
            return (F.relu_(y) if self.relu else y).transpose(0, 1).reshape(n, -1)
        weight, bias = self.in_dtype(x.dtype, self.weight, self.bias)
        y = torch.addmm(bias, x, weight.t())
        return F.relu_(y) if self.relu else y


class AffineReLU(DerivedState):
    """Eval-mode BatchNorm2d followed by ReLU, as one per-channel multiply-add + ReLU, in the
    input's dtype: on channels-last float32 / bfloat16 CPU input one C++ pass with float32
    coefficients (PyTorch's addcmul + ReLU are two passes, and in bfloat16 round the
    coefficients too)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        scale, shift = _bn_affine(bn)
        self.scale = nn.Parameter(scale.reshape(1, -1, 1, 1), requires_grad=False)
        self.shift = nn.Parameter(shift.reshape(1, -1, 1, 1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16)
                and self.scale.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)):
            from ..ops.conv import affine_relu

            return affine_relu(x, self.scale, self.shift)
        shift, scale = self.in_dtype(x.dtype, self.shift, self.scale)
        return F.relu_(torch.addcmul(shift, x, scale))


class FusedHeads(DerivedState):
    """All task branches of a multi-task net as len(layers) GEMMs: the first layers side by
    side, every later layer block-diagonal (on the CPU a batched GEMM where the branches'
    layers have equal shapes). Output: ``[N, sum(C)]``."""

    def __init__(self, layers: Sequence[FusedLinear]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @classmethod
    def from_branches(cls, branches: Sequence[Sequence[FusedLinear]]) -> "FusedHeads":
        depth = len(branches[0])
        layers = []
        for level in range(depth):
            parts = [b[level] for b in branches]
            weights = [p.weight for p in parts]
            weight = torch.cat(weights) if level == 0 else torch.block_diag(*weights)
            equal = level > 0 and len({w.shape for w in weights}) == 1
            blocks = torch.stack(weights) if equal else None
            layers.append(FusedLinear(weight, torch.cat([p.bias for p in parts]), parts[0].relu, blocks))
        return cls(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class FusedBranches(DerivedState):
    """Branches that are not plain MLPs (e.g. per-task residual stages): run each, concatenate."""

    def __init__(self, branches: Sequence[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], dim=1)


class ChannelsLastFlatten(nn.Module):
    """Flattens [N, C, H, W] in (H, W, C) order: free for channels-last activations, where
    ``nn.Flatten``'s (C, H, W) order copies. The next layer's columns are permuted to match
    (see :func:`mtkernels.fuse.rewrite.flatten_channels_last`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)

    @staticmethod
    def chain_output_shape(shape: torch.Size, bf16: bool = False) -> Optional[tuple[int, ...]]:
        """In a chain the input is channels-last already: nothing to run."""
        return (shape[0], math.prod(shape[1:])) if len(shape) == 4 else None
