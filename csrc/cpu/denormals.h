// Flush-to-zero for the library's own loops (issue 23, item 8). Subnormal floats (|x| < 2^-126 in
// fp32) cost ~100 cycles per operation on x86 instead of ~1: under train-time clipping the clipped
// weights' zero gradients let Adam's moments decay through the subnormal range, which made whole
// epochs 2-3x slower (benchmarks/NOTES.md, "Subnormal floats"). Every CPU kernel entry point of
// sparsevd._C and every parallel task it starts runs under FlushDenormals: FTZ (results that would
// be subnormal are 0) and DAZ (subnormal inputs read as 0), restored when the guard leaves scope,
// so the caller's floating-point mode is never changed. MXCSR (x86) and FPCR (AArch64: FZ, which
// covers both) are per thread: a guard on the calling thread does not reach OpenMP's workers, hence
// one guard per task (flushing_task) rather than one per op.
//
// set_flush_denormal_threads(on) sets or clears the mode on every intra-op thread (the calling
// thread and torch's OpenMP team) for code the library does not own (torch's fused Adam:
// sparsevd.optim.Adam); denormals_flushed_threads() reads it back (tests). Other CPUs: no-ops.
#pragma once

#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#define SPARSEVD_DENORMALS_X86 1
#elif defined(__aarch64__)
#define SPARSEVD_DENORMALS_ARM64 1
#endif

namespace sparsevd {
namespace cpu {

#if defined(SPARSEVD_DENORMALS_X86)
constexpr uint64_t kFlushBits = 0x8040;  // MXCSR FTZ (bit 15) | DAZ (bit 6)
inline uint64_t fp_mode() { return _mm_getcsr(); }
inline void set_fp_mode(uint64_t m) { _mm_setcsr(static_cast<unsigned int>(m)); }
#elif defined(SPARSEVD_DENORMALS_ARM64)
constexpr uint64_t kFlushBits = uint64_t{1} << 24;  // FPCR FZ
inline uint64_t fp_mode() {
  uint64_t m;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(m));
  return m;
}
inline void set_fp_mode(uint64_t m) { __asm__ __volatile__("msr fpcr, %0" : : "r"(m)); }
#else
constexpr uint64_t kFlushBits = 0;
inline uint64_t fp_mode() { return 0; }
inline void set_fp_mode(uint64_t) {}
#endif

// True when subnormals are flushed on this thread (always false where the CPU has no such mode).
inline bool denormals_flushed() { return kFlushBits != 0 && (fp_mode() & kFlushBits) == kFlushBits; }

// RAII: flush subnormals on this thread while in scope, then restore the previous mode (writes the
// control register only when it changes: nested guards and a caller that flushes already cost one read).
class FlushDenormals {
 public:
  FlushDenormals() : saved_(fp_mode()) {
    if ((saved_ & kFlushBits) != kFlushBits) set_fp_mode(saved_ | kFlushBits);
  }
  ~FlushDenormals() {
    if ((saved_ & kFlushBits) != kFlushBits) set_fp_mode(saved_);
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  uint64_t saved_;
};

// fn wrapped for at::parallel_for: each task runs under its own guard (its worker thread's mode).
template <typename Fn>
auto flushing_task(const Fn& fn) {
  return [&fn](int64_t begin, int64_t end) {
    FlushDenormals guard;
    fn(begin, end);
  };
}

// Sets (on = true) or clears the flush mode on the calling thread and every thread of torch's
// OpenMP team (at::get_num_threads() threads); returns whether the calling thread flushed before.
bool set_flush_denormal_threads(bool on);
// The flush mode of the calling thread (element 0) and of each other thread of the team.
std::vector<bool> denormals_flushed_threads();

}  // namespace cpu
}  // namespace sparsevd
