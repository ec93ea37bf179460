// Runs CUDA kernel bodies on the CPU, for testing their index logic where there is no GPU (CI).
//
// One std::thread per CUDA thread of a block, the blocks one after another, __syncthreads as a std::barrier
// shared by the block's threads. threadIdx / blockIdx are thread-local, blockDim / gridDim global. Dynamic
// shared memory is the namespace-scope array a kernel's `extern __shared__` declaration names: the test defines
// it (blocks run one at a time, so one array serves them all); static __shared__ arrays become function
// statics. What this cannot check: warp-level behaviour
// (shuffles; wmma), timing, and the memory model beyond
// the barrier's ordering. Warp collectives (ldmatrix, mma.sync, __shfl_xor_sync) and Hopper's warpgroup MMA
// (wgmma, with its shared-memory descriptors) are emulated from their documented layouts.
//
// Include this before any kernel header.
#pragma once

#include <cuda_runtime_api.h>  // dim3, uint3, and the host definitions of __device__ and friends
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <memory>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
// A kernel's static __shared__ arrays become function-statics: one copy, which a block's threads share (blocks
// run one at a time). Dynamic shared memory is declared through XO_EXTERN_SHARED (kernels/separable.cuh).
#undef __shared__
#define __shared__ static
#define XO_EXTERN_SHARED extern

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
inline std::barrier<>* xo_emulated_block_barrier = nullptr;
inline thread_local std::barrier<>* xo_emulated_warp_barrier = nullptr;  // the 32 threads of this thread's warp
inline thread_local std::barrier<>* xo_emulated_warpgroup_barrier = nullptr;  // the 128 of its warpgroup

inline void __syncthreads() { xo_emulated_block_barrier->arrive_and_wait(); }
inline void xo_emulated_syncwarp() { xo_emulated_warp_barrier->arrive_and_wait(); }
// A device-side trap ends the whole test run, as it would end the kernel (and poison the context) on a GPU.
inline void __trap() { std::abort(); }

inline unsigned int __float_as_uint(float v) {
  unsigned int u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// __shfl_xor_sync over a whole warp (the mask is not checked): each lane reads lane ^ lane_mask's value.
inline float xo_emulated_shuffle[32][32];  // [warp][lane]
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  xo_emulated_shuffle[warp][lane] = v;
  xo_emulated_syncwarp();
  const float r = xo_emulated_shuffle[warp][lane ^ static_cast<unsigned>(lane_mask)];
  xo_emulated_syncwarp();
  return r;
}

// Device math the kernels use that the host headers do not declare.
inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }

