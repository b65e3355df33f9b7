// The copies around mtkernels::gemm_conv2d's one GEMM (any convolution over channels-last
// float32 or bfloat16 activations): im2col, every output pixel's receptive field as one row,
// and its adjoint col2im, each in one pass. In PyTorch they were a copy per tap (and an add
// per tap, rounding a bfloat16 sum at each), 1-3 ms per ResNet 3x3 layer at batch 128.
#pragma once
#include <cstdint>

#include "element.h"

namespace mtk {

// x [N, H, W, C] and the conv's geometry: square kernel_h x kernel_w taps, one stride and one
// zero padding for both axes; OH = (H + 2 padding - kernel_h) / stride + 1, OW likewise.
struct GemmConv2dGeometry {
  int64_t batch, height, width, channels, kernel_h, kernel_w, stride, padding;
};

// cols[(n OH + oy) OW + ox][(ky KW + kx) C + c] = x[n][oy stride - padding + ky]
// [ox stride - padding + kx][c], zero outside x.
struct Im2colProblem {
  GemmConv2dGeometry g;
  const void* x;
  void* cols;
  Element element;
  int num_threads;
};

// dx[n][iy][ix][c] = the sum over the taps that copied x[n][iy][ix] of cols' entries, in
// float32 in (ky, kx) order, rounded once to `element`: im2col's adjoint.
struct Col2imProblem {
  GemmConv2dGeometry g;
  const void* cols;
  void* dx;
  Element element;
  int num_threads;
};

using Im2colFn = void (*)(const Im2colProblem&);
using Col2imFn = void (*)(const Col2imProblem&);

#define MTK_DECLARE_GEMM_CONV2D(isa)   \
  namespace isa {                      \
  void im2col_nhwc(const Im2colProblem&); \
  void col2im_nhwc(const Col2imProblem&); \
  }
MTK_DECLARE_GEMM_CONV2D(baseline)
MTK_DECLARE_GEMM_CONV2D(avx2)
MTK_DECLARE_GEMM_CONV2D(avx512)
#undef MTK_DECLARE_GEMM_CONV2D

}  // namespace mtk
