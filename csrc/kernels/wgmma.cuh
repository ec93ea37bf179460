// Hopper's warpgroup matrix multiply (wgmma.mma_async, sm_90a): the PTX wrappers the pointwise GEMM uses
// (kernels/pointwise_gemm.cuh). Torch-free.
//
// A warpgroup is 4 consecutive warps (128 threads) that issue one wgmma together: D[64 x N] += A[64 x 16] B[16 x N],
// float32 accumulators, A from registers, B from shared memory named by a descriptor.
//   A (registers): warp w of the group holds rows 16 w .. 16 w + 15 in mma.m16n8k16's A layout, which is what
//     ldmatrix.x4 returns: g = lane / 4, t = lane % 4; a0 = (16 w + g, 2t..2t+1), a1 = (16 w + g + 8, 2t..),
//     a2 = (16 w + g, 2t + 8..), a3 = (16 w + g + 8, 2t + 8..).
//   A (shared memory, the other form): K-major core matrices, as B below.
//   D (registers): d[4 j + e] = (16 w + g + 8 (e / 2), 8 j + 2 t + e % 2) for j < N / 8.
//   B (shared memory, "K-major": each of B's N columns has its K values contiguous, i.e. W [N][K] row-major):
//     without swizzling, in core matrices of 8 columns x 8 K values (8 rows of 16 bytes, 128 contiguous bytes).
//     The descriptor gives the byte distance between core matrices adjacent in K (the leading-dimension offset)
//     and between those adjacent in N (the stride-dimension offset): PTX ISA, "Matrix Descriptor Format".
// wgmma runs asynchronously: wgmma_commit() closes a group of them and wgmma_wait<n>() returns once at most the
// n most recent groups are still running; until then neither their accumulators nor their A registers nor their
// B buffer may be touched. Shared memory written by ordinary stores (or cp.async) must be fenced for the async
// proxy that wgmma reads through (fence_proxy_async) before the barrier that publishes it.
//
// Compiled for sm_90a only (XO_WGMMA); tests/cpp/cuda_emulation.h provides CPU versions (XO_EMULATED_WGMMA) that
// decode the descriptor as documented and apply each group's products when it is waited for.
#pragma once

#include <cstdint>

#include "depthwise_params.h"  // XO_HOST_DEVICE

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define XO_WGMMA 1
#endif

namespace xception_ops {
namespace kernels {

// A shared-memory matrix descriptor without swizzling: bits 0-13 the start address, 16-29 the leading-dimension
// byte offset, 32-45 the stride-dimension byte offset, each in units of 16 bytes; base offset and swizzle mode 0.
XO_HOST_DEVICE constexpr uint64_t wgmma_desc(uint32_t smem_address, uint32_t leading_bytes, uint32_t stride_bytes) {
  return static_cast<uint64_t>((smem_address & 0x3FFFFu) >> 4) |
         (static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFFu) << 32);
}

#if defined(XO_WGMMA)
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Orders this warpgroup's earlier register and shared-memory accesses before the wgmma that follow.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kGroups>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kGroups) : "memory");
}
// This thread's generic-proxy writes to shared memory become visible to the async proxy (wgmma's reads).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accesses of an accumulator across the wgmma fences and waits (it sees the
// wgmma asm as reading and writing the registers at once).
template <int kN>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d += A B for one 64 x kN x 16 step; kBf16 picks bf16 or fp16 operands. wgmma_rs takes A from registers,
// wgmma_ss from shared memory (K-major, like B). ptxas serializes register-A products whenever an instruction
// writes a register that any wgmma in flight reads, so only wgmma_ss lets a group run while the next stage's
// operands are prepared.
template <int kN, bool kBf16>
__device__ __forceinline__ void wgmma_rs(float (&d)[kN / 2], const unsigned (&a)[4], uint64_t b_desc);
template <int kN, bool kBf16>
__device__ __forceinline__ void wgmma_ss(float (&d)[kN / 2], uint64_t a_desc, uint64_t b_desc);
// wgmma_ss with both operands "MN-major" (transposed: A's M and B's N contiguous in memory, imm-trans 1), in core
// matrices of 8 K rows x 16 bytes along M or N; the descriptor's leading offset steps along K, its stride offset
// along M or N (PTX ISA, canonical layouts: ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))).
template <int kN, bool kBf16>
__device__ __forceinline__ void wgmma_ss_mn(float (&d)[kN / 2], uint64_t a_desc, uint64_t b_desc);

// The accumulators as asm operands, 8 at a time, and their names in the instruction ("%0, %1, ...").
#define XO_ACC8(o)                                                                                      \
  "+f"(d[o]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3]), "+f"(d[o + 4]), "+f"(d[o + 5]), "+f"(d[o + 6]), \
      "+f"(d[o + 7])
