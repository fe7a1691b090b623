// The runtime behind simt.h: a pool of host threads that run the threads of a block concurrently, the
// block barrier, warp rendezvous, dynamic shared memory, faults and the launch-recording interface.
#include "simt.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace alast {
namespace emu {
namespace {

constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr dim3 kMaxBlock(1024, 1024, 64);
constexpr unsigned kMaxGridYZ = 65535;
// Dynamic shared memory a launch may ask for without cudaFuncSetAttribute (sm_80/sm_90).
constexpr size_t kMaxDynamicShared = 48 * 1024;
// Fresh shared memory holds whatever the previous block left: a kernel must not read before it writes.
constexpr unsigned char kGarbage = 0xA5;
constexpr size_t kWorkerStack = 256 * 1024;

// Unwinds an emulated thread once its launch has faulted.
struct Abort {};

// Sleep while `word` holds `seen` / wake every sleeper: the kernel's futex, without user-space spinning
// (with hundreds of threads on a few cores, spinning only steals time from the threads being waited for).
void wait_while(std::atomic<uint32_t>& word, uint32_t seen) {
  while (word.load() == seen) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
  }
}
void wake(std::atomic<uint32_t>& word, int count) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, count, nullptr, nullptr, 0);
}
void wake_all(std::atomic<uint32_t>& word) { wake(word, INT32_MAX); }

struct Warp {
  std::atomic<uint32_t> arrived{0};     // lanes waiting in the current warp operation
  std::atomic<uint32_t> mask{0};        // that operation's mask (0: none in progress)
  std::atomic<uint32_t> generation{0};  // warp operations completed
  std::atomic<uint32_t> exited{0};      // lanes that have left the kernel
  uint32_t lanes = 0;                   // lanes that exist (a partial last warp has fewer than 32)
  uint64_t values[2][32] = {};          // the values of operations with even / odd generation
};

struct LaunchState {
  std::string kernel;
  dim3 grid, block;
  unsigned threads = 0;
  ThreadBody body = nullptr;
  void* closure = nullptr;

  std::vector<unsigned char> shared_storage;
  unsigned char* shared = nullptr;  // 16-byte aligned
  size_t shared_bytes = 0;

  // This block's __syncthreads barrier and exits.
  std::atomic<unsigned> sync_arrived{0};
  std::atomic<uint32_t> sync_generation{0};
  std::atomic<unsigned> exited{0};
  std::vector<Warp> warps;

  // The emulator's own barrier between blocks (never faults).
  std::atomic<unsigned> end_arrived{0};
  std::atomic<uint32_t> end_generation{0};

  std::atomic<bool> aborted{false};
  std::mutex fault_mutex;
  cudaError_t status = cudaSuccess;
  std::string message;
};

struct ThreadContext {
  LaunchState* launch = nullptr;
  unsigned flat = 0;
  unsigned lane = 0;
  Warp* warp = nullptr;
};
thread_local ThreadContext ctx;

std::string vformat(const char* format, va_list args) {
  va_list copy;
  va_copy(copy, args);
  const int n = std::vsnprintf(nullptr, 0, format, copy);
  va_end(copy);
  std::string out(n > 0 ? size_t(n) : 0, '\0');
  if (n > 0) std::vsnprintf(out.data(), out.size() + 1, format, args);
  return out;
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::string out = vformat(fmt, args);
  va_end(args);
  return out;
}

// Wakes every thread of the launch that waits at a barrier or warp operation.
void wake_all(LaunchState& L) {
  L.sync_generation.fetch_add(1);
  wake_all(L.sync_generation);
  for (Warp& w : L.warps) {
    w.generation.fetch_add(1);
    wake_all(w.generation);
  }
}

// Keeps the first fault of a launch (with where it happened) and stops the launch.
void record_fault(cudaError_t status, const std::string& what) {
  LaunchState& L = *ctx.launch;
  {
    std::lock_guard<std::mutex> lock(L.fault_mutex);
    if (L.status == cudaSuccess) {
      L.status = status;
      L.message = format("CUDA emulation: kernel %s, block (%u, %u, %u), thread (%u, %u, %u): %s", L.kernel.c_str(),
                         blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z, what.c_str());
    }
  }
  if (!L.aborted.exchange(true)) wake_all(L);
}

void throw_if_aborted(const LaunchState& L) {
  if (L.aborted.load()) throw Abort{};
}

void fill_garbage(LaunchState& L) {
  if (L.shared_bytes) std::memset(L.shared, kGarbage, L.shared_bytes);
}

