// The opt-in to more than 48 KB of dynamic shared memory per block, per kernel and device. No torch headers.
#pragma once

#include <cuda_runtime.h>

namespace xception_ops {

// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device (cudaSuccess at once up to the
// default 48 KB). cudaFuncAttributeMaxDynamicSharedMemorySize belongs to the kernel in one device's context: a
// process that launches a kernel on two GPUs must opt in on each (set once, for the first device only, a launch on
// the second fails with cudaErrorInvalidValue). It is also one value per kernel: set before every launch to that
// launch's size, a smaller launch on another thread could lower it between a larger launch's set and its launch.
// So the limit kept per (kernel, device) only rises, set under a lock when a launch needs more.
cudaError_t opt_in_shared_memory(const void* kernel, int bytes);

template <typename Kernel>
cudaError_t opt_in_shared_memory(Kernel* kernel, int bytes) {
  return opt_in_shared_memory(reinterpret_cast<const void*>(kernel), bytes);
}

}  // namespace xception_ops