#define XO_ACC32 XO_ACC8(0), XO_ACC8(8), XO_ACC8(16), XO_ACC8(24)
#define XO_ACC64 XO_ACC32, XO_ACC8(32), XO_ACC8(40), XO_ACC8(48), XO_ACC8(56)
#define XO_ACC96 XO_ACC64, XO_ACC8(64), XO_ACC8(72), XO_ACC8(80), XO_ACC8(88)
#define XO_ACC128 \
  XO_ACC64, XO_ACC8(64), XO_ACC8(72), XO_ACC8(80), XO_ACC8(88), XO_ACC8(96), XO_ACC8(104), XO_ACC8(112), XO_ACC8(120)
#define XO_REGS32 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define XO_REGS64 XO_REGS32 ", " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define XO_REGS96 XO_REGS64 ", " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define XO_REGS128 XO_REGS96 ", " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"

// One specialization of wgmma_rs / wgmma_ss / wgmma_ss_mn: N, the operand type's PTX name, whether it is bf16, the
// accumulators' names and operands, the names of A and B after them, and the immediates that end the instruction
// (scale-d, scale-a, scale-b and the transpose bits; register A has no transpose bit).
#define XO_WGMMA_RS(N, TYPE, BF16, REGS, ACC, AB)                                                              \
  template <>                                                                                                  \
  __device__ __forceinline__ void wgmma_rs<N, BF16>(float (&d)[N / 2], const unsigned (&a)[4], uint64_t b_desc) { \
    asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " {" REGS "}, " AB           \
                 ", 1, 1, 1, 0;\n"                                                                             \
                 : ACC                                                                                          \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc));                                  \
  }
#define XO_WGMMA_SS(NAME, N, TYPE, BF16, REGS, ACC, AB, TRANSPOSE)                                           \
  template <>                                                                                                  \
  __device__ __forceinline__ void NAME<N, BF16>(float (&d)[N / 2], uint64_t a_desc, uint64_t b_desc) {         \
    asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " {" REGS "}, " AB           \
                 ", 1, 1, 1, " TRANSPOSE ";\n"                                                                 \
                 : ACC                                                                                          \
                 : "l"(a_desc), "l"(b_desc));                                                                  \
  }

XO_WGMMA_RS(64, "bf16", true, XO_REGS32, XO_ACC32, "{%32, %33, %34, %35}, %36")
XO_WGMMA_RS(64, "f16", false, XO_REGS32, XO_ACC32, "{%32, %33, %34, %35}, %36")
XO_WGMMA_RS(128, "bf16", true, XO_REGS64, XO_ACC64, "{%64, %65, %66, %67}, %68")
XO_WGMMA_RS(128, "f16", false, XO_REGS64, XO_ACC64, "{%64, %65, %66, %67}, %68")
XO_WGMMA_RS(192, "bf16", true, XO_REGS96, XO_ACC96, "{%96, %97, %98, %99}, %100")
XO_WGMMA_RS(192, "f16", false, XO_REGS96, XO_ACC96, "{%96, %97, %98, %99}, %100")
XO_WGMMA_RS(256, "bf16", true, XO_REGS128, XO_ACC128, "{%128, %129, %130, %131}, %132")
XO_WGMMA_RS(256, "f16", false, XO_REGS128, XO_ACC128, "{%128, %129, %130, %131}, %132")
XO_WGMMA_SS(wgmma_ss, 64, "bf16", true, XO_REGS32, XO_ACC32, "%32, %33", "0, 0")
XO_WGMMA_SS(wgmma_ss, 64, "f16", false, XO_REGS32, XO_ACC32, "%32, %33", "0, 0")
XO_WGMMA_SS(wgmma_ss, 128, "bf16", true, XO_REGS64, XO_ACC64, "%64, %65", "0, 0")
XO_WGMMA_SS(wgmma_ss, 128, "f16", false, XO_REGS64, XO_ACC64, "%64, %65", "0, 0")
XO_WGMMA_SS(wgmma_ss, 192, "bf16", true, XO_REGS96, XO_ACC96, "%96, %97", "0, 0")
XO_WGMMA_SS(wgmma_ss, 192, "f16", false, XO_REGS96, XO_ACC96, "%96, %97", "0, 0")
XO_WGMMA_SS(wgmma_ss, 256, "bf16", true, XO_REGS128, XO_ACC128, "%128, %129", "0, 0")
XO_WGMMA_SS(wgmma_ss, 256, "f16", false, XO_REGS128, XO_ACC128, "%128, %129", "0, 0")
XO_WGMMA_SS(wgmma_ss_mn, 128, "bf16", true, XO_REGS64, XO_ACC64, "%64, %65", "1, 1")
XO_WGMMA_SS(wgmma_ss_mn, 128, "f16", false, XO_REGS64, XO_ACC64, "%64, %65", "1, 1")

#undef XO_WGMMA_SS
#undef XO_WGMMA_RS
#undef XO_REGS128
#undef XO_REGS96
#undef XO_REGS64
#undef XO_REGS32
#undef XO_ACC128
#undef XO_ACC96
#undef XO_ACC64
#undef XO_ACC32
#undef XO_ACC8
#endif  // XO_WGMMA

}  // namespace kernels
}  // namespace xception_ops
