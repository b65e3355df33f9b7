// pybind11 module mtkernels._C: raw-buffer entry points, no libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "conv.h"
#include "conv_bf16.h"
#include "conv_winograd_bf16.h"
#include "cpu_dispatch.h"
#include "gemm_conv2d.h"
#include "multitask_loss.h"

namespace py = pybind11;

namespace {

template <class T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

int64_t multitask_loss_forward(uintptr_t logits, int dtype, int64_t rows, int64_t width, int64_t row_stride,
                               uintptr_t labels, const std::vector<int64_t>& class_offsets,
                               const std::vector<float>& task_scale, int kind, float margin, bool reduce,
                               uintptr_t loss, uintptr_t grad, int num_threads) {
  const int64_t tasks = int64_t(task_scale.size());
  if (tasks < 1 || int64_t(class_offsets.size()) != tasks + 1)
    throw std::invalid_argument("class_offsets must have one entry more than task_scale");
  if (class_offsets.front() != 0 || class_offsets.back() != width)
    throw std::invalid_argument("class_offsets must run from 0 to width");
  for (int64_t t = 0; t < tasks; ++t)
    if (class_offsets[t + 1] <= class_offsets[t]) throw std::invalid_argument("every task needs at least one class");
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0 (f32), 1 (f16) or 2 (bf16)");
  if (kind < 0 || kind > 1) throw std::invalid_argument("kind code must be 0 (ce) or 1 (svm)");
  if (rows < 0 || row_stride < width) throw std::invalid_argument("bad rows or row_stride");
  if (rows > 0 && (logits == 0 || labels == 0 || loss == 0))
    throw std::invalid_argument("logits, labels and loss must be non-null");

  const mtk::LossProblem problem{as_ptr<const void>(logits),   mtk::DType(dtype), rows,    width,
                                 row_stride,                   as_ptr<const int64_t>(labels),
                                 tasks,                        class_offsets.data(),
                                 task_scale.data(),            mtk::LossKind(kind),
                                 margin,                       reduce,
                                 as_ptr<float>(loss),          as_ptr<void>(grad),
                                 std::max(1, num_threads)};
  if (rows == 0) {
    if (reduce) problem.loss[0] = 0.0f;
    return 0;
  }
  py::gil_scoped_release release;
  return mtk::kernels().multitask_loss_forward(problem);
}

void maxpool2x2_nhwc(uintptr_t src, uintptr_t dst, int64_t batch, int64_t height, int64_t width,
                     int64_t channels, bool relu, int element, int num_threads) {
  if (batch < 0 || height < 0 || width < 0 || channels < 0) throw std::invalid_argument("negative size");
  if (element < 0 || element > 2) throw std::invalid_argument("element must be 0 (float32), 1 (bfloat16) or 2 (uint8)");
  if (batch * (height / 2) * (width / 2) * channels == 0) return;
  const mtk::MaxPoolProblem problem{as_ptr<const void>(src), as_ptr<void>(dst), batch, height, width, channels,
                                    relu, mtk::Element(element), std::max(1, num_threads)};
  py::gil_scoped_release release;
  mtk::kernels().maxpool2x2_nhwc(problem);
}

// The element of a float activation (float32 or bfloat16), checked.
mtk::Element activation_element(int element) {
  if (element != 0 && element != 1) throw std::invalid_argument("element must be 0 (float32) or 1 (bfloat16)");
  return mtk::Element(element);
}

void quantize_u8(uintptr_t src, uintptr_t dst, int64_t count, double scale, int zero_point, int element,
                 int num_threads) {
  if (count < 0) throw std::invalid_argument("negative size");
  if (!(scale > 0.0) || !std::isfinite(scale)) throw std::invalid_argument("scale must be positive and finite");
  if (zero_point < 0 || zero_point > 255) throw std::invalid_argument("zero_point must be in [0, 255]");
  const mtk::QuantizeProblem problem{as_ptr<const void>(src), as_ptr<uint8_t>(dst), count, float(1.0 / scale),
                                     zero_point, activation_element(element), std::max(1, num_threads)};
  py::gil_scoped_release release;
  mtk::kernels().quantize_u8(problem);
}

mtk::Conv3x3SingleChannelProblem single_channel_problem(uintptr_t src, uintptr_t weight, uintptr_t bias,
                                                        uintptr_t dst, int64_t batch, int64_t height, int64_t width,
                                                        int64_t out_channels, bool relu, int num_threads) {
  if (batch < 0 || height < 0 || width < 0 || out_channels < 0) throw std::invalid_argument("negative size");
  return mtk::Conv3x3SingleChannelProblem{as_ptr<const float>(src), as_ptr<const float>(weight),
                                          as_ptr<const float>(bias), as_ptr<float>(dst), batch, height,
                                          width, out_channels, relu, std::max(1, num_threads)};
}

void conv3x3_single_channel_nhwc(uintptr_t src, uintptr_t weight, uintptr_t bias, uintptr_t dst, int64_t batch,
                                 int64_t height, int64_t width, int64_t out_channels, bool relu, int num_threads) {
  const auto problem =
      single_channel_problem(src, weight, bias, dst, batch, height, width, out_channels, relu, num_threads);
  if (batch * height * width * out_channels == 0) return;
  py::gil_scoped_release release;
  mtk::kernels().conv3x3_single_channel_nhwc(problem);
}

// The input transform or its output-adjoint twin (same buffers) of an NHWC buffer.
void transform_tiles(mtk::WinogradInputFn transform, uintptr_t src, uintptr_t dst, int64_t batch, int64_t height,
                     int64_t width, int64_t channels, int num_threads) {
  if (batch < 0 || height < 0 || width < 0 || channels < 0) throw std::invalid_argument("negative size");
  if (batch * height * width * channels == 0) return;
  const mtk::WinogradInputProblem problem{as_ptr<const float>(src), as_ptr<float>(dst), batch, height, width,
                                          channels, std::max(1, num_threads)};
  py::gil_scoped_release release;
  transform(problem);
}

void winograd_input_nhwc(uintptr_t src, uintptr_t dst, int64_t batch, int64_t height, int64_t width,
                         int64_t channels, int num_threads) {
  transform_tiles(mtk::kernels().winograd_input_nhwc, src, dst, batch, height, width, channels, num_threads);
}

void winograd_output_adjoint_nhwc(uintptr_t src, uintptr_t dst, int64_t batch, int64_t height, int64_t width,
                                  int64_t channels, int num_threads) {
  transform_tiles(mtk::kernels().winograd_output_adjoint_nhwc, src, dst, batch, height, width, channels,
                  num_threads);
}

void winograd_output_nhwc(uintptr_t src, uintptr_t bias, uintptr_t dst, int64_t batch, int64_t height,
                          int64_t width, int64_t channels, bool relu, bool pool, int num_threads) {
  if (batch < 0 || height < 0 || width < 0 || channels < 0) throw std::invalid_argument("negative size");
  if (pool && (height % 2 || width % 2)) throw std::invalid_argument("pool needs an even height and width");
  if (batch * height * width * channels == 0) return;
  const mtk::WinogradOutputProblem problem{as_ptr<const float>(src), as_ptr<const float>(bias), as_ptr<float>(dst),
                                           batch, height, width, channels, relu, pool, std::max(1, num_threads)};
  py::gil_scoped_release release;
  mtk::kernels().winograd_output_nhwc(problem);
}

mtk::WinogradConvProblem winograd_problem(uintptr_t src, uintptr_t u, uintptr_t bias, uintptr_t v, uintptr_t dst,
                                          int64_t batch, int64_t height, int64_t width, int64_t in_channels,
                                          int64_t out_channels, int64_t images_per_chunk, bool relu, bool pool,
                                          int num_threads) {
  if (batch < 0 || height < 0 || width < 0 || in_channels < 0 || out_channels < 0)
    throw std::invalid_argument("negative size");
  if (images_per_chunk < 1) throw std::invalid_argument("images_per_chunk must be >= 1");
  if (pool && (height % 2 || width % 2)) throw std::invalid_argument("pool needs an even height and width");
  return mtk::WinogradConvProblem{as_ptr<const float>(src), as_ptr<const float>(u), as_ptr<const float>(bias),
                                  as_ptr<float>(v), as_ptr<float>(dst), batch, height, width, in_channels,
                                  out_channels, images_per_chunk, relu, pool, std::max(1, num_threads)};
}

void winograd_conv3x3_one_pass_nhwc(uintptr_t src, uintptr_t u, uintptr_t bias, uintptr_t v, uintptr_t dst, int64_t batch,
                           int64_t height, int64_t width, int64_t in_channels, int64_t out_channels,
                           int64_t images_per_chunk, bool relu, bool pool, int num_threads) {
  const auto problem = winograd_problem(src, u, bias, v, dst, batch, height, width, in_channels, out_channels,
                                        images_per_chunk, relu, pool, num_threads);
  if (batch * height * width * in_channels * out_channels == 0) return;
  py::gil_scoped_release release;
  mtk::kernels().winograd_conv3x3_one_pass_nhwc(problem);
}

mtk::GroupedLinearProblem grouped_linear_problem(uintptr_t src, uintptr_t weight, uintptr_t bias, uintptr_t dst, int64_t batch,
                                  int64_t groups, int64_t in_features, int64_t out_features, bool relu,
                                  int num_threads) {
  if (batch < 0 || groups < 1 || in_features < 1 || out_features < 1)
    throw std::invalid_argument("batch must be >= 0 and groups, in_features, out_features >= 1");
  return mtk::GroupedLinearProblem{as_ptr<const float>(src), as_ptr<const float>(weight), as_ptr<const float>(bias),
                            as_ptr<float>(dst), batch, groups, in_features, out_features, relu,
                            std::max(1, num_threads)};
}

void grouped_linear(uintptr_t src, uintptr_t weight, uintptr_t bias, uintptr_t dst, int64_t batch, int64_t groups,
                 int64_t in_features, int64_t out_features, bool relu, int num_threads) {
  const auto problem =
      grouped_linear_problem(src, weight, bias, dst, batch, groups, in_features, out_features, relu, num_threads);
  py::gil_scoped_release release;
  mtk::kernels().grouped_linear(problem);
}

mtk::ConvBf16Problem conv_bf16_problem(uintptr_t src, uintptr_t weight, uintptr_t bias, uintptr_t dst, int64_t batch,
                                       int64_t height, int64_t width, int64_t in_channels, int64_t out_channels,
                                       int64_t kernel_size, int64_t stride, int64_t dst_pad, bool relu, bool pool,
                                       int dst_element, int num_threads) {
  if (batch < 0 || height < 0 || width < 0 || in_channels < 0 || out_channels < 0)
    throw std::invalid_argument("negative size");
  if (in_channels % 2) throw std::invalid_argument("in_channels must be even (pad with a zero channel)");
  if (out_channels % mtk::kBf16Block)
    throw std::invalid_argument("out_channels must be a multiple of " + std::to_string(mtk::kBf16Block));
  if (kernel_size != 1 && kernel_size != 3) throw std::invalid_argument("kernel_size must be 1 or 3");
  if (stride != 1 && stride != 2) throw std::invalid_argument("stride must be 1 or 2");
  if (dst_pad != 0 && dst_pad != 1) throw std::invalid_argument("dst_pad must be 0 or 1");
  const int64_t out_h = height > 0 ? (height - 1) / stride + 1 : 0, out_w = width > 0 ? (width - 1) / stride + 1 : 0;
  if (pool && (out_h % 2 || out_w % 2)) throw std::invalid_argument("pool needs an even output height and width");
  return mtk::ConvBf16Problem{as_ptr<const uint16_t>(src),
                              as_ptr<const uint16_t>(weight),
                              as_ptr<const float>(bias),
                              as_ptr<void>(dst),
                              batch,
                              height,
                              width,
                              in_channels,
                              out_channels,
                              kernel_size,
                              stride,
                              dst_pad,
                              relu,
                              pool,
                              activation_element(dst_element),
                              std::max(1, num_threads)};
}

void conv_bf16_nhwc(uintptr_t src, uintptr_t weight, uintptr_t bias, uintptr_t dst, int64_t batch, int64_t height,
                    int64_t width, int64_t in_channels, int64_t out_channels, int64_t kernel_size, int64_t stride,
                    int64_t dst_pad, bool relu, bool pool, int dst_element, int num_threads) {
  const auto problem = conv_bf16_problem(src, weight, bias, dst, batch, height, width, in_channels, out_channels,
                                         kernel_size, stride, dst_pad, relu, pool, dst_element, num_threads);
  if (batch * height * width * in_channels * out_channels == 0) return;
  py::gil_scoped_release release;
  mtk::kernels().conv_bf16_nhwc(problem);
}

mtk::ConvBf16Problem conv_winograd_bf16_problem(uintptr_t src, uintptr_t weight, uintptr_t bias, uintptr_t dst,
                                                int64_t batch, int64_t height, int64_t width, int64_t in_channels,
                                                int64_t out_channels, int64_t dst_pad, bool relu, bool pool,
                                                int dst_element, int num_threads) {
  if (height % 2 || width % 2) throw std::invalid_argument("height and width must be even (whole 2x2 tiles)");
  if (in_channels % mtk::kBf16Block)
    throw std::invalid_argument("in_channels must be a multiple of " + std::to_string(mtk::kBf16Block));
  return conv_bf16_problem(src, weight, bias, dst, batch, height, width, in_channels, out_channels, 3, 1, dst_pad,
                           relu, pool, dst_element, num_threads);
}

bool conv_winograd_bf16_weight_grad_nhwc(uintptr_t src, uintptr_t grad, uintptr_t grad_weight, int64_t batch,
                                         int64_t height, int64_t width, int64_t in_channels, int64_t out_channels,
                                         int num_threads) {
  if (batch < 0 || height < 0 || width < 0) throw std::invalid_argument("negative size");
  if (height % 2 || width % 2) throw std::invalid_argument("height and width must be even (whole 2x2 tiles)");
  if (in_channels <= 0 || out_channels <= 0 || in_channels % mtk::kBf16Block || out_channels % mtk::kBf16Block)
    throw std::invalid_argument("in_channels and out_channels must be positive multiples of " +
                                std::to_string(mtk::kBf16Block));
  const mtk::ConvWinogradBf16WeightGradProblem problem{
      as_ptr<const uint16_t>(src), as_ptr<const uint16_t>(grad), as_ptr<float>(grad_weight), batch, height, width,
      in_channels, out_channels, std::max(1, num_threads)};
  py::gil_scoped_release release;
  if (batch * height * width == 0) {
    std::fill_n(problem.grad_weight, 9 * in_channels * out_channels, 0.0f);
    return true;
  }
  return mtk::kernels().conv_winograd_bf16_weight_grad_nhwc(problem);
}

void conv_winograd_bf16_weight_pack(uintptr_t src, const std::vector<int64_t>& strides, int element, uintptr_t dst,
                                    int64_t out_channels, int64_t in_channels, bool flipped_transposed,
                                    int num_threads) {
  if (out_channels <= 0 || in_channels <= 0 || out_channels % mtk::kBf16Block || in_channels % mtk::kBf16Block)
    throw std::invalid_argument("out_channels and in_channels must be positive multiples of " +
                                std::to_string(mtk::kBf16Block));
  if (strides.size() != 4) throw std::invalid_argument("strides must be the weight's 4 strides");
  const mtk::ConvWinogradBf16WeightPackProblem problem{
      as_ptr<const void>(src), strides[0],   strides[1],         strides[2],        strides[3],
      as_ptr<uint16_t>(dst),   out_channels, in_channels,        activation_element(element),
      flipped_transposed,      std::max(1, num_threads)};
  py::gil_scoped_release release;
  mtk::kernels().conv_winograd_bf16_weight_pack(problem);
}

mtk::GemmConv2dGeometry gemm_conv2d_geometry(const std::vector<int64_t>& shape, int64_t kernel_h, int64_t kernel_w,
                                              int64_t stride, int64_t padding) {
  if (shape.size() != 4) throw std::invalid_argument("shape must be [N, H, W, C]");
  const mtk::GemmConv2dGeometry g{shape[0], shape[1], shape[2], shape[3], kernel_h, kernel_w, stride, padding};
  if (g.batch < 0 || g.height < 0 || g.width < 0 || g.channels < 0) throw std::invalid_argument("negative size");
  if (kernel_h < 1 || kernel_w < 1 || stride < 1 || padding < 0)
    throw std::invalid_argument("kernel sizes and stride must be >= 1 and padding >= 0");
  if (g.height + 2 * padding < kernel_h || g.width + 2 * padding < kernel_w)
    throw std::invalid_argument("the kernel does not fit in the padded input");
  return g;
}

void im2col_nhwc(uintptr_t x, uintptr_t cols, const std::vector<int64_t>& shape, int64_t kernel_h, int64_t kernel_w,
                 int64_t stride, int64_t padding, int element, int num_threads) {
  const mtk::Im2colProblem problem{gemm_conv2d_geometry(shape, kernel_h, kernel_w, stride, padding),
                                   as_ptr<const void>(x), as_ptr<void>(cols), activation_element(element),
                                   std::max(1, num_threads)};
  py::gil_scoped_release release;
  mtk::kernels().im2col_nhwc(problem);
}

void col2im_nhwc(uintptr_t cols, uintptr_t dx, const std::vector<int64_t>& shape, int64_t kernel_h, int64_t kernel_w,
                 int64_t stride, int64_t padding, int element, int num_threads) {
  const mtk::Col2imProblem problem{gemm_conv2d_geometry(shape, kernel_h, kernel_w, stride, padding),
                                   as_ptr<const void>(cols), as_ptr<void>(dx), activation_element(element),
                                   std::max(1, num_threads)};
  py::gil_scoped_release release;
  mtk::kernels().col2im_nhwc(problem);
}

void conv_winograd_bf16_nhwc(uintptr_t src, uintptr_t weight, uintptr_t bias, uintptr_t dst, int64_t batch,
                             int64_t height, int64_t width, int64_t in_channels, int64_t out_channels, int64_t dst_pad,
                             bool relu, bool pool, int dst_element, int num_threads, bool src_bordered) {
  auto problem = conv_winograd_bf16_problem(src, weight, bias, dst, batch, height, width, in_channels, out_channels,
                                            dst_pad, relu, pool, dst_element, num_threads);
  problem.src_unbordered = !src_bordered;
  if (batch * height * width * in_channels * out_channels == 0) return;
  py::gil_scoped_release release;
  mtk::kernels().conv_winograd_bf16_nhwc(problem);
}

// Consecutive layers run by one call with the GIL released: at batch 1 the Python and
// dispatcher code between layers costs more than the code itself, since each layer's
// weights push it out of the caches. Layers are added in order with the tensors they read
// and write; the chain keeps a reference to each of them, so every address it holds stays
// valid for its lifetime. The first layer's source and the last layer's destination are
// given to run() (dst None when adding the last layer).
class LayerChain {
 public:
  void add_single_channel(py::object weight, py::object bias, py::object dst, int64_t batch, int64_t height,
                          int64_t width, int64_t out_channels, bool relu) {
    Layer layer{};
    layer.kind = Kind::single_channel;
    layer.single = single_channel_problem(0, keep(weight), keep(bias), 0, batch, height, width, out_channels, relu,
                                          1);
    append(layer, dst);
  }

