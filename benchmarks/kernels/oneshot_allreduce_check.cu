// STATUS: compiles (nvcc 13, sm_90); NOT YET RUN -- its first run is pending on nvidia-h200-x2
// (benchmarks/NOTES.md). Nothing in kiln uses it yet.
//
// One-shot all-reduce over NVLink peer memory: the kernel kiln_ccl would run instead of
// NCCL for a decode step's small all-reduces. Standalone harness (all GPUs in one process,
// peer access enabled; the plugin would get the peer pointers through CUDA IPC instead).
//
//   nvcc -O3 -arch=sm_90 -std=c++17 oneshot_allreduce_check.cu -o oneshot && ./oneshot
//
// Per call and block b: copy my slice of `in` into my buffer of this call's parity, signal
// every peer (a release store into the peer's flag for (me, b)), wait for every peer's flag
// (acquire loads of my own flags), sum the peers' buffers in rank order in fp32, round once.
// Flags hold the call's epoch (a per-block device counter: CUDA-graph replays advance it);
// two buffers by epoch parity: a rank can be at most one call ahead of a peer still reading.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                      \
  do {                                                                             \
    cudaError_t e = (x);                                                           \
    if (e != cudaSuccess) {                                                        \
      printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e));     \
      exit(1);                                                                     \
    }                                                                              \
  } while (0)

constexpr int kMaxRanks = 8;
constexpr int kBlocks = 32;
constexpr int kThreads = 512;

struct Peers {
  __nv_bfloat16* buf[kMaxRanks];  // each rank's buffer: [2 parities][max elements]
  uint32_t* flags[kMaxRanks];      // each rank's flags: [2 parities][ranks][blocks]
};

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

template <int N>
__global__ void __launch_bounds__(kThreads) oneshot_allreduce(const __nv_bfloat16* __restrict__ in,
                                                              __nv_bfloat16* __restrict__ out, int n, int max_n,
                                                              Peers p, uint32_t* epochs, int rank) {
  __shared__ uint32_t s_epoch;
  const int b = blockIdx.x;
  if (threadIdx.x == 0) s_epoch = epochs[b] + 1;
  __syncthreads();
  const uint32_t epoch = s_epoch;
  const int parity = epoch & 1;
  // this block's slice, in 8-element (16-byte) vectors
  const int vec = n / 8;
  const int per = (vec + gridDim.x - 1) / gridDim.x;
  const int v0 = b * per, v1 = min(vec, v0 + per);
  const uint4* src = reinterpret_cast<const uint4*>(in);
  uint4* mine = reinterpret_cast<uint4*>(p.buf[rank] + parity * max_n);
  for (int v = v0 + threadIdx.x; v < v1; v += blockDim.x) mine[v] = src[v];
  __syncthreads();
  if (threadIdx.x < N) {  // tell peer t that my slice b is in place
    uint32_t* f = p.flags[threadIdx.x] + (parity * kMaxRanks + rank) * kBlocks + b;
    st_release_sys(f, epoch);
  }
  if (threadIdx.x < N) {  // wait for peer t's slice b
    const uint32_t* f = p.flags[rank] + (parity * kMaxRanks + threadIdx.x) * kBlocks + b;
    while (ld_acquire_sys(f) != epoch) {
    }
  }
  __syncthreads();
  uint4* dst = reinterpret_cast<uint4*>(out);
  for (int v = v0 + threadIdx.x; v < v1; v += blockDim.x) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
    for (int q = 0; q < N; ++q) {  // rank order on every rank: the same bits everywhere
      uint4 w = reinterpret_cast<const uint4*>(p.buf[q] + parity * max_n)[v];
      const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&w);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] += __bfloat162float(h[j]);
    }
    uint4 r;
    __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(&r);
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = __float2bfloat16(acc[j]);
    dst[v] = r;
  }
  if (threadIdx.x == 0) epochs[b] = epoch;
}

