// Runs CUDA kernel bodies on the CPU, for testing their index logic where there is no GPU (CI).
//
// One std::thread per CUDA thread of a block, the blocks one after another, __syncthreads as a std::barrier
// shared by the block's threads. threadIdx / blockIdx are thread-local, blockDim / gridDim global. Dynamic
// shared memory is the namespace-scope array a kernel's `extern __shared__` declaration names: the test defines
// it (blocks run one at a time, so one array serves them all); static __shared__ arrays become function
// statics. What this cannot check: warp-level behaviour
// (shuffles, tensor cores: the kernels' sm_80 paths are compiled out here), timing, and the memory model beyond
// the barrier's ordering.
//
// Include this before any kernel header.
#pragma once

#include <cuda_runtime_api.h>  // dim3, uint3, and the host definitions of __device__ and friends
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <barrier>
#include <cmath>
#include <cstdint>
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

inline void __syncthreads() { xo_emulated_block_barrier->arrive_and_wait(); }

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

// Device math the kernels use that the host headers do not declare.
inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }

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
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            blockIdx = uint3{bx, by, bz};
            kernel(args...);
          });
        }
        for (auto& th : pool) th.join();
      }
    }
  }
  xo_emulated_block_barrier = nullptr;
}