  void add_winograd_conv3x3_one_pass(py::object u, py::object bias, py::object v, py::object dst, int64_t batch,
                                     int64_t height, int64_t width, int64_t in_channels, int64_t out_channels,
                                     int64_t images_per_chunk, bool relu, bool pool) {
    Layer layer{};
    layer.kind = Kind::winograd_conv3x3_one_pass;
    layer.wino = winograd_problem(0, keep(u), keep(bias), keep(v), 0, batch, height, width, in_channels,
                                  out_channels, images_per_chunk, relu, pool, 1);
    append(layer, dst);
  }

  void add_conv_bf16(py::object weight, py::object bias, py::object dst, int64_t batch, int64_t height, int64_t width,
                     int64_t in_channels, int64_t out_channels, int64_t kernel_size, int64_t stride, int64_t dst_pad,
                     bool relu, bool pool, int dst_element) {
    Layer layer{};
    layer.kind = Kind::conv_bf16;
    layer.bf16 = conv_bf16_problem(0, keep(weight), keep(bias), 0, batch, height, width, in_channels, out_channels,
                                   kernel_size, stride, dst_pad, relu, pool, dst_element, 1);
    append(layer, dst);
  }

  void add_conv_winograd_bf16(py::object weight, py::object bias, py::object dst, int64_t batch, int64_t height,
                              int64_t width, int64_t in_channels, int64_t out_channels, int64_t dst_pad, bool relu,
                              bool pool, int dst_element) {
    Layer layer{};
    layer.kind = Kind::conv_winograd_bf16;
    layer.bf16 = conv_winograd_bf16_problem(0, keep(weight), keep(bias), 0, batch, height, width, in_channels,
                                            out_channels, dst_pad, relu, pool, dst_element, 1);
    append(layer, dst);
  }

