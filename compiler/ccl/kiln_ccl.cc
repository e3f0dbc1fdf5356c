// kiln's collective communication for tensor-parallel artifacts.
//
// One rank per process (disco's process session: worker 0 is a thread of the
// controller, workers 1..N-1 are processes). The compiled graph calls
//   kiln.ccl.allreduce(send, recv)   sum over ranks, recv = sum of every rank's send
//   kiln.ccl.allgather(send, recv)   recv [N, *send.shape] = every rank's send, rank-major
// as destination-passing packed functions. Two backends behind them:
//   nccl  CUDA tensors, on the stream TVM launches kernels on (TVMFFIEnvGetStream, so a
//         CUDA-graph capture records the collectives too); libnccl is opened at init
//         from a path the Python side found, never linked, so the artifact loads on a
//         machine without NCCL until a tensor-parallel session starts.
//   shm   CPU tensors, through one POSIX shared-memory file (a slot per rank and a
//         barrier): the sum runs in rank order on every rank, so every rank holds the
//         same bits. For CPU artifacts and the tests that check TP2 against TP1.
// Built by compiler/ccl.py with g++ against tvm-ffi's headers only (its stable C ABI):
// nothing here depends on TVM's C++ classes.

#include <dlfcn.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>

namespace {

using tvm::ffi::String;
using tvm::ffi::TensorView;

// --- NCCL, declared here (its C ABI is stable since 2.x) and opened with dlopen ----------
struct NcclUniqueId {
  char internal[128];
};
using ncclComm_t = void*;
using cudaStream_t = void*;
enum { kNcclSum = 0 };
enum { kNcclInt32 = 2, kNcclFloat16 = 6, kNcclFloat32 = 7, kNcclFloat64 = 8, kNcclBfloat16 = 9 };

struct Nccl {
  void* lib = nullptr;
  int (*GetUniqueId)(NcclUniqueId*) = nullptr;
  int (*CommInitRank)(ncclComm_t*, int, NcclUniqueId, int) = nullptr;
  int (*AllReduce)(const void*, void*, size_t, int, int, ncclComm_t, cudaStream_t) = nullptr;
  int (*AllGather)(const void*, void*, size_t, int, ncclComm_t, cudaStream_t) = nullptr;
  int (*CommDestroy)(ncclComm_t) = nullptr;
  int (*CommAbort)(ncclComm_t) = nullptr;
  const char* (*GetErrorString)(int) = nullptr;
  int (*GetVersion)(int*) = nullptr;

  void Open(const std::string& path) {
    if (lib != nullptr) return;
    lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      TVM_FFI_THROW(RuntimeError) << "cannot open NCCL at " << path << ": " << dlerror();
    }
    Sym(&GetUniqueId, "ncclGetUniqueId");
    Sym(&CommInitRank, "ncclCommInitRank");
    Sym(&AllReduce, "ncclAllReduce");
    Sym(&AllGather, "ncclAllGather");
    Sym(&CommDestroy, "ncclCommDestroy");
    Sym(&CommAbort, "ncclCommAbort");
    Sym(&GetErrorString, "ncclGetErrorString");
    Sym(&GetVersion, "ncclGetVersion");
  }
  template <typename F>
  void Sym(F* f, const char* name) {
    *f = reinterpret_cast<F>(dlsym(lib, name));
    if (*f == nullptr) TVM_FFI_THROW(RuntimeError) << "NCCL library has no " << name;
  }
  void Check(int rc, const char* what) const {
    if (rc != 0) TVM_FFI_THROW(RuntimeError) << what << " failed: " << GetErrorString(rc) << " (NCCL error " << rc << ")";
  }
};

int (*CudaSetDevice)(int) = nullptr;

void SetCudaDevice(int device) {
  if (CudaSetDevice == nullptr) {
    // the CUDA runtime TVM's CUDA library already loaded (same current-device state)
    for (const char* name : {"libcudart.so.13", "libcudart.so.12", "libcudart.so"}) {
      void* h = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
      if (h != nullptr) {
        CudaSetDevice = reinterpret_cast<int (*)(int)>(dlsym(h, "cudaSetDevice"));
        if (CudaSetDevice != nullptr) break;
      }
    }
    if (CudaSetDevice == nullptr) TVM_FFI_THROW(RuntimeError) << "the CUDA runtime is not loaded (load the CUDA artifact before the CCL)";
  }
  int rc = CudaSetDevice(device);
  if (rc != 0) TVM_FFI_THROW(RuntimeError) << "cudaSetDevice(" << device << ") failed with CUDA error " << rc;
}