int main() {
  int ranks = 0;
  CK(cudaGetDeviceCount(&ranks));
  if (ranks < 2) {
    printf("needs 2+ GPUs (found %d)\n", ranks);
    return 1;
  }
  ranks = ranks > kMaxRanks ? kMaxRanks : ranks;
  const int max_n = 1 << 19;  // 1 MiB of bf16
  Peers p{};
  std::vector<__nv_bfloat16*> in(ranks), out(ranks);
  std::vector<uint32_t*> epochs(ranks);
  std::vector<cudaStream_t> st(ranks);
  for (int r = 0; r < ranks; ++r) {
    CK(cudaSetDevice(r));
    for (int q = 0; q < ranks; ++q)
      if (q != r) {
        int ok = 0;
        CK(cudaDeviceCanAccessPeer(&ok, r, q));
        if (!ok) {
          printf("no peer access %d -> %d\n", r, q);
          return 1;
        }
        CK(cudaDeviceEnablePeerAccess(q, 0));
      }
    CK(cudaMalloc(&p.buf[r], 2 * max_n * sizeof(__nv_bfloat16)));
    CK(cudaMalloc(&p.flags[r], 2 * kMaxRanks * kBlocks * sizeof(uint32_t)));
    CK(cudaMemset(p.flags[r], 0, 2 * kMaxRanks * kBlocks * sizeof(uint32_t)));
    CK(cudaMalloc(&in[r], max_n * sizeof(__nv_bfloat16)));
    CK(cudaMalloc(&out[r], max_n * sizeof(__nv_bfloat16)));
    CK(cudaMalloc(&epochs[r], kBlocks * sizeof(uint32_t)));
    CK(cudaMemset(epochs[r], 0, kBlocks * sizeof(uint32_t)));
    CK(cudaStreamCreateWithFlags(&st[r], cudaStreamNonBlocking));
  }
  auto launch = [&](int n) {
    for (int r = 0; r < ranks; ++r) {
      CK(cudaSetDevice(r));
      if (ranks == 2) oneshot_allreduce<2><<<kBlocks, kThreads, 0, st[r]>>>(in[r], out[r], n, max_n, p, epochs[r], r);
      else if (ranks == 4) oneshot_allreduce<4><<<kBlocks, kThreads, 0, st[r]>>>(in[r], out[r], n, max_n, p, epochs[r], r);
      else oneshot_allreduce<8><<<kBlocks, kThreads, 0, st[r]>>>(in[r], out[r], n, max_n, p, epochs[r], r);
    }
  };
  int bad = 0;
  for (int n : {4096, 8192, 65536, 1 << 19}) {  // bf16 elements: 8 KB .. 1 MB
    // check: rank r holds r + small values; every rank must hold the rank-order fp32 sum, rounded once
    std::vector<std::vector<__nv_bfloat16>> host(ranks, std::vector<__nv_bfloat16>(n));
    for (int r = 0; r < ranks; ++r) {
      for (int i = 0; i < n; ++i) host[r][i] = __float2bfloat16(0.001f * ((i * 7 + r * 13) % 997) - 0.5f);
      CK(cudaSetDevice(r));
      CK(cudaMemcpy(in[r], host[r].data(), n * 2, cudaMemcpyHostToDevice));
    }
    for (int it = 0; it < 3; ++it) launch(n);  // three calls: parities and epochs advance
    for (int r = 0; r < ranks; ++r) {
      CK(cudaSetDevice(r));
      CK(cudaStreamSynchronize(st[r]));
      std::vector<__nv_bfloat16> got(n);
      CK(cudaMemcpy(got.data(), out[r], n * 2, cudaMemcpyDeviceToHost));
      for (int i = 0; i < n; ++i) {
        float acc = 0;
        for (int q = 0; q < ranks; ++q) acc += __bfloat162float(host[q][i]);
        if (__bfloat162float(got[i]) != __bfloat162float(__float2bfloat16(acc))) {
          if (bad++ < 5) printf("rank %d n %d i %d: got %f want %f\n", r, n, i, __bfloat162float(got[i]), acc);
        }
      }
    }
    // time: back-to-back calls on every rank, events on rank 0
    cudaEvent_t a, z;
    CK(cudaSetDevice(0));
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&z));
    for (int it = 0; it < 20; ++it) launch(n);
    CK(cudaEventRecord(a, st[0]));
    const int iters = 1000;
    for (int it = 0; it < iters; ++it) launch(n);
    CK(cudaSetDevice(0));
    CK(cudaEventRecord(z, st[0]));
    CK(cudaEventSynchronize(z));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, z));
    for (int r = 0; r < ranks; ++r) {
      CK(cudaSetDevice(r));
      CK(cudaStreamSynchronize(st[r]));
    }
    printf("{\"ranks\": %d, \"bytes\": %d, \"us_per_call\": %.2f}\n", ranks, n * 2, ms * 1e3 / iters);
  }
  printf(bad ? "MISMATCHES: %d\n" : "all sums exact (rank-order fp32, one rounding)%d\n", bad ? bad : 0);
  return bad != 0;
}
