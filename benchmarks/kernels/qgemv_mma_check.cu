// kiln::qgemv_mma (tensor-core q4 decode GEMV) against kiln::qgemv (the float path, v3) and an fp64
// reference, Llama-3-8B's decode shapes, bf16 activations, q4 groups of 128 and 32. The weights rotate
// over copies worth >= 1 GB so that no call finds them in L2. Prints us per call, GB/s of weight
// bytes read (codes + scales + minima) and the share of the copy bandwidth measured in the same run.
//   nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/qmc benchmarks/kernels/qgemv_mma_check.cu && /tmp/qmc
#include "../../passes/kernels/cuda/common.cuh"
#include "../../passes/kernels/cuda/qgemv.cuh"
#include "check_util.cuh"
#include <cmath>
#include <cstdio>
#include <vector>
using bf = __nv_bfloat16;

__global__ void k_fill_u32(uint32_t* p, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)(i * 2654435761u) ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15; h *= 0x27d4eb2du; h ^= h >> 16;
    p[i] = h;
  }
}
// scales in [lo, lo + span), minima in [-span, 0)
__global__ void k_fill_h(__half* p, size_t n, unsigned seed, float lo, float span) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)(i * 2654435761u) ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    p[i] = __float2half(lo + (h & 0xFFFF) / 65536.f * span);
  }
}
__global__ void k_ref_q4(const bf* x, const uint32_t* q, const __half* s, const __half* z, double* y, int N, int K, int G) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  double acc = 0;
  for (int k = 0; k < K; ++k) {
    const uint32_t code = (q[(size_t)n * (K / 8) + k / 8] >> (4 * (k % 8))) & 0xF;
    const double w = (double)__half2float(s[(size_t)n * (K / G) + k / G]) * code + (double)__half2float(z[(size_t)n * (K / G) + k / G]);
    acc += (double)__bfloat162float(x[k]) * w;
  }
  y[n] = acc;
}
__global__ void k_empty() {}
__global__ void k_copy(const uint4* a, uint4* b, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) b[i] = a[i];
}