int NcclType(DLDataType t) {
  if (t.lanes != 1) TVM_FFI_THROW(ValueError) << "kiln.ccl: vector dtypes are not supported";
  if (t.code == kDLFloat && t.bits == 32) return kNcclFloat32;
  if (t.code == kDLFloat && t.bits == 16) return kNcclFloat16;
  if (t.code == kDLBfloat && t.bits == 16) return kNcclBfloat16;
  if (t.code == kDLFloat && t.bits == 64) return kNcclFloat64;
  if (t.code == kDLInt && t.bits == 32) return kNcclInt32;
  TVM_FFI_THROW(ValueError) << "kiln.ccl: dtype code " << int(t.code) << " bits " << int(t.bits) << " is not supported";
  return 0;
}

// --- shared memory (CPU) ---------------------------------------------------------------
struct alignas(64) ShmHeader {
  std::atomic<uint32_t> arrived;
  std::atomic<uint32_t> generation;
  uint32_t world;
  std::atomic<uint32_t> aborted;  // set by kiln.ccl.abort in any process: every waiting rank gives up
  uint64_t slot_bytes;
};

// --- the process's one rank ---------------------------------------------------------------
struct Context {
  std::string backend;  // "" (not initialised) | "nccl" | "shm"
  int rank = 0, world = 1, device = 0;
  double timeout_s = 300.0;
  // nccl
  Nccl nccl;
  ncclComm_t comm = nullptr;
  // shm
  char* base = nullptr;
  size_t mapped = 0;
  ShmHeader* hdr = nullptr;
  uint64_t slot_bytes = 0;

  char* Slot(int r) const { return base + sizeof(ShmHeader) + static_cast<size_t>(r) * slot_bytes; }

  void Barrier() const {
    uint32_t gen = hdr->generation.load(std::memory_order_acquire);
    if (hdr->arrived.fetch_add(1, std::memory_order_acq_rel) == static_cast<uint32_t>(world) - 1) {
      hdr->arrived.store(0, std::memory_order_relaxed);
      hdr->generation.fetch_add(1, std::memory_order_release);
      return;
    }
    // spin briefly (the other ranks usually arrive within microseconds), then yield the core:
    // on an oversubscribed CPU a sleeping rank would add its wake-up latency to every collective
    auto start = std::chrono::steady_clock::now();
    for (uint64_t spin = 0; hdr->generation.load(std::memory_order_acquire) == gen; ++spin) {
      if (hdr->aborted.load(std::memory_order_relaxed)) {
        TVM_FFI_THROW(RuntimeError) << "kiln.ccl: the collective was aborted (another worker failed)";
      }
      if (spin < 4096) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        asm volatile("yield");
#endif
        continue;
      }
      sched_yield();
      if ((spin & 4095) == 0 &&
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > timeout_s) {
        TVM_FFI_THROW(RuntimeError) << "kiln.ccl: rank " << rank << " waited " << timeout_s
                                    << " s for the other ranks at a collective (a worker died or hung)";
      }
    }
  }
};

Context& Ctx() {
  static Context ctx;
  return ctx;
}

void RequireInit() {
  if (Ctx().backend.empty()) TVM_FFI_THROW(RuntimeError) << "kiln.ccl: collective called before kiln.ccl.init";
}

char* DataOf(const TensorView& t) { return static_cast<char*>(t.data_ptr()) + t.byte_offset(); }

size_t BytesOf(const TensorView& t) {
  DLDataType d = t.dtype();
  return static_cast<size_t>(t.numel()) * ((d.bits * d.lanes + 7) / 8);
}

void ShmOpen(const std::string& path, uint64_t slot_bytes) {
  Context& c = Ctx();
  int fd = open(path.c_str(), O_RDWR);
  if (fd < 0) TVM_FFI_THROW(RuntimeError) << "kiln.ccl: cannot open the shared-memory file " << path << ": " << strerror(errno);
  size_t want = sizeof(ShmHeader) + static_cast<size_t>(c.world) * slot_bytes;
  struct stat st;
  if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) != want) {
    close(fd);
    TVM_FFI_THROW(RuntimeError) << "kiln.ccl: " << path << " is not " << want << " bytes";
  }
  void* p = mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) TVM_FFI_THROW(RuntimeError) << "kiln.ccl: mmap of " << path << " failed: " << strerror(errno);
  c.base = static_cast<char*>(p);
  c.mapped = want;
  c.hdr = reinterpret_cast<ShmHeader*>(p);
  c.slot_bytes = slot_bytes;
}

template <typename T>
void SumSlots(const Context& c, char* out, size_t offset, size_t n) {
  T* dst = reinterpret_cast<T*>(out + offset);
  const T* s0 = reinterpret_cast<const T*>(c.Slot(0));
  for (size_t i = 0; i < n; ++i) dst[i] = s0[i];
  for (int r = 1; r < c.world; ++r) {  // rank order on every rank: the same bits everywhere
    const T* sr = reinterpret_cast<const T*>(c.Slot(r));
    for (size_t i = 0; i < n; ++i) dst[i] += sr[i];
  }
}

