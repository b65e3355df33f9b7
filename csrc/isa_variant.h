// Included by every kernel source compiled once per instruction set (see CMakeLists.txt):
// MTK_ISA is the namespace of the variant being compiled (baseline, avx2 or avx512).
#pragma once

#ifndef MTK_ISA
#error "MTK_ISA must name the instruction-set variant being compiled"
#endif
