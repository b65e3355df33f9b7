// im2col and col2im for mtkernels::gemm_conv2d (gemm_conv2d.h), compiled once per ISA.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "gemm_conv2d.h"
#include "isa_variant.h"

namespace mtk {
namespace MTK_ISA {
namespace {

int64_t output_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding) {
  return (size + 2 * padding - kernel) / stride + 1;
}

size_t element_bytes(Element element) { return element == Element::bfloat16 ? 2 : 4; }

template <typename T>
void col2im(const Col2imProblem& p) {
  const GemmConv2dGeometry& g = p.g;
  const int64_t oh = output_size(g.height, g.kernel_h, g.stride, g.padding);
  const int64_t ow = output_size(g.width, g.kernel_w, g.stride, g.padding);
  const int64_t row = g.kernel_h * g.kernel_w * g.channels;
  const T* cols = static_cast<const T*>(p.cols);
  T* dx = static_cast<T*>(p.dx);
#pragma omp parallel num_threads(p.num_threads)
  {
    std::vector<float> sum(g.channels);
#pragma omp for schedule(static)
    for (int64_t image_row = 0; image_row < g.batch * g.height; ++image_row) {
      const int64_t n = image_row / g.height, iy = image_row % g.height;
      for (int64_t ix = 0; ix < g.width; ++ix) {
        std::fill(sum.begin(), sum.end(), 0.0f);
        for (int64_t ky = 0; ky < g.kernel_h; ++ky) {
          const int64_t sy = iy + g.padding - ky;  // oy * stride
          if (sy < 0 || sy % g.stride || sy / g.stride >= oh) continue;
          for (int64_t kx = 0; kx < g.kernel_w; ++kx) {
            const int64_t sx = ix + g.padding - kx;
            if (sx < 0 || sx % g.stride || sx / g.stride >= ow) continue;
            const T* src = cols + ((n * oh + sy / g.stride) * ow + sx / g.stride) * row + (ky * g.kernel_w + kx) *
                                                                                           g.channels;
            for (int64_t c = 0; c < g.channels; ++c) sum[c] += widen(src[c]);
          }
        }
        T* out = dx + (image_row * g.width + ix) * g.channels;
        for (int64_t c = 0; c < g.channels; ++c) narrow(out + c, sum[c]);
      }
    }
  }
}

}  // namespace

void im2col_nhwc(const Im2colProblem& p) {
  const GemmConv2dGeometry& g = p.g;
  const int64_t oh = output_size(g.height, g.kernel_h, g.stride, g.padding);
  const int64_t ow = output_size(g.width, g.kernel_w, g.stride, g.padding);
  const size_t pixel = g.channels * element_bytes(p.element);
  const char* x = static_cast<const char*>(p.x);
  char* cols = static_cast<char*>(p.cols);
#pragma omp parallel for num_threads(p.num_threads) schedule(static)
  for (int64_t output_row = 0; output_row < g.batch * oh; ++output_row) {
    const int64_t n = output_row / oh, oy = output_row % oh;
    char* dst = cols + output_row * ow * g.kernel_h * g.kernel_w * pixel;
    for (int64_t ox = 0; ox < ow; ++ox)
      for (int64_t ky = 0; ky < g.kernel_h; ++ky) {
        const int64_t iy = oy * g.stride - g.padding + ky;
        for (int64_t kx = 0; kx < g.kernel_w; ++kx, dst += pixel) {
          const int64_t ix = ox * g.stride - g.padding + kx;
          if (iy < 0 || iy >= g.height || ix < 0 || ix >= g.width) {
            std::memset(dst, 0, pixel);
          } else {
            std::memcpy(dst, x + ((n * g.height + iy) * g.width + ix) * pixel, pixel);
          }
        }
      }
  }
}

void col2im_nhwc(const Col2imProblem& p) {
  if (p.element == Element::bfloat16) return col2im<uint16_t>(p);
  col2im<float>(p);
}

}  // namespace MTK_ISA
}  // namespace mtk