template <int K, int G>
__global__ void __launch_bounds__(128) kv3(const bf* x, const uint32_t* q, const __half* s, const __half* z, bf* y, int N) {
  kiln::qgemv<bf, bf, 4, K, G, 4, 4>(x, q, s, z, y, N);
}
template <int K, int G, int NW, int RT, int U>
__global__ void __launch_bounds__(NW * 32) kv4(const bf* x, const uint32_t* q, const __half* s, const __half* z, bf* y, int N) {
  kiln::qgemv_mma<bf, bf, K, G, NW, RT, U>(x, q, s, z, y, N);
}
// A variant measured and not kept (benchmarks/NOTES.md): each warp streams its rows' codes, scales and minima through a ring of S shared-memory
// stages with cp.async (bytes in flight without registers), U steps per stage.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem) : "memory");
}
template <int BYTES>
__device__ __forceinline__ void cp_async_n(void* smem, const void* gmem) {
  if constexpr (BYTES == 16) kiln::cp_async16(smem, gmem, true);
  else if constexpr (BYTES == 8) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(gmem) : "memory");
  } else cp_async4(smem, gmem);
}
template <int G, int U> struct PipeShape {
  static constexpr int GPS = 128 / G, ROWB = U * 64 + ((U * 16) % 32 == 16 ? 0 : 64);  // row stride: 16 words mod 32
  static constexpr int SB = U * GPS * 2;  // bytes of scales (and of minima) per row and stage
  static constexpr int SLOT = 16 * ROWB + 2 * 16 * SB;
};
template <typename T, typename OutT, int K, int G, int NW, int U, int S>
__device__ __forceinline__ void pipe_qgemv_mma(const T* __restrict__ x, const void* __restrict__ qv, const void* __restrict__ sv,
                                               const void* __restrict__ zv, OutT* __restrict__ y, int N, uint8_t* smem) {
  using P = PipeShape<G, U>;
  constexpr int STEPS = K / 128, W = G / 32, GPS = 128 / G, NG = K / G, PER_WARP = STEPS / NW, STAGES = PER_WARP / U;
  static_assert(STEPS % (NW * U) == 0 && P::SB >= 4 && P::SB <= 16 && (P::SB & (P::SB - 1)) == 0, "whole stages; scale copies of 4-16 bytes");
  constexpr float kBias = kiln::q4_pair_bias<T>();
  constexpr uint32_t kOnes = kiln::RowsSame<T, __nv_bfloat16>::value ? 0x3F803F80u : 0x3C003C00u;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
  const uint8_t* q = static_cast<const uint8_t*>(qv);
  const uint8_t* s = static_cast<const uint8_t*>(sv);
  const uint8_t* z = static_cast<const uint8_t*>(zv);
  uint8_t* ring = smem + warp * S * P::SLOT;
  const int row0 = blockIdx.x * 16;
  const int first = warp * PER_WARP;
  auto issue = [&](int stage) {
    uint8_t* slot = ring + (stage % S) * P::SLOT;
    const int st0 = first + stage * U;
    // codes: 16 rows x U * 64 bytes, 16 bytes a lane per copy (4 U lanes per row)
#pragma unroll
    for (int i = lane; i < 16 * U * 4; i += 32) {
      const int r = i / (U * 4), ch = i % (U * 4);
      const int row = min(row0 + r, N - 1);
      kiln::cp_async16(slot + r * P::ROWB + ch * 16, q + (size_t)row * (K / 2) + st0 * 64 + ch * 16, true);
    }
    // scales and minima: one copy per row and array (lanes 0..15: s, 16..31: z)
    {
      const int r = lane % 16, row = min(row0 + r, N - 1);
      const uint8_t* src = (lane < 16 ? s : z) + ((size_t)row * NG + st0 * GPS) * 2;
      cp_async_n<P::SB>(slot + 16 * P::ROWB + (lane / 16) * 16 * P::SB + r * P::SB, src);
    }
  };
  float acc[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < S - 1; ++i) {
    if (i < STAGES) issue(i);
    kiln::cp_async_commit();
  }
  for (int stage = 0; stage < STAGES; ++stage) {
    if (stage + S - 1 < STAGES) issue(stage + S - 1);
    kiln::cp_async_commit();
    kiln::cp_async_wait<S - 1>();
    __syncwarp();
    const uint8_t* slot = ring + (stage % S) * P::SLOT;
    const int st0 = first + stage * U;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int st = st0 + u;
      uint32_t wv[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint8_t* rp = slot + (g + 8 * h) * P::ROWB + u * 64;
        if constexpr (W == 4) {
          const uint4 v = *reinterpret_cast<const uint4*>(rp + c * 16);
          wv[h][0] = v.x; wv[h][1] = v.y; wv[h][2] = v.z; wv[h][3] = v.w;
        } else {
#pragma unroll
          for (int gi = 0; gi < GPS; ++gi)
#pragma unroll
            for (int i = 0; i < W; ++i) wv[h][gi * W + i] = reinterpret_cast<const uint32_t*>(rp)[(G / 8) * gi + W * c + i];
        }
      }
      uint4 xv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = __ldg(reinterpret_cast<const uint4*>(x + st * 128 + G * (i / W) + 8 * W * c + 8 * (i % W)));
#pragma unroll
      for (int gi = 0; gi < GPS; ++gi) {
        uint32_t xb[W][4];
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const uint4 v = xv[gi * W + i];
          xb[i][0] = __byte_perm(v.x, v.z, 0x5410); xb[i][1] = __byte_perm(v.x, v.z, 0x7632);
          xb[i][2] = __byte_perm(v.y, v.w, 0x5410); xb[i][3] = __byte_perm(v.y, v.w, 0x7632);
        }
        float xs[4] = {0.f, 0.f, 0.f, 0.f};
        float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int i = 0; i < W; ++i) {
          kiln::mma_16816<T>(xs, kOnes, kOnes, kOnes, kOnes, xb[i][0], xb[i][1]);
          kiln::mma_16816<T>(xs, kOnes, kOnes, kOnes, kOnes, xb[i][2], xb[i][3]);
          uint32_t pa[4], pb[4];
          kiln::q4_pairs<T>(wv[0][gi * W + i], pa);
          kiln::q4_pairs<T>(wv[1][gi * W + i], pb);
          kiln::mma_16816<T>(d, pa[0], pb[0], pa[1], pb[1], xb[i][0], xb[i][1]);
          kiln::mma_16816<T>(d, pa[2], pb[2], pa[3], pb[3], xb[i][2], xb[i][3]);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const __half* sh = reinterpret_cast<const __half*>(slot + 16 * P::ROWB + (g + 8 * h) * P::SB);
          const __half* zh = reinterpret_cast<const __half*>(slot + 16 * P::ROWB + 16 * P::SB + (g + 8 * h) * P::SB);
          const float sc = __half2float(sh[u * GPS + gi]), mn = __half2float(zh[u * GPS + gi]);
          acc[h] = fmaf(sc, d[2 * h], fmaf(fmaf(-kBias, sc, mn), xs[0], acc[h]));
        }
      }
    }
    __syncwarp();
  }
  __shared__ float part[NW][16];
  if (c == 0) { part[warp][g] = acc[0]; part[warp][g + 8] = acc[1]; }
  __syncthreads();
  if (threadIdx.x < 16) {
    const int row = row0 + threadIdx.x;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) v += part[w][threadIdx.x];
    if (row < N) y[row] = kiln::from_float<OutT>(v);
  }
}
template <int K, int G, int NW, int U, int S>
__global__ void __launch_bounds__(NW * 32) kp(const bf* x, const uint32_t* q, const __half* s, const __half* z, bf* y, int N) {
  extern __shared__ __align__(16) uint8_t smem_p[];
  pipe_qgemv_mma<bf, bf, K, G, NW, U, S>(x, q, s, z, y, N, smem_p);
}
template <int G, int NW, int U, int S> constexpr int pipe_smem() { return NW * S * PipeShape<G, U>::SLOT; }
typedef void (*Kern)(const bf*, const uint32_t*, const __half*, const __half*, bf*, int);
struct V { const char* name; Kern k; int threads, rows_per_block, smem; };

