#include "cpu_dispatch.h"

#include <cstdlib>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <stdexcept>

namespace mtk {
namespace {

bool has(const char* feature) {
#if defined(__x86_64__) || defined(_M_X64)
  // GCC/Clang check the OS has enabled the register state (XGETBV) as well.
  __builtin_cpu_init();
  const std::string f(feature);
  if (f == "avx") return __builtin_cpu_supports("avx");
  if (f == "avx2") return __builtin_cpu_supports("avx2");
  if (f == "fma") return __builtin_cpu_supports("fma");
  if (f == "f16c") return __builtin_cpu_supports("f16c");
  if (f == "avx512f") return __builtin_cpu_supports("avx512f");
  if (f == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (f == "avx512vl") return __builtin_cpu_supports("avx512vl");
  if (f == "avx512dq") return __builtin_cpu_supports("avx512dq");
  if (f == "sse4.2") return __builtin_cpu_supports("sse4.2");
  if (f == "avx512bf16") return __builtin_cpu_supports("avx512bf16");
  if (f == "avx512vnni") return __builtin_cpu_supports("avx512vnni");
  if (f == "amx-tile") return __builtin_cpu_supports("amx-tile");
  if (f == "amx-bf16") return __builtin_cpu_supports("amx-bf16");
  if (f == "amx-int8") return __builtin_cpu_supports("amx-int8");
#endif
  (void)feature;
  return false;
}

Isa best_isa() {
  for (Isa isa : {Isa::avx512bf16, Isa::avx512, Isa::avx2})
    if (isa_supported(isa)) return isa;
  return Isa::baseline;
}

Isa initial_isa() {
  const Isa best = best_isa();
  const char* env = std::getenv("MTKERNELS_ISA");
  if (env == nullptr || *env == '\0') return best;
  const Isa wanted = isa_from_name(env);
  // Asking for more than the CPU has falls back to the best it has.
  return int(wanted) < int(best) ? wanted : best;
}

Isa& current() {
  static Isa isa = initial_isa();
  return isa;
}

// Linux hands out the AMX tile state only to a process that asks for it, once.
bool amx_permitted() {
#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
  static const bool permitted = [] {
    if (!has("amx-tile")) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
#else
  return false;
#endif
}

}  // namespace

std::map<std::string, bool> cpu_features() {
  std::map<std::string, bool> out;
  for (const char* f : {"sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                        "avx512bf16", "avx512vnni", "amx-tile", "amx-bf16", "amx-int8"})
    out[f] = has(f);
  out["amx-permitted"] = amx_permitted();
  return out;
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::baseline:
      return true;
    case Isa::avx2:
#ifdef MTK_HAVE_AVX2
      return has("avx2") && has("fma") && has("f16c");
#else
      return false;
#endif
    case Isa::avx512:
#ifdef MTK_HAVE_AVX512
      return has("avx512f") && has("avx512bw") && has("avx512vl") && has("avx512dq") && has("fma") &&
             has("f16c");
#else
      return false;
#endif
    case Isa::avx512bf16:
#ifdef MTK_HAVE_AVX512BF16
      return isa_supported(Isa::avx512) && has("avx512bf16");
#else
      return false;
#endif
  }
  return false;
}

Isa isa_from_name(const std::string& name) {
  if (name == "baseline") return Isa::baseline;
  if (name == "avx2") return Isa::avx2;
  if (name == "avx512") return Isa::avx512;
  if (name == "avx512bf16") return Isa::avx512bf16;
  throw std::invalid_argument("isa must be 'baseline', 'avx2', 'avx512' or 'avx512bf16', got '" + name + "'");
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::avx512bf16: return "avx512bf16";
    default: return "baseline";
  }
}

Isa active_isa() { return current(); }

void set_active_isa(Isa isa) {
  if (!isa_supported(isa))
    throw std::invalid_argument(std::string("isa '") + isa_name(isa) + "' is not supported by this CPU or build");
  current() = isa;
}

// A variant's table, each field assigned from the function of the same name.
#define MTK_KERNEL_ASSIGN(name, type) table.name = variant::name;
#define MTK_TABLE(isa)               \
  [] {                               \
    namespace variant = isa;         \
    KernelTable table;               \
    MTK_KERNELS(MTK_KERNEL_ASSIGN)   \
    return table;                    \
  }()

const KernelTable& kernels() {
  static const KernelTable baseline_table = MTK_TABLE(baseline);
#ifdef MTK_HAVE_AVX2
  static const KernelTable avx2_table = MTK_TABLE(avx2);
  if (current() == Isa::avx2) return avx2_table;
#endif
#ifdef MTK_HAVE_AVX512
  static const KernelTable avx512_table = MTK_TABLE(avx512);
  if (current() == Isa::avx512) return avx512_table;
#endif
#ifdef MTK_HAVE_AVX512BF16
  static const KernelTable avx512bf16_table = [] {
    KernelTable table = MTK_TABLE(avx512);
    table.conv_bf16_nhwc = avx512bf16::conv_bf16_nhwc;
    table.conv_winograd_bf16_nhwc = avx512bf16::conv_winograd_bf16_nhwc;
    table.conv_winograd_bf16_weight_grad_nhwc = avx512bf16::conv_winograd_bf16_weight_grad_nhwc;
    return table;
  }();
  if (current() == Isa::avx512bf16) return avx512bf16_table;
#endif
  return baseline_table;
}

#undef MTK_TABLE
#undef MTK_KERNEL_ASSIGN

}  // namespace mtk