  void add_grouped_linear(py::object weight, py::object bias, py::object dst, int64_t batch, int64_t groups,
                          int64_t in_features, int64_t out_features, bool relu) {
    Layer layer{};
    layer.kind = Kind::grouped_linear;
    layer.linear = grouped_linear_problem(0, keep(weight), keep(bias), 0, batch, groups, in_features, out_features,
                                          relu, 1);
    append(layer, dst);
  }

  int64_t size() const { return int64_t(layers_.size()); }

  void run(uintptr_t src, uintptr_t dst, int num_threads) {
    if (layers_.empty()) throw std::invalid_argument("the chain has no layers");
    layers_.front().src = as_ptr<const void>(src);
    layers_.back().dst = as_ptr<void>(dst);
    py::gil_scoped_release release;
    const mtk::KernelTable& kernels = mtk::kernels();
    for (Layer& layer : layers_) {
      switch (layer.kind) {
        case Kind::single_channel:
          kernels.conv3x3_single_channel_nhwc(bind(layer.single, layer, num_threads));
          break;
        case Kind::winograd_conv3x3_one_pass:
          kernels.winograd_conv3x3_one_pass_nhwc(bind(layer.wino, layer, num_threads));
          break;
        case Kind::conv_bf16: kernels.conv_bf16_nhwc(bind(layer.bf16, layer, num_threads)); break;
        case Kind::conv_winograd_bf16:
          kernels.conv_winograd_bf16_nhwc(bind(layer.bf16, layer, num_threads));
          break;
        case Kind::grouped_linear: kernels.grouped_linear(bind(layer.linear, layer, num_threads)); break;
      }
    }
  }