template <int K, int G>
void shape(int N, double copy_gbs) {
  const int NG = K / G;
  const size_t qw = (size_t)N * K / 8, sz = (size_t)N * NG;
  const double bytes = qw * 4.0 + sz * 4.0;
  const int R = (int)std::max(1.0, std::ceil(1.2e9 / bytes));
  uint32_t* q; __half *s, *z; bf *x, *y; double* ref;
  CK(cudaMalloc(&q, qw * 4 * R)); CK(cudaMalloc(&s, sz * 2 * R)); CK(cudaMalloc(&z, sz * 2 * R));
  CK(cudaMalloc(&x, K * 2)); CK(cudaMalloc(&y, N * 2)); CK(cudaMalloc(&ref, N * 8));
  k_fill_u32<<<1024, 256>>>(q, qw * R, 7u + K + N);
  k_fill_h<<<1024, 256>>>(s, sz * R, 11u, 0.004f, 0.004f);
  k_fill_h<<<1024, 256>>>(z, sz * R, 13u, -0.03f, 0.03f);
  k_fill<<<64, 256>>>(x, K, 17u, 2.f);
  k_ref_q4<<<(N + 127) / 128, 128>>>(x, q, s, z, ref, N, K, G);
  CK(cudaDeviceSynchronize());
  std::vector<double> hr(N);
  CK(cudaMemcpy(hr.data(), ref, N * 8, cudaMemcpyDeviceToHost));
  double rmax = 0;
  for (double v : hr) rmax = std::max(rmax, std::fabs(v));
  const int sm = 0;
  V vs[] = {{"v3 float", kv3<K, G>, 128, 4, 0},
            {"mma nw4 u2", kv4<K, G, 4, 1, 2>, 128, 16, sm}, {"mma nw8 u2", kv4<K, G, 8, 1, 2>, 256, 16, sm},
            {"mma nw16 u1", kv4<K, G, 16, 1, 1>, 512, 16, sm},
            {"pipe nw4 u2 s4", kp<K, G, 4, 2, 4>, 128, 16, pipe_smem<G, 4, 2, 4>()},
            {"pipe nw4 u2 s6", kp<K, G, 4, 2, 6>, 128, 16, pipe_smem<G, 4, 2, 6>()},
            {"pipe nw8 u2 s4", kp<K, G, 8, 2, 4>, 256, 16, pipe_smem<G, 8, 2, 4>()},
            {"pipe nw2 u2 s8", kp<K, G, 2, 2, 8>, 64, 16, pipe_smem<G, 2, 2, 8>()},
            {"pipe nw4 u4/2 s3", kp<K, G, 4, (G == 128 ? 4 : 2), 3>, 128, 16, pipe_smem<G, 4, (G == 128 ? 4 : 2), 3>()},
            {"pipe nw8 u2 s3", kp<K, G, 8, 2, 3>, 256, 16, pipe_smem<G, 8, 2, 3>()}};
  for (const V& v : vs) {
    if (v.smem > 48 * 1024) CK(cudaFuncSetAttribute(v.k, cudaFuncAttributeMaxDynamicSharedMemorySize, v.smem));
    const int grid = (N + v.rows_per_block - 1) / v.rows_per_block;
    v.k<<<grid, v.threads, v.smem>>>(x, q, s, z, y, N);
    CK(cudaGetLastError()); CK(cudaDeviceSynchronize());
    std::vector<bf> hy(N);
    CK(cudaMemcpy(hy.data(), y, N * 2, cudaMemcpyDeviceToHost));
    double err = 0;
    for (int n = 0; n < N; ++n) err = std::max(err, std::fabs((double)__bfloat162float(hy[n]) - hr[n]));
    int r = 0;
    const float us = time_us([&] {
      v.k<<<grid, v.threads, v.smem>>>(x, q + qw * r, s + sz * r, z + sz * r, y, N);
      r = (r + 1) % R;
    }, 50);
    // the same calls as one CUDA graph (as decode runs them): 40 launches per replay
    cudaStream_t stream;
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < 40; ++i) v.k<<<grid, v.threads, v.smem, stream>>>(x, q + qw * (i % R), s + sz * (i % R), z + sz * (i % R), y, N);
    CK(cudaStreamEndCapture(stream, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0); cudaEventCreate(&e1);
    CK(cudaGraphLaunch(exec, stream));
    cudaEventRecord(e0, stream);
    for (int i = 0; i < 5; ++i) CK(cudaGraphLaunch(exec, stream));
    cudaEventRecord(e1, stream);
    CK(cudaEventSynchronize(e1));
    float gms;
    cudaEventElapsedTime(&gms, e0, e1);
    const float gus = gms * 1e3f / 200;
    cudaGraphExecDestroy(exec); cudaGraphDestroy(graph); cudaStreamDestroy(stream); cudaEventDestroy(e0); cudaEventDestroy(e1);
    const double gbs = bytes / gus * 1e-3;
    printf("N %6d K %5d G %3d  %-17s %7.1f us (graph %6.1f us)  %5.0f GB/s  %5.1f%% of copy  err %.2e\n", N, K, G, v.name, us, gus, gbs,
           100 * gbs / copy_gbs, err / rmax);
  }
  cudaFree(q); cudaFree(s); cudaFree(z); cudaFree(x); cudaFree(y); cudaFree(ref);
}