// ---- warp collectives: ldmatrix.x4 and mma.sync.m16n8k16 (kernels/separable.cuh's MmaGemm) ----
// The lanes of a warp meet at a warp barrier and exchange their operands through per-warp scratch; each lane then
// takes what the PTX ISA says it receives. These encode the documented fragment layouts (see MmaGemm), so the
// kernel's addressing and tile bookkeeping are checked against them; the GPU tests check the hardware.
#define XO_EMULATED_WARP_MMA 1
namespace xception_ops::kernels {

struct EmulatedWarpScratch {
  const void* rows[32];
  unsigned a[32][4];
  unsigned b[32][2];
};
inline EmulatedWarpScratch emulated_warp_scratch[32];

inline void ldmatrix_x4(unsigned (&r)[4], const void* smem_row) {
  const unsigned lane = threadIdx.x % 32;
  EmulatedWarpScratch& s = emulated_warp_scratch[threadIdx.x / 32];
  s.rows[lane] = smem_row;
  xo_emulated_syncwarp();
  for (int j = 0; j < 4; ++j) {  // matrix j, row lane / 4, columns 2 (lane % 4) and + 1
    const auto* row = static_cast<const unsigned short*>(s.rows[8 * j + lane / 4]);
    r[j] = static_cast<unsigned>(row[2 * (lane % 4)]) | (static_cast<unsigned>(row[2 * (lane % 4) + 1]) << 16);
  }
  xo_emulated_syncwarp();
}

template <bool kBf16>
void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  const unsigned lane = threadIdx.x % 32;
  EmulatedWarpScratch& s = emulated_warp_scratch[threadIdx.x / 32];
  for (int i = 0; i < 4; ++i) s.a[lane][i] = a[i];
  s.b[lane][0] = b0, s.b[lane][1] = b1;
  xo_emulated_syncwarp();
  auto value = [](unsigned reg, int high) {
    const unsigned short bits = static_cast<unsigned short>(high ? reg >> 16 : reg & 0xffffu);
    return kBf16 ? __uint_as_float(static_cast<unsigned>(bits) << 16) : __half2float(__ushort_as_half(bits));
  };
  // A(row, k) sits in lane 4 (row % 8) + (k % 8) / 2, register (row >= 8) + 2 (k >= 8), half k % 2;
  // B(k, n) in lane 4 n + (k % 8) / 2, register k >= 8, half k % 2.
  auto A = [&](int row, int k) { return value(s.a[4 * (row % 8) + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k % 2); };
  auto B = [&](int k, int n) { return value(s.b[4 * n + (k % 8) / 2][k >= 8], k % 2); };
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = static_cast<int>(lane / 4) + 8 * (i / 2), col = 2 * static_cast<int>(lane % 4) + i % 2;
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[i] = acc;
  }
  xo_emulated_syncwarp();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// cp.async: each thread's copies wait in committed groups and land only when a cp_async_wait lets them (the
// latest moment the hardware allows), so a kernel that reads a buffer before waiting for it, or refills one
// that another warp may still read, computes wrong results here.
struct EmulatedAsyncCopy {
  void* dst;
  const void* src;
};
inline thread_local std::vector<EmulatedAsyncCopy> emulated_open_group;
inline thread_local std::vector<std::vector<EmulatedAsyncCopy>> emulated_committed_groups;

inline void cp_async_16(void* smem, const void* gmem) { emulated_open_group.push_back({smem, gmem}); }
inline void cp_async_commit() {
  emulated_committed_groups.push_back(std::move(emulated_open_group));
  emulated_open_group.clear();
}
template <int kGroups>
void cp_async_wait() {
  while (emulated_committed_groups.size() > static_cast<size_t>(kGroups)) {
    for (const EmulatedAsyncCopy& c : emulated_committed_groups.front()) std::memcpy(c.dst, c.src, 16);
    emulated_committed_groups.erase(emulated_committed_groups.begin());
  }
}


// ---- Hopper's warpgroup MMA (kernels/wgmma.cuh) ----
// Shared-memory addresses are offsets from xo_emulated_smem_base, which a test sets to its dynamic shared-memory
// array, so that descriptors carry them in their 14-bit fields as on the GPU. wgmma_rs deposits the warpgroup's A
// fragments (at a warpgroup barrier) and queues the product, wgmma_ss queues it with A's descriptor; it is
// applied, reading shared memory through the descriptors as the PTX ISA defines them (no swizzling), only when
// wgmma_wait lets the group finish: a kernel that reads its accumulators, or rewrites an operand's buffer, before
// waiting computes wrong results here, as it may on the GPU. Each thread also reads its part of the operands at
// issue, and the wait counts a race (emulated_wgmma_races, which the tests check) where they changed in between:
// a missing barrier before the issue, or a refill before the wait, even where the values at the wait happen to be
// right. (Not checked: the async-proxy fence, which is a no-op here, and the warpgroup's uniform descriptors.)
#define XO_EMULATED_WGMMA 1
inline unsigned char* xo_emulated_smem_base = nullptr;

inline uint32_t smem_address(const void* p) {
  const auto offset = static_cast<const unsigned char*>(p) - xo_emulated_smem_base;
  if (xo_emulated_smem_base == nullptr || offset < 0 || offset >= (1 << 18)) std::abort();
  return static_cast<uint32_t>(offset);
}
inline void wgmma_fence() {}
inline void fence_proxy_async() {}
template <int kN>
void wgmma_fence_operands(float (&)[kN]) {}

struct EmulatedWgmma {
  float* d;
  int n;
  bool bf16;
  uint64_t desc;    // B's
  uint64_t a_desc;  // A's, where a_smem
  bool a_smem;
  bool mn_major;    // both operands transposed (wgmma_ss_mn)
  float a[64][16];  // A, where !a_smem
  std::vector<float> issued;  // the operand values this thread's product reads, as they were at issue
};
inline unsigned emulated_wgmma_a[8][128][4];  // [warpgroup][thread of the group][register]
inline thread_local std::vector<EmulatedWgmma> emulated_wgmma_open;
inline thread_local std::vector<std::vector<EmulatedWgmma>> emulated_wgmma_committed;

// Element (k, row) of a shared-memory operand. Descriptor bits 0-13 start, 16-29 leading (K) byte offset, 32-45
// stride (M or N) byte offset, in 16-byte units; this emulation knows only the unswizzled layouts with base offset
// 0. K-major, ((8,m),(T,2k)):((1T,SBO),(1,LBO)), a row's 8 K values in 16 bytes; MN-major, ((T,1,m),(8,k)):
// ((1,T,SBO),(1T,LBO)), a K value's 8 rows in 16 bytes.
inline float emulated_wgmma_element(const EmulatedWgmma& op, uint64_t desc, int k, int row) {
  if ((desc >> 49) != 0) std::abort();
  const uint64_t start = (desc & 0x3FFFu) << 4, lead = ((desc >> 16) & 0x3FFFu) << 4,
                 stride = ((desc >> 32) & 0x3FFFu) << 4;
  const unsigned char* e = xo_emulated_smem_base + start + (row / 8) * stride + (k / 8) * lead +
                           (op.mn_major ? (k % 8) * 16 + (row % 8) * 2 : (row % 8) * 16 + (k % 8) * 2);
  unsigned short bits;
  std::memcpy(&bits, e, 2);
  return op.bf16 ? __uint_as_float(static_cast<unsigned>(bits) << 16) : __half2float(__ushort_as_half(bits));
}

// The calling thread's accumulator elements of `op`: element 4 j + e of its fragment is D(row, col) below.
inline int emulated_wgmma_row(int e) {
  const unsigned member = threadIdx.x % 128;
  return static_cast<int>(16 * (member / 32) + (member % 32) / 4 + 8 * (e / 2));
}
inline int emulated_wgmma_col(int j, int e) { return 8 * j + 2 * static_cast<int>(threadIdx.x % 4) + e % 2; }

// The operand values the calling thread's part of `op` reads (its two rows of A, its columns of B), in a fixed
// order: read at issue and again when the product is applied, they must agree. On the GPU the product reads its
// shared-memory operands at some moment between the warpgroup's issue and the wait that covers it, so a kernel
// that writes them in that window (a missing barrier before the issue, a refill before the wait) is racing.
inline void emulated_wgmma_operands(const EmulatedWgmma& op, std::vector<float>& out) {
  out.clear();
  for (int e = 0; e < 4; e += 2) {
    for (int k = 0; k < 16; ++k) {
      const int row = emulated_wgmma_row(e);
      out.push_back(op.a_smem ? emulated_wgmma_element(op, op.a_desc, k, row) : op.a[row][k]);
    }
  }
  for (int j = 0; j < op.n / 8; ++j) {
    for (int e = 0; e < 2; ++e) {
      for (int k = 0; k < 16; ++k) out.push_back(emulated_wgmma_element(op, op.desc, k, emulated_wgmma_col(j, e)));
    }
  }
}
inline void emulated_wgmma_issue(EmulatedWgmma& op) {
  emulated_wgmma_operands(op, op.issued);
  emulated_wgmma_open.push_back(std::move(op));
}

template <int kN, bool kBf16>
void wgmma_rs(float (&d)[kN / 2], const unsigned (&a)[4], uint64_t b_desc) {
  const unsigned group = threadIdx.x / 128, member = threadIdx.x % 128;
  for (int i = 0; i < 4; ++i) emulated_wgmma_a[group][member][i] = a[i];
  xo_emulated_warpgroup_barrier->arrive_and_wait();
  EmulatedWgmma op;
  op.d = d, op.n = kN, op.bf16 = kBf16, op.desc = b_desc, op.a_desc = 0, op.a_smem = false, op.mn_major = false;
  auto value = [](unsigned reg, int high) {
    const unsigned short bits = static_cast<unsigned short>(high ? reg >> 16 : reg & 0xffffu);
    return kBf16 ? __uint_as_float(static_cast<unsigned>(bits) << 16) : __half2float(__ushort_as_half(bits));
  };
  // A(row, k): warp row / 16, lane 4 (row % 8) + (k % 8) / 2, register (row % 16 >= 8) + 2 (k >= 8), half k % 2.
  for (int row = 0; row < 64; ++row) {
    for (int k = 0; k < 16; ++k) {
      const unsigned m = 32 * (row / 16) + 4 * (row % 8) + (k % 8) / 2;
      op.a[row][k] = value(emulated_wgmma_a[group][m][(row % 16 >= 8) + 2 * (k >= 8)], k % 2);
    }
  }
  xo_emulated_warpgroup_barrier->arrive_and_wait();
  emulated_wgmma_issue(op);
}
template <int kN, bool kBf16>
void wgmma_ss(float (&d)[kN / 2], uint64_t a_desc, uint64_t b_desc) {
  EmulatedWgmma op;
  op.d = d, op.n = kN, op.bf16 = kBf16, op.desc = b_desc, op.a_desc = a_desc, op.a_smem = true, op.mn_major = false;
  emulated_wgmma_issue(op);
}
template <int kN, bool kBf16>
void wgmma_ss_mn(float (&d)[kN / 2], uint64_t a_desc, uint64_t b_desc) {
  EmulatedWgmma op;
  op.d = d, op.n = kN, op.bf16 = kBf16, op.desc = b_desc, op.a_desc = a_desc, op.a_smem = true, op.mn_major = true;
  emulated_wgmma_issue(op);
}
inline void wgmma_commit() {
  emulated_wgmma_committed.push_back(std::move(emulated_wgmma_open));
  emulated_wgmma_open.clear();
}
// Counts the products whose operands changed between issue and wait (a race on the GPU); a test reads it.
inline std::atomic<long> emulated_wgmma_races{0};
template <int kGroups>
void wgmma_wait() {
  std::vector<float> now;
  while (emulated_wgmma_committed.size() > static_cast<size_t>(kGroups)) {
    for (const EmulatedWgmma& op : emulated_wgmma_committed.front()) {
      emulated_wgmma_operands(op, now);
      if (now.size() != op.issued.size() ||
          std::memcmp(now.data(), op.issued.data(), now.size() * sizeof(float)) != 0) {
        emulated_wgmma_races.fetch_add(1);
      }
      auto B = [&](int k, int n) { return emulated_wgmma_element(op, op.desc, k, n); };
      auto A = [&](int row, int k) { return op.a_smem ? emulated_wgmma_element(op, op.a_desc, k, row) : op.a[row][k]; };
      for (int j = 0; j < op.n / 8; ++j) {
        for (int e = 0; e < 4; ++e) {
          const int row = emulated_wgmma_row(e), col = emulated_wgmma_col(j, e);
          float acc = op.d[4 * j + e];
          for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
          op.d[4 * j + e] = acc;
        }
      }
    }
    emulated_wgmma_committed.erase(emulated_wgmma_committed.begin());
  }
}

}  // namespace xception_ops::kernels