// Between blocks: every thread of the launch arrives; the last one resets the block state.
void end_block(LaunchState& L) {
  const uint32_t generation = L.end_generation.load();
  if (L.end_arrived.fetch_add(1) + 1 == L.threads) {
    L.end_arrived.store(0);
    L.sync_arrived.store(0);
    L.exited.store(0);
    for (Warp& w : L.warps) {
      w.arrived.store(0);
      w.mask.store(0);
      w.exited.store(0);
    }
    fill_garbage(L);
    L.end_generation.fetch_add(1);
    wake_all(L.end_generation);
    return;
  }
  wait_while(L.end_generation, generation);
}

// A thread leaves the kernel: that is a fault while other threads wait for it at a barrier.
void exit_kernel(LaunchState& L) {
  L.exited.fetch_add(1);
  if (L.aborted.load()) return;
  if (const unsigned waiting = L.sync_arrived.load()) {
    record_fault(cudaErrorLaunchFailure,
                 format("the thread exited while %u thread(s) of its block wait at __syncthreads(): every thread "
                        "of a block must reach each barrier",
                        waiting));
    return;
  }
  Warp& w = *ctx.warp;
  const uint32_t bit = 1u << ctx.lane;
  w.exited.fetch_or(bit);
  const uint32_t waiting = w.arrived.load();
  if (waiting && (w.mask.load() & bit)) {
    record_fault(cudaErrorLaunchFailure,
                 format("lane %u exited while lanes 0x%08x wait for it in a warp operation with mask 0x%08x",
                        ctx.lane, waiting, w.mask.load()));
  }
}

void run_thread(LaunchState& L, unsigned flat) {
  ctx.launch = &L;
  ctx.flat = flat;
  ctx.lane = flat % 32;
  ctx.warp = &L.warps[flat / 32];
  blockDim = L.block;
  gridDim = L.grid;
  threadIdx = dim3(flat % L.block.x, (flat / L.block.x) % L.block.y, flat / (L.block.x * L.block.y));
  for (unsigned z = 0; z < L.grid.z; ++z) {
    for (unsigned y = 0; y < L.grid.y; ++y) {
      for (unsigned x = 0; x < L.grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        try {
          L.body(L.closure);
        } catch (const Abort&) {
        } catch (const std::exception& e) {
          record_fault(cudaErrorLaunchFailure, format("a C++ exception escaped the kernel: %s", e.what()));
        }
        exit_kernel(L);
        end_block(L);
        if (L.aborted.load()) {
          ctx = ThreadContext{};
          return;
        }
      }
    }
  }
  ctx = ThreadContext{};
}

// Host threads that run the threads of one block at a time; grown on demand, never shrunk.
class Pool {
 public:
  void run(LaunchState& L) {
    grow(L.threads);
    job_ = &L;
    remaining_.store(L.threads);
    for (unsigned i = 0; i < L.threads; ++i) {
      workers_[i]->ticket.fetch_add(1);
      wake(workers_[i]->ticket, 1);
    }
    for (uint32_t left = remaining_.load(); left != 0; left = remaining_.load()) wait_while(remaining_, left);
  }

 private:
  struct Worker {
    Pool* pool;
    unsigned index;
    std::atomic<uint32_t> ticket{0};
  };

  static void* main(void* arg) {
    Worker& w = *static_cast<Worker*>(arg);
    uint32_t seen = 0;
    for (;;) {
      wait_while(w.ticket, seen);
      seen = w.ticket.load();
      run_thread(*w.pool->job_, w.index);
      if (w.pool->remaining_.fetch_sub(1) == 1) wake(w.pool->remaining_, 1);
    }
    return nullptr;
  }

  void grow(unsigned count) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, kWorkerStack);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    while (workers_.size() < count) {
      auto* w = new Worker{this, unsigned(workers_.size())};
      pthread_t thread;
      if (pthread_create(&thread, &attr, &Pool::main, w) != 0) {
        std::fprintf(stderr, "alast_kernels CUDA emulation: cannot start host thread %zu\n", workers_.size());
        std::abort();
      }
      workers_.push_back(w);
    }
    pthread_attr_destroy(&attr);
  }

  std::vector<Worker*> workers_;
  LaunchState* job_ = nullptr;
  std::atomic<uint32_t> remaining_{0};
};

// Leaked on purpose: worker threads may still be parked in it while the process exits. A forked child has
// none of the parent's threads, so it starts a pool of its own.
Pool* pool = new Pool();
std::mutex launch_mutex;  // one launch at a time: static __shared__ variables are one block's storage
std::once_flag fork_handler;

// Launch recording (for the static resource report): 0 off, 1 record and run, 2 record only.
std::atomic<int> recording{0};
std::mutex records_mutex;
std::string records;

thread_local cudaError_t last_status = cudaSuccess;
thread_local std::string last_message;