 private:
  enum class Kind { single_channel, winograd_conv3x3_one_pass, conv_bf16, conv_winograd_bf16, grouped_linear };
  // One of the problems is used, per kind; src and dst are set in it when the chain runs.
  struct Layer {
    Kind kind;
    const void* src;  // of the element the layer reads (float32, or bfloat16 for conv_bf16)
    void* dst;
    mtk::Conv3x3SingleChannelProblem single;
    mtk::WinogradConvProblem wino;
    mtk::ConvBf16Problem bf16;  // conv_bf16 and conv_winograd_bf16
    mtk::GroupedLinearProblem linear;
  };

  template <class Problem>
  static const Problem& bind(Problem& problem, const Layer& layer, int num_threads) {
    problem.src = static_cast<decltype(problem.src)>(layer.src);
    problem.dst = static_cast<decltype(problem.dst)>(layer.dst);
    problem.num_threads = std::max(1, num_threads);
    return problem;
  }

  // The address of a tensor's data, with the tensor kept alive by this chain.
  uintptr_t keep(const py::object& tensor) {
    if (tensor.is_none()) throw std::invalid_argument("a chain layer's weights and buffers must be tensors");
    owners_.push_back(tensor);
    return tensor.attr("data_ptr")().cast<uintptr_t>();
  }

