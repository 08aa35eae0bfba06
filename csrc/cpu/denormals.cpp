// The flush mode on every intra-op thread (denormals.h): one OpenMP parallel region of torch's team
// size, in which each thread sets its own control register. libgomp keeps its team's threads for
// the next region of the same size, which is what at::parallel_for (OpenMP backend) runs on.
#include "denormals.h"

#include <ATen/Parallel.h>
#include <omp.h>

namespace sparsevd {
namespace cpu {

bool set_flush_denormal_threads(bool on) {
  const bool previous = denormals_flushed();
  auto apply = [on] {
    const uint64_t m = fp_mode();
    set_fp_mode(on ? (m | kFlushBits) : (m & ~kFlushBits));
  };
  const int threads = at::get_num_threads();
  if (threads > 1 && !at::in_parallel_region()) {
#pragma omp parallel num_threads(threads)
    apply();
  } else {
    apply();
  }
  return previous;
}

std::vector<bool> denormals_flushed_threads() {
  const int threads = at::get_num_threads();
  std::vector<char> flags(static_cast<size_t>(threads), 0);
  if (threads > 1 && !at::in_parallel_region()) {
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num();
      if (t < threads) flags[static_cast<size_t>(t)] = denormals_flushed() ? 1 : 0;
    }
  } else {
    flags[0] = denormals_flushed() ? 1 : 0;
  }
  return std::vector<bool>(flags.begin(), flags.end());
}

}  // namespace cpu
}  // namespace sparsevd