// "static const char* alast::emu::Launch<Kernel>::name() [with auto Kernel = ns::kernel<...>]" -> "ns::kernel<...>"
std::string kernel_name(const char* pretty) {
  std::string s(pretty);
  const std::string key = "Kernel = ";
  const size_t start = s.find(key);
  if (start == std::string::npos) return s;
  const size_t end = s.rfind(']');
  return s.substr(start + key.size(), end == std::string::npos ? std::string::npos : end - start - key.size());
}

cudaError_t invalid_launch(cudaError_t status, std::string message) {
  last_status = status;
  last_message = "CUDA emulation: " + message;
  return status;
}

}  // namespace

[[noreturn]] void fault(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  const std::string what = vformat(fmt, args);
  va_end(args);
  record_fault(cudaErrorLaunchFailure, what);
  throw Abort{};
}

[[noreturn]] void device_assert(const char* condition, const char* file, int line, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::string what = vformat(fmt, args);
  va_end(args);
  while (!what.empty() && what.back() == '\n') what.pop_back();
  record_fault(cudaErrorAssert, format("device-side assertion `%s` failed (%s:%d): %s", condition, file, line,
                                       what.c_str()));
  throw Abort{};
}

void syncthreads() {
  LaunchState& L = *ctx.launch;
  throw_if_aborted(L);
  const uint32_t generation = L.sync_generation.load();
  const unsigned arrived = L.sync_arrived.fetch_add(1) + 1;
  // Checked after arriving: an exiting thread checks the arrivals after counting itself out, so one of
  // the two always sees the other.
  if (const unsigned gone = L.exited.load()) {
    fault("__syncthreads() reached after %u thread(s) of the block exited: every thread of a block must reach "
          "each barrier",
          gone);
  }
  if (arrived == L.threads) {
    L.sync_arrived.store(0);
    L.sync_generation.fetch_add(1);
    wake_all(L.sync_generation);
    return;
  }
  wait_while(L.sync_generation, generation);
  throw_if_aborted(L);
}

const uint64_t* warp_exchange(const char* op, unsigned int mask, uint64_t value) {
  LaunchState& L = *ctx.launch;
  Warp& w = *ctx.warp;
  throw_if_aborted(L);
  const uint32_t bit = 1u << ctx.lane;
  if (!(mask & bit)) fault("%s: the calling lane %u is not in mask 0x%08x", op, ctx.lane, mask);
  if (mask & ~w.lanes) {
    fault("%s: mask 0x%08x names lanes that do not exist (this warp has lanes 0x%08x)", op, mask, w.lanes);
  }
  uint32_t current = 0;
  if (!w.mask.compare_exchange_strong(current, mask) && current != mask) {
    fault("%s: lanes disagree on the mask (0x%08x here, 0x%08x in a lane already waiting)", op, mask, current);
  }
  const uint32_t generation = w.generation.load();
  uint64_t* values = w.values[generation & 1];
  values[ctx.lane] = value;
  const uint32_t arrived = w.arrived.fetch_or(bit) | bit;
  if (const uint32_t gone = w.exited.load() & mask) {
    fault("%s: lanes 0x%08x of mask 0x%08x exited without reaching it", op, gone, mask);
  }
  if (arrived == mask) {
    w.arrived.store(0);
    w.mask.store(0);
    w.generation.fetch_add(1);
    wake_all(w.generation);
    return values;
  }
  wait_while(w.generation, generation);
  throw_if_aborted(L);
  return values;
}

unsigned int lane_id() { return ctx.lane; }

unsigned char* dynamic_shared_memory(size_t* bytes) {
  *bytes = ctx.launch->shared_bytes;
  return ctx.launch->shared;
}

[[noreturn]] void shared_index_fault(int64_t index, size_t size, size_t element_bytes) {
  fault("dynamic shared memory index %lld is outside [0, %zu) (%zu bytes of %zu-byte elements given at launch)",
        (long long)index, size, size * element_bytes, element_bytes);
}