int main() {
  const size_t n16 = (size_t)1 << 27;  // 2 GiB copied
  uint4 *a, *b;
  CK(cudaMalloc(&a, n16 * 16)); CK(cudaMalloc(&b, n16 * 16));
  const float cus = time_us([&] { k_copy<<<132 * 16, 256>>>(a, b, n16); }, 10);
  const double copy_gbs = 2.0 * n16 * 16 / cus * 1e-3;  // bytes read + written
  printf("copy kernel: %.0f GB/s (read + write)\n", copy_gbs);
  cudaFree(a); cudaFree(b);
  printf("empty kernel: %.2f us per launch back to back\n", time_us([&] { k_empty<<<132, 128>>>(); }, 200));
  if (getenv("QMC_GATE_UP")) {  // one shape only (for ncu)
    shape<4096, 128>(28672, copy_gbs);
    return 0;
  }
  shape<4096, 128>(6144, copy_gbs);
  shape<4096, 128>(4096, copy_gbs);
  shape<4096, 128>(28672, copy_gbs);
  shape<14336, 128>(4096, copy_gbs);
  shape<4096, 128>(128256, copy_gbs);
  shape<4096, 32>(28672, copy_gbs);
  shape<14336, 32>(4096, copy_gbs);
  shape<4096, 32>(6144, copy_gbs);
  return 0;
}