// kernel<<<grid, block>>>(args...), emulated.
template <typename Kernel, typename... Args>
void emulate_launch(Kernel kernel, dim3 grid, dim3 block, const Args&... args) {
  gridDim = grid;
  blockDim = block;
  const unsigned int threads = block.x * block.y * block.z;
  for (unsigned int bz = 0; bz < grid.z; ++bz) {
    for (unsigned int by = 0; by < grid.y; ++by) {
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        std::barrier<> barrier(threads);
        xo_emulated_block_barrier = &barrier;
        std::vector<std::unique_ptr<std::barrier<>>> warps;
        for (unsigned int w = 0; w * 32 < threads; ++w) {
          warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
        }
        std::vector<std::unique_ptr<std::barrier<>>> warpgroups;
        for (unsigned int w = 0; w * 128 < threads; ++w) {
          warpgroups.push_back(std::make_unique<std::barrier<>>(std::min(128u, threads - 128 * w)));
        }
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            blockIdx = uint3{bx, by, bz};
            xo_emulated_warp_barrier = warps[t / 32].get();
            xo_emulated_warpgroup_barrier = warpgroups[t / 128].get();
            kernel(args...);
          });
        }
        for (auto& th : pool) th.join();
      }
    }
  }
  xo_emulated_block_barrier = nullptr;
}