cudaError_t launch(const char* pretty_name, dim3 grid, dim3 block, size_t shared_bytes, ThreadBody body,
                   void* closure) {
  const std::string name = kernel_name(pretty_name);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.x > kMaxBlock.x || block.y > kMaxBlock.y ||
      block.z > kMaxBlock.z) {
    return invalid_launch(cudaErrorInvalidConfiguration,
                          format("kernel %s: invalid block (%u, %u, %u): at most %u threads, (1024, 1024, 64)",
                                 name.c_str(), block.x, block.y, block.z, kMaxThreadsPerBlock));
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7FFFFFFFu || grid.y > kMaxGridYZ ||
      grid.z > kMaxGridYZ) {
    return invalid_launch(cudaErrorInvalidConfiguration,
                          format("kernel %s: invalid grid (%u, %u, %u)", name.c_str(), grid.x, grid.y, grid.z));
  }
  if (shared_bytes > kMaxDynamicShared) {
    return invalid_launch(cudaErrorInvalidValue,
                          format("kernel %s: %zu bytes of dynamic shared memory exceed the %zu a launch may ask "
                                 "for without cudaFuncSetAttribute",
                                 name.c_str(), shared_bytes, kMaxDynamicShared));
  }
  const int mode = recording.load();
  if (mode != 0) {
    std::lock_guard<std::mutex> lock(records_mutex);
    records += format("%s\t%u,%u,%u\t%u,%u,%u\t%zu\n", name.c_str(), grid.x, grid.y, grid.z, block.x, block.y,
                      block.z, shared_bytes);
  }
  if (mode == 2) return last_status = cudaSuccess;

  std::lock_guard<std::mutex> lock(launch_mutex);
  std::call_once(fork_handler, [] { pthread_atfork(nullptr, nullptr, [] { pool = new Pool(); }); });
  LaunchState L;
  L.kernel = name;
  L.grid = grid;
  L.block = block;
  L.threads = unsigned(threads);
  L.body = body;
  L.closure = closure;
  L.shared_storage.resize(shared_bytes + 16);
  const uintptr_t base = reinterpret_cast<uintptr_t>(L.shared_storage.data());
  L.shared = L.shared_storage.data() + ((16 - base % 16) % 16);
  L.shared_bytes = shared_bytes;
  fill_garbage(L);
  L.warps = std::vector<Warp>((L.threads + 31) / 32);
  for (size_t w = 0; w < L.warps.size(); ++w) {
    const unsigned lanes = std::min(32u, L.threads - unsigned(w) * 32);
    L.warps[w].lanes = lanes == 32 ? 0xFFFFFFFFu : ((1u << lanes) - 1u);
  }
  pool->run(L);
  last_status = L.status;
  last_message = L.message;
  return L.status;
}

}  // namespace emu
}  // namespace alast

cudaError_t cudaGetLastError() {
  const cudaError_t status = alast::emu::last_status;
  alast::emu::last_status = cudaSuccess;
  return status;
}

const char* cudaGetErrorString(cudaError_t status) {
  if (status != cudaSuccess && !alast::emu::last_message.empty()) return alast::emu::last_message.c_str();
  switch (status) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorAssert: return "device-side assert triggered";
    default: return "unspecified launch failure";
  }
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------------ bounds checks
// The kernels are compiled with -fsanitize=bounds: an index outside a static array (a __shared__ array
// included) calls this handler, which reports it as a fault of the launch. The access itself has happened
// by then (as it would on a GPU); the launch stops at the thread's next barrier or warp operation.
namespace {
struct SourceLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct TypeDescriptor {
  uint16_t kind;
  uint16_t info;  // integers: log2(bit width) << 1 | signed
  char name[1];
};
struct OutOfBoundsData {
  SourceLocation location;
  const TypeDescriptor* array_type;
  const TypeDescriptor* index_type;
};

long long index_value(const TypeDescriptor* type, uintptr_t handle) {
  const unsigned bits = 1u << (type->info >> 1);
  if (!(type->info & 1) || bits >= 64) return (long long)handle;
  const unsigned extra = 64 - bits;
  return (long long)(int64_t(uint64_t(handle) << extra) >> extra);
}
}  // namespace

extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_out_of_bounds(OutOfBoundsData* data,
                                                                                   uintptr_t index) {
  const std::string what = alast::emu::format(
      "index %lld out of bounds for type %s (%s:%u:%u)", index_value(data->index_type, index),
      data->array_type->name, data->location.file, data->location.line, data->location.column);
  if (alast::emu::ctx.launch != nullptr) {
    alast::emu::record_fault(cudaErrorIllegalAddress, what);
  } else {
    std::fprintf(stderr, "alast_kernels CUDA emulation: %s\n", what.c_str());
  }
}

extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_out_of_bounds_abort(OutOfBoundsData* data,
                                                                                         uintptr_t index) {
  __ubsan_handle_out_of_bounds(data, index);
  std::abort();
}

// ------------------------------------------------------------------------------------------ control (ctypes)
// Launch recording for the resource report and the tests: mode 0 off, 1 record and run, 2 record only
// (launches return at once; outputs are left unwritten). Returns the previous mode.
extern "C" __attribute__((visibility("default"))) int alast_emulation_record(int mode) {
  return alast::emu::recording.exchange(mode);
}

// The launches recorded since the last call, one per line: kernel, grid x,y,z, block x,y,z, dynamic
// shared bytes, tab-separated. The pointer stays valid until the next call.
extern "C" __attribute__((visibility("default"))) const char* alast_emulation_take_launches() {
  static thread_local std::string taken;
  std::lock_guard<std::mutex> lock(alast::emu::records_mutex);
  taken.swap(alast::emu::records);
  alast::emu::records.clear();
  return taken.c_str();
}