void ShmAllReduce(const TensorView& send, const TensorView& recv) {
  const Context& c = Ctx();
  DLDataType d = send.dtype();
  bool f32 = d.code == kDLFloat && d.bits == 32 && d.lanes == 1;
  bool f64 = d.code == kDLFloat && d.bits == 64 && d.lanes == 1;
  if (!f32 && !f64) TVM_FFI_THROW(ValueError) << "kiln.ccl shm: allreduce takes float32/float64 CPU tensors";
  size_t bytes = BytesOf(send), elem = d.bits / 8;
  const char* src = DataOf(send);
  char* dst = DataOf(recv);
  size_t chunk = c.slot_bytes / elem * elem;
  for (size_t off = 0; off < bytes; off += chunk) {
    size_t len = std::min(chunk, bytes - off);
    std::memcpy(c.Slot(c.rank), src + off, len);
    c.Barrier();
    if (f32) SumSlots<float>(c, dst, off, len / elem);
    else SumSlots<double>(c, dst, off, len / elem);
    c.Barrier();  // nobody refills a slot before every rank has read it
  }
}

void ShmAllGather(const TensorView& send, const TensorView& recv) {
  const Context& c = Ctx();
  size_t bytes = BytesOf(send);
  const char* src = DataOf(send);
  char* dst = DataOf(recv);
  for (size_t off = 0; off < bytes; off += c.slot_bytes) {
    size_t len = std::min<size_t>(c.slot_bytes, bytes - off);
    std::memcpy(c.Slot(c.rank), src + off, len);
    c.Barrier();
    for (int r = 0; r < c.world; ++r) std::memcpy(dst + r * bytes + off, c.Slot(r), len);
    c.Barrier();
  }
}

void CheckPair(const TensorView& send, const TensorView& recv, size_t factor, const char* what) {
  DLDataType a = send.dtype(), b = recv.dtype();
  if (a.code != b.code || a.bits != b.bits || a.lanes != b.lanes) TVM_FFI_THROW(ValueError) << "kiln.ccl." << what << ": send and recv dtypes differ";
  if (BytesOf(recv) != BytesOf(send) * factor) {
    TVM_FFI_THROW(ValueError) << "kiln.ccl." << what << ": recv holds " << BytesOf(recv) << " bytes, expected " << BytesOf(send) * factor;
  }
  const Context& c = Ctx();
  int want = c.backend == "nccl" ? kDLCUDA : kDLCPU;
  if (send.device().device_type != want || recv.device().device_type != want) {
    TVM_FFI_THROW(ValueError) << "kiln.ccl." << what << ": the " << c.backend << " backend takes "
                              << (want == kDLCUDA ? "CUDA" : "CPU") << " tensors";
  }
}

cudaStream_t Stream() { return static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, Ctx().device)); }

void AllReduce(TensorView send, TensorView recv) {
  RequireInit();
  CheckPair(send, recv, 1, "allreduce");
  Context& c = Ctx();
  if (c.world == 1) {
    if (DataOf(send) != DataOf(recv)) TVM_FFI_THROW(RuntimeError) << "kiln.ccl: world of 1 is served without a collective";
    return;
  }
  if (c.backend == "shm") return ShmAllReduce(send, recv);
  c.nccl.Check(c.nccl.AllReduce(DataOf(send), DataOf(recv), send.numel(), NcclType(send.dtype()), kNcclSum, c.comm, Stream()),
               "ncclAllReduce");
}

void AllGather(TensorView send, TensorView recv) {
  RequireInit();
  Context& c = Ctx();
  CheckPair(send, recv, c.world, "allgather");
  if (c.backend == "shm") return ShmAllGather(send, recv);
  c.nccl.Check(c.nccl.AllGather(DataOf(send), DataOf(recv), send.numel(), NcclType(send.dtype()), c.comm, Stream()),
               "ncclAllGather");
}

std::string Hex(const char* p, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = digits[(static_cast<unsigned char>(p[i]) >> 4) & 15];
    out[2 * i + 1] = digits[static_cast<unsigned char>(p[i]) & 15];
  }
  return out;
}

void Unhex(const std::string& s, char* out, size_t n) {
  if (s.size() != 2 * n) TVM_FFI_THROW(ValueError) << "kiln.ccl: the NCCL id must be " << 2 * n << " hex digits";
  auto v = [](char ch) -> int {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    TVM_FFI_THROW(ValueError) << "kiln.ccl: bad hex digit in the NCCL id";
    return 0;
  };
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<char>(v(s[2 * i]) * 16 + v(s[2 * i + 1]));
}