  void append(Layer& layer, const py::object& dst) {
    layer.dst = dst.is_none() ? nullptr : as_ptr<void>(keep(dst));
    if (!layers_.empty()) {
      if (layers_.back().dst == nullptr)
        throw std::invalid_argument("only the last layer of a chain may leave its destination to run()");
      layer.src = layers_.back().dst;
    }
    layers_.push_back(layer);
  }

  std::vector<Layer> layers_;
  std::vector<py::object> owners_;
};

void check_rows(int64_t rows, int64_t channels) {
  if (rows < 0 || channels < 0) throw std::invalid_argument("negative size");
}

// The 2x2 max-pool of a BatchNorm + ReLU problem: none for an empty list, else
// [images, height, width] of x (rows = images * height * width).
mtk::Pool2x2 pool_of(const std::vector<int64_t>& pool, int64_t rows) {
  if (pool.empty()) return {};
  if (pool.size() != 3 || pool[0] < 1 || pool[1] < 2 || pool[2] < 2 || pool[0] * pool[1] * pool[2] != rows)
    throw std::invalid_argument("pool must be [] or [images, height >= 2, width >= 2] with images * height * width "
                                "== rows");
  return mtk::Pool2x2{pool[0], pool[1], pool[2]};
}

void bn_relu_forward(uintptr_t x, uintptr_t scale, uintptr_t shift, uintptr_t y, int64_t rows, int64_t channels,
                     const std::vector<int64_t>& pool, int element, int num_threads) {
  check_rows(rows, channels);
  const mtk::BnReluForwardProblem problem{as_ptr<const void>(x),      as_ptr<const float>(scale),
                                          as_ptr<const float>(shift), as_ptr<void>(y),
                                          rows,                       channels,
                                          pool_of(pool, rows),        activation_element(element),
                                          std::max(1, num_threads)};
  py::gil_scoped_release release;
  mtk::kernels().bn_relu_forward(problem);
}

void bn_relu_step_forward(uintptr_t x, uintptr_t residual, uintptr_t total, uintptr_t weight, uintptr_t bias,
                          double eps, uintptr_t y, uintptr_t mean, uintptr_t var, int64_t rows, int64_t channels,
                          const std::vector<int64_t>& pool, int element, int num_threads) {
  check_rows(rows, channels);
  if ((residual == 0) != (total == 0)) throw std::invalid_argument("residual and total go together");
  if (residual != 0 && !pool.empty()) throw std::invalid_argument("a residual needs an unpooled problem");
  const mtk::BnReluStepForward problem{as_ptr<const void>(x),    as_ptr<const void>(residual), as_ptr<void>(total),
                                       as_ptr<const float>(weight), as_ptr<const float>(bias),   eps,
                                       as_ptr<void>(y),           as_ptr<float>(mean),           as_ptr<float>(var),
                                       rows,                      channels,                      pool_of(pool, rows),
                                       activation_element(element), std::max(1, num_threads)};
  py::gil_scoped_release release;
  mtk::bn_relu_step_forward(problem);
}

void bn_relu_step_backward(uintptr_t dy, uintptr_t x, uintptr_t grad_add, uintptr_t weight, uintptr_t bias,
                           uintptr_t mean, uintptr_t var, double eps, uintptr_t dx, uintptr_t grad_weight,
                           uintptr_t grad_bias, int64_t rows, int64_t channels, const std::vector<int64_t>& pool,
                           int element, int num_threads) {
  check_rows(rows, channels);
  if (grad_add != 0 && !pool.empty()) throw std::invalid_argument("grad_add needs an unpooled problem");
  const mtk::BnReluStepBackward problem{
      as_ptr<const void>(dy),    as_ptr<const void>(x),      as_ptr<const void>(grad_add),
      as_ptr<const float>(weight), as_ptr<const float>(bias), as_ptr<const float>(mean),
      as_ptr<const float>(var),  eps,                         as_ptr<void>(dx),
      as_ptr<float>(grad_weight), as_ptr<float>(grad_bias),   rows,
      channels,                  pool_of(pool, rows),         activation_element(element),
      std::max(1, num_threads)};
  py::gil_scoped_release release;
  mtk::bn_relu_step_backward(problem);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mtkernels CPU kernels (raw buffers; validated by the Python wrappers)";
  m.def("multitask_loss_forward", &multitask_loss_forward, py::arg("logits"), py::arg("dtype"), py::arg("rows"),
        py::arg("width"), py::arg("row_stride"), py::arg("labels"), py::arg("class_offsets"), py::arg("task_scale"),
        py::arg("kind"), py::arg("margin"), py::arg("reduce"), py::arg("loss"), py::arg("grad"),
        py::arg("num_threads"),
        "Masked multi-task loss and its gradient in one pass; returns the number of out-of-range labels.");
  m.def("maxpool2x2_nhwc", &maxpool2x2_nhwc, py::arg("src"), py::arg("dst"), py::arg("batch"), py::arg("height"),
        py::arg("width"), py::arg("channels"), py::arg("relu"), py::arg("element"), py::arg("num_threads"),
        "2x2 / stride 2 max-pool (+ ReLU) of a contiguous NHWC buffer of element 0 (float32), 1 (bfloat16) or "
        "2 (uint8); NaN propagates.");
  m.def("quantize_u8", &quantize_u8, py::arg("src"), py::arg("dst"), py::arg("count"), py::arg("scale"),
        py::arg("zero_point"), py::arg("element"), py::arg("num_threads"),
        "dst = clamp(round(src / scale) + zero_point, 0, 255) of a float32 (0) or bfloat16 (1) buffer.");
  m.def("conv3x3_single_channel_nhwc", &conv3x3_single_channel_nhwc, py::arg("src"), py::arg("weight"),
        py::arg("bias"), py::arg("dst"), py::arg("batch"), py::arg("height"), py::arg("width"),
        py::arg("out_channels"), py::arg("relu"), py::arg("num_threads"),
        "3x3 / stride 1 / pad 1 convolution of a one-channel float32 image to NHWC, + bias (+ ReLU).");
  m.def("winograd_input_nhwc", &winograd_input_nhwc, py::arg("src"), py::arg("dst"), py::arg("batch"),
        py::arg("height"), py::arg("width"), py::arg("channels"), py::arg("num_threads"),
        "Winograd F(2x2,3x3) input transform of an NHWC float32 image (padding 1) to [16, tiles, C].");
  m.def("winograd_output_adjoint_nhwc", &winograd_output_adjoint_nhwc, py::arg("src"), py::arg("dst"),
        py::arg("batch"), py::arg("height"), py::arg("width"), py::arg("channels"), py::arg("num_threads"),
        "Adjoint of the Winograd F(2x2,3x3) output transform (no bias, ReLU or pool): an NHWC float32 "
        "gradient to [16, tiles, C], for the weight gradient.");
  m.def("winograd_output_nhwc", &winograd_output_nhwc, py::arg("src"), py::arg("bias"), py::arg("dst"),
        py::arg("batch"), py::arg("height"), py::arg("width"), py::arg("channels"), py::arg("relu"), py::arg("pool"),
        py::arg("num_threads"),
        "Winograd F(2x2,3x3) output transform of [16, tiles, C] to NHWC, + bias (+ ReLU) (+ 2x2 max-pool).");
  m.def("winograd_conv3x3_one_pass_nhwc", &winograd_conv3x3_one_pass_nhwc, py::arg("src"), py::arg("u"), py::arg("bias"), py::arg("v"),
        py::arg("dst"), py::arg("batch"), py::arg("height"), py::arg("width"), py::arg("in_channels"),
        py::arg("out_channels"), py::arg("images_per_chunk"), py::arg("relu"), py::arg("pool"), py::arg("num_threads"),
        "Winograd F(2x2,3x3) conv + bias (+ ReLU) (+ 2x2 max-pool) of NHWC float32, one pass per chunk of images; "
        "u packed per block of winograd_block_channels output channels.");
  m.attr("winograd_block_channels") = mtk::kWinogradBlock;
  m.def("conv_bf16_nhwc", &conv_bf16_nhwc, py::arg("src"), py::arg("weight"), py::arg("bias"), py::arg("dst"),
        py::arg("batch"), py::arg("height"), py::arg("width"), py::arg("in_channels"), py::arg("out_channels"),
        py::arg("kernel_size"), py::arg("stride"), py::arg("dst_pad"), py::arg("relu"), py::arg("pool"),
        py::arg("dst_element"), py::arg("num_threads"),
        "Direct conv (3x3 with padding 1 on a zero-bordered input [N, H + 2, W + 2, C_in], or 1x1 on [N, H, W, "
        "C_in]; stride 1 or 2) of NHWC bfloat16 with pair-packed bfloat16 weights, float32 accumulation, + bias "
        "(+ ReLU) (+ 2x2 max-pool), to NHWC of dst_element 0 (float32) or 1 (bfloat16) with a border of dst_pad "
        "(0 or 1) left untouched.");
  m.attr("bf16_block_channels") = mtk::kBf16Block;
  m.def("conv_winograd_bf16_nhwc", &conv_winograd_bf16_nhwc, py::arg("src"), py::arg("weight"), py::arg("bias"),
        py::arg("dst"), py::arg("batch"), py::arg("height"), py::arg("width"), py::arg("in_channels"),
        py::arg("out_channels"), py::arg("dst_pad"), py::arg("relu"), py::arg("pool"), py::arg("dst_element"),
        py::arg("num_threads"), py::arg("src_bordered") = true,
        "Winograd F(2x2,3x3) conv (padding 1, stride 1, even height and width) of a zero-bordered NHWC bfloat16 "
        "input [N, H + 2, W + 2, C_in] (or, src_bordered false, [N, H, W, C_in]; C_in a multiple of "
        "bf16_block_channels) with the transformed, pair-packed bfloat16 weight, float32 accumulation, + bias "
        "(+ ReLU) (+ 2x2 max-pool); dst as conv_bf16_nhwc's.");
  m.def("conv_winograd_bf16_weight_grad_nhwc", &conv_winograd_bf16_weight_grad_nhwc, py::arg("src"),
        py::arg("grad"), py::arg("grad_weight"), py::arg("batch"), py::arg("height"), py::arg("width"),
        py::arg("in_channels"), py::arg("out_channels"), py::arg("num_threads"),
        "Weight gradient of conv_winograd_bf16_nhwc by Winograd: grad_weight [C_out, C_in, 3, 3] float32 = G^T dU G, "
        "dU the sum over the 2x2 tiles of V (of the NHWC bfloat16 input, no border) times A dy A^T (of the NHWC "
        "bfloat16 output gradient), both rounded to bfloat16, float32 sums; H and W even, channels multiples of "
        "bf16_block_channels. Returns whether every value of grad_weight is finite.");
  m.def("conv_winograd_bf16_weight_pack", &conv_winograd_bf16_weight_pack, py::arg("src"), py::arg("strides"),
        py::arg("element"), py::arg("dst"), py::arg("out_channels"), py::arg("in_channels"),
        py::arg("flipped_transposed"), py::arg("num_threads"),
        "conv_winograd_bf16_nhwc's weight from a float32 or bfloat16 weight [C_out, C_in, 3, 3] of the given strides "
        "(in elements): taps rounded to bfloat16, U = G g G^T in float32, rounded to bfloat16, "
        "[C_out / bf16_block_channels, 16, C_in / 2, bf16_block_channels, 2]; or, "
        "flipped_transposed, that of the input gradient's conv (filter (i, o) = filter (o, i) flipped), "
        "[C_in / bf16_block_channels, 16, C_out / 2, bf16_block_channels, 2].");
  m.def("im2col_nhwc", &im2col_nhwc, py::arg("x"), py::arg("cols"), py::arg("shape"), py::arg("kernel_h"),
        py::arg("kernel_w"), py::arg("stride"), py::arg("padding"), py::arg("element"), py::arg("num_threads"),
        "x [N, H, W, C] (shape) -> cols [N * OH * OW, KH * KW * C], columns ordered (ky, kx, c), zero outside x; "
        "float32 or bfloat16.");
  m.def("col2im_nhwc", &col2im_nhwc, py::arg("cols"), py::arg("dx"), py::arg("shape"), py::arg("kernel_h"),
        py::arg("kernel_w"), py::arg("stride"), py::arg("padding"), py::arg("element"), py::arg("num_threads"),
        "im2col_nhwc's adjoint: dx [N, H, W, C] (shape) = the sum of the columns copied from each pixel, in "
        "float32, rounded once.");
  m.def("grouped_linear", &grouped_linear, py::arg("src"), py::arg("weight"), py::arg("bias"), py::arg("dst"),
        py::arg("batch"), py::arg("groups"), py::arg("in_features"), py::arg("out_features"), py::arg("relu"),
        py::arg("num_threads"),
        "Grouped linear layer + bias (+ ReLU) for small batches: weight [groups, out, in], float32.");
  py::class_<LayerChain>(m, "LayerChain", "Consecutive layers run by one call; keeps the tensors it reads and writes.")
      .def(py::init<>())
      .def("add_single_channel", &LayerChain::add_single_channel, py::arg("weight"), py::arg("bias"), py::arg("dst"),
           py::arg("batch"), py::arg("height"), py::arg("width"), py::arg("out_channels"), py::arg("relu"),
           "Append conv3x3_single_channel_nhwc; dst None for the last layer (given to run).")
      .def("add_winograd_conv3x3_one_pass", &LayerChain::add_winograd_conv3x3_one_pass, py::arg("u"), py::arg("bias"),
           py::arg("v"), py::arg("dst"),
           py::arg("batch"), py::arg("height"), py::arg("width"), py::arg("in_channels"), py::arg("out_channels"),
           py::arg("images_per_chunk"), py::arg("relu"), py::arg("pool"),
           "Append winograd_conv3x3_one_pass_nhwc; dst None for the last layer (given to run).")
      .def("add_conv_bf16", &LayerChain::add_conv_bf16, py::arg("weight"), py::arg("bias"), py::arg("dst"),
           py::arg("batch"), py::arg("height"), py::arg("width"), py::arg("in_channels"), py::arg("out_channels"),
           py::arg("kernel_size"), py::arg("stride"), py::arg("dst_pad"), py::arg("relu"), py::arg("pool"),
           py::arg("dst_element"), "Append conv_bf16_nhwc; dst None for the last layer (given to run).")
      .def("add_conv_winograd_bf16", &LayerChain::add_conv_winograd_bf16, py::arg("weight"), py::arg("bias"),
           py::arg("dst"), py::arg("batch"), py::arg("height"), py::arg("width"), py::arg("in_channels"),
           py::arg("out_channels"), py::arg("dst_pad"), py::arg("relu"), py::arg("pool"), py::arg("dst_element"),
           "Append conv_winograd_bf16_nhwc; dst None for the last layer (given to run).")
      .def("add_grouped_linear", &LayerChain::add_grouped_linear, py::arg("weight"), py::arg("bias"), py::arg("dst"), py::arg("batch"),
           py::arg("groups"), py::arg("in_features"), py::arg("out_features"), py::arg("relu"),
           "Append grouped_linear; dst None for the last layer (given to run).")
      .def("__len__", &LayerChain::size)
      .def("run", &LayerChain::run, py::arg("src"), py::arg("dst"), py::arg("num_threads"),
           "Run the layers in order from src into dst.");
  m.def("bn_relu_forward", &bn_relu_forward, py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("y"),
        py::arg("rows"), py::arg("channels"), py::arg("pool"), py::arg("element"), py::arg("num_threads"),
        "y = max(0, x * scale + shift) per channel of [rows, channels] activations of element 0 (float32) or 1 "
        "(bfloat16), then 2x2 max-pooled if pool is [images, height, width] of x (the element and pool arguments "
        "of the bn_relu_ functions below mean the same; [] for no pool).");
  m.def("bn_relu_step_forward", &bn_relu_step_forward, py::arg("x"), py::arg("residual"), py::arg("total"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("y"), py::arg("mean"), py::arg("var"),
        py::arg("rows"), py::arg("channels"), py::arg("pool"), py::arg("element"), py::arg("num_threads"),
        "A training step's BatchNorm + ReLU forward: batch statistics (of x + residual, written to total, where residual is an address; 0 for "
        "none), float32 mean and biased variance, y (pooled where pool is [images, height, width]).");
  m.def("bn_relu_step_backward", &bn_relu_step_backward, py::arg("dy"), py::arg("x"), py::arg("grad_add"),
        py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("var"), py::arg("eps"), py::arg("dx"),
        py::arg("grad_weight"), py::arg("grad_bias"), py::arg("rows"), py::arg("channels"), py::arg("pool"),
        py::arg("element"), py::arg("num_threads"),
        "Its backward from the saved mean and variance: dx (+ grad_add where it is an address; unpooled only), "
        "float32 d weight and d bias.");
  m.def("cpu_features", &mtk::cpu_features, "Instruction-set extensions this CPU and OS support.");
  m.def("isa", []() { return std::string(mtk::isa_name(mtk::active_isa())); },
        "The kernel variant in use: 'baseline', 'avx2', 'avx512' or 'avx512bf16'.");
  m.def("set_isa", [](const std::string& name) { mtk::set_active_isa(mtk::isa_from_name(name)); },
        py::arg("name"), "Select a kernel variant; raises ValueError if this CPU cannot run it.");
  m.def("isa_supported", [](const std::string& name) { return mtk::isa_supported(mtk::isa_from_name(name)); },
        py::arg("name"));
}
