// opt_in_shared_memory (cuda/shared_memory_opt_in.h). No torch headers.
#include "cuda/shared_memory_opt_in.h"

#include <map>
#include <mutex>
#include <utility>

namespace xception_ops {

cudaError_t opt_in_shared_memory(const void* kernel, int bytes) {
  constexpr int kDefaultLimit = 48 * 1024;  // what every kernel may use without the opt-in
  if (bytes <= kDefaultLimit) return cudaSuccess;
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> limits;  // (kernel, device) -> the limit set
  const std::lock_guard<std::mutex> lock(mutex);
  int& limit = limits[{kernel, device}];
  if (bytes <= limit) return cudaSuccess;
  const cudaError_t set = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (set == cudaSuccess) limit = bytes;
  return set;
}

}  // namespace xception_ops