// backend "nccl": key = the unique id (hex), lib = libnccl path; "shm": key = the file path
void Init(String backend, int64_t rank, int64_t world, int64_t device, String key, String lib, int64_t slot_bytes, double timeout_s) {
  Context& c = Ctx();
  if (!c.backend.empty()) TVM_FFI_THROW(RuntimeError) << "kiln.ccl: this process already holds rank " << c.rank;
  if (world < 1 || rank < 0 || rank >= world) TVM_FFI_THROW(ValueError) << "kiln.ccl: rank " << rank << " of " << world;
  c.rank = static_cast<int>(rank);
  c.world = static_cast<int>(world);
  c.device = static_cast<int>(device);
  c.timeout_s = timeout_s;
  std::string b(backend);
  if (b == "shm") {
    if (slot_bytes < 64) TVM_FFI_THROW(ValueError) << "kiln.ccl: slot of " << slot_bytes << " bytes";
    ShmOpen(std::string(key), static_cast<uint64_t>(slot_bytes));
    c.backend = b;
    c.Barrier();  // every rank mapped the file: the controller may unlink it now
  } else if (b == "nccl") {
    c.nccl.Open(std::string(lib));
    SetCudaDevice(c.device);
    NcclUniqueId id;
    Unhex(std::string(key), id.internal, sizeof(id.internal));
    c.nccl.Check(c.nccl.CommInitRank(&c.comm, c.world, id, c.rank), "ncclCommInitRank");
    c.backend = b;
  } else {
    TVM_FFI_THROW(ValueError) << "kiln.ccl: unknown backend " << b << " (nccl, shm)";
  }
}

String NcclUniqueIdHex(String lib) {
  Context& c = Ctx();
  c.nccl.Open(std::string(lib));
  NcclUniqueId id;
  c.nccl.Check(c.nccl.GetUniqueId(&id), "ncclGetUniqueId");
  return String(Hex(id.internal, sizeof(id.internal)));
}

int64_t NcclVersion(String lib) {
  Context& c = Ctx();
  c.nccl.Open(std::string(lib));
  int v = 0;
  c.nccl.Check(c.nccl.GetVersion(&v), "ncclGetVersion");
  return v;
}

// From any thread of any rank's process, while others may be waiting in a collective: the
// controller's watchdog calls it when a worker dies, so the survivors fail instead of hanging.
void Abort() {
  Context& c = Ctx();
  if (c.backend == "shm" && c.hdr != nullptr) c.hdr->aborted.store(1, std::memory_order_relaxed);
  if (c.backend == "nccl" && c.comm != nullptr) {
    c.nccl.CommAbort(c.comm);  // NCCL's kernels waiting on a dead peer see the abort flag and return
    c.comm = nullptr;
  }
}

void Shutdown(bool abort) {
  Context& c = Ctx();
  if (c.backend == "nccl" && c.comm != nullptr) {
    // At a normal close the communicator is dropped, not torn down: ncclCommDestroy (which
    // finalizes with the peers) and then ncclCommAbort were both seen to block at session close
    // (NCCL 2.28, two H200s, sessions 12 and 14); the worker processes exit right after and the
    // driver frees their side, the controller's stays until its process exits. `abort` (a peer
    // died) still aborts, so survivors waiting in a collective return.
    if (abort) c.nccl.CommAbort(c.comm);
    c.comm = nullptr;
  }
  if (c.base != nullptr) {
    munmap(c.base, c.mapped);
    c.base = nullptr;
    c.hdr = nullptr;
  }
  c.backend.clear();
}

}  // namespace

// Registered with override: another artifact's copy of this library (another path, its own
// Context) may be loaded later in the same process; the Relax VM binds the functions it
// calls when it loads, so each session keeps the copy it was loaded with.
TVM_FFI_STATIC_INIT_BLOCK() {
  using tvm::ffi::Function;
  auto def = [](const char* name, Function f) { Function::SetGlobal(name, f, /*override=*/true); };
  def("kiln.ccl.init", Function::FromTyped(Init));
  def("kiln.ccl.allreduce", Function::FromTyped(AllReduce));
  def("kiln.ccl.allgather", Function::FromTyped(AllGather));
  def("kiln.ccl.nccl_unique_id", Function::FromTyped(NcclUniqueIdHex));
  def("kiln.ccl.nccl_version", Function::FromTyped(NcclVersion));
  def("kiln.ccl.rank", Function::FromTyped([]() -> int64_t { return Ctx().backend.empty() ? -1 : Ctx().rank; }));
  def("kiln.ccl.shutdown", Function::FromTyped(Shutdown));
  def("kiln.ccl.abort", Function::FromTyped(Abort));
}
