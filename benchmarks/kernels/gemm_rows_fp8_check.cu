// kiln::gemm_rows over fp8 weights (e4m3 codes, per-row scale) on the GPU machine, standalone: rows vs an fp64
// reference decoding every code exactly (subnormals included), small-B variants, and time against bf16 weights.
//   nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/grf benchmarks/kernels/gemm_rows_fp8_check.cu && /tmp/grf
#include "../../passes/kernels/cuda/common.cuh"
#include "../../passes/kernels/cuda/gemm_rows.cuh"
#include "check_util.cuh"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cmath>
using bf = __nv_bfloat16;
template <int RT, int PF>
__global__ void __launch_bounds__(256) kv8(const bf* A, const void* W, const float* S, const bf* R, bf* C, int M, int N, int K) {
  __shared__ float red[kiln::GROWS_RED_FLOATS];
  kiln::gemm_rows_tile<bf, bf, true, 1, RT, PF, uint8_t>(A, W, S, R, C, M, N, K, 0, blockIdx.y * RT * 16, red);
}
template <int TT, bool F8>
__global__ void __launch_bounds__(256) kr(const bf* A, const void* W, const float* S, const bf* R, bf* C, int M, int N, int K) {
  __shared__ float red[kiln::GROWS_RED_FLOATS];
  if constexpr (F8) kiln::gemm_rows<bf, bf, true, TT, uint8_t>(A, W, S, R, C, M, N, K, red);
  else kiln::gemm_rows<bf, bf, true, TT>(A, W, S, R, C, M, N, K, red);
}
__device__ float dec(uint8_t c) {  // e4m3fn, exact (subnormals too)
  int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
  float v = e ? ldexpf(1.f + m / 8.f, e - 7) : ldexpf(m / 8.f, -6);
  return s ? -v : v;
}
__global__ void k_ref(const bf* A, const uint8_t* Q, const float* S, const bf* R, float* C, int M, int N, int K) {
  int n = blockIdx.x * blockDim.x + threadIdx.x, m = blockIdx.y;
  if (n >= N) return;
  double s = 0;
  for (int k = 0; k < K; ++k) s += (double)__bfloat162float(A[(size_t)m * K + k]) * (double)dec(Q[(size_t)n * K + k]);
  C[(size_t)m * N + n] = (float)(s * S[n] + __bfloat162float(R[(size_t)m * N + n]));
}
__global__ void k_codes(uint8_t* q, size_t n, unsigned seed) {  // any e4m3 code but the NaNs (0x7F, 0xFF)
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  for (; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)(i * 2654435761u) ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    uint8_t c = h & 0xFF; if ((c & 0x7F) == 0x7F) c ^= 1; q[i] = c;
  }
}
__global__ void k_scales(float* s, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) s[i] = 1e-3f * (1 + (i * 37 % 11)); }
int main() {
  int shapes[][2] = {{6144, 4096}, {28672, 4096}, {4096, 4096}, {4096, 14336}, {128256, 4096}, {77, 4128}};
  const int MMAX = 128; bool ok = true;
  for (auto& sh : shapes) {
    int N = sh[0], K = sh[1];
    bf *A, *R, *C, *W16; uint8_t* Q; float *S, *Cr;
    CK(cudaMalloc(&A, (size_t)MMAX * K * 2)); CK(cudaMalloc(&Q, (size_t)N * K)); CK(cudaMalloc(&W16, (size_t)N * K * 2)); CK(cudaMalloc(&S, N * 4));
    CK(cudaMalloc(&R, (size_t)MMAX * N * 2)); CK(cudaMalloc(&C, (size_t)MMAX * N * 2)); CK(cudaMalloc(&Cr, (size_t)MMAX * N * 4));
    k_fill<<<1024, 256>>>(A, (size_t)MMAX * K, 1, 1.f); k_codes<<<4096, 256>>>(Q, (size_t)N * K, 2); k_scales<<<(N + 255) / 256, 256>>>(S, N);
    k_fill<<<1024, 256>>>(R, (size_t)MMAX * N, 3, 1.f); k_fill<<<4096, 256>>>(W16, (size_t)N * K, 4, 0.05f);
    std::vector<bf> h((size_t)MMAX * N); std::vector<float> hr((size_t)MMAX * N);
    for (int M : {1, 5, 8, 13, 64, 100}) {
      dim3 grid(M <= 8 ? 1 : (M + 63) / 64, (N + 31) / 32);
      if (M <= 8) kr<1, true><<<grid, 256>>>(A, Q, S, R, C, M, N, K); else kr<8, true><<<grid, 256>>>(A, Q, S, R, C, M, N, K);
      k_ref<<<dim3((N + 127) / 128, M), 128>>>(A, Q, S, R, Cr, M, N, K);
      CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(h.data(), C, (size_t)M * N * 2, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(hr.data(), Cr, (size_t)M * N * 4, cudaMemcpyDeviceToHost));
      double err = 0, ref = 0;
      for (size_t i = 0; i < (size_t)M * N; ++i) { err = fmax(err, fabs(__bfloat162float(h[i]) - hr[i])); ref = fmax(ref, fabs(hr[i])); }
      bool good = err <= 8e-3 * ref; ok &= good;
      if (!good || M == 8) printf("fp8 N=%6d K=%6d M=%3d: err %.2e %s\n", N, K, M, err / ref, good ? "ok" : "FAIL");
    }
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    for (int M : {1, 8}) {  // small-B fp8 variants (one token tile): rows per block x prefetch depth
      const char* names[] = {"rt2pf2", "rt2pf4", "rt2pf6", "rt4pf2", "rt4pf4", "rt1pf4"};
      printf("  fp8 variants N=%6d K=%6d M=%d:", N, K, M);
      for (int v = 0; v < 6; ++v) {
        int rt = v == 3 || v == 4 ? 4 : v == 5 ? 1 : 2;
        dim3 grid(1, (N + rt * 16 - 1) / (rt * 16));
        auto go = [&]() {
          switch (v) {
            case 0: kv8<2, 2><<<grid, 256>>>(A, Q, S, R, C, M, N, K); break;
            case 1: kv8<2, 4><<<grid, 256>>>(A, Q, S, R, C, M, N, K); break;
            case 2: kv8<2, 6><<<grid, 256>>>(A, Q, S, R, C, M, N, K); break;
            case 3: kv8<4, 2><<<grid, 256>>>(A, Q, S, R, C, M, N, K); break;
            case 4: kv8<4, 4><<<grid, 256>>>(A, Q, S, R, C, M, N, K); break;
            default: kv8<1, 4><<<grid, 256>>>(A, Q, S, R, C, M, N, K);
          }
        };
        for (int i = 0; i < 3; ++i) go();
        float t; cudaEventRecord(e0); for (int i = 0; i < 20; ++i) go(); cudaEventRecord(e1); cudaEventSynchronize(e1);
        cudaEventElapsedTime(&t, e0, e1);
        printf(" %s %.1f", names[v], t / 20 * 1e3);
      }
      printf(" us\n");
    }
    for (int M : {1, 8, 32, 64}) {
      float t[2];
      for (int v = 0; v < 2; ++v) {
        dim3 grid(M <= 8 ? 1 : (M + 63) / 64, (N + 31) / 32);
        auto go = [&]() {
          if (v == 0) { if (M <= 8) kr<1, false><<<grid, 256>>>(A, W16, S, R, C, M, N, K); else kr<8, false><<<grid, 256>>>(A, W16, S, R, C, M, N, K); }
          else { if (M <= 8) kr<1, true><<<grid, 256>>>(A, Q, S, R, C, M, N, K); else kr<8, true><<<grid, 256>>>(A, Q, S, R, C, M, N, K); }
        };
        for (int i = 0; i < 3; ++i) go();
        cudaEventRecord(e0); for (int i = 0; i < 20; ++i) go(); cudaEventRecord(e1); cudaEventSynchronize(e1);
        cudaEventElapsedTime(&t[v], e0, e1); t[v] = t[v] / 20 * 1e3;
      }
      printf("  N=%6d K=%6d M=%3d: bf16 %7.1f us (%5.0f GB/s) | fp8 %7.1f us (%5.0f GB/s of codes) x%.2f\n", N, K, M, t[0], (double)N * K * 2 / t[0] / 1e3,
             t[1], (double)N * K / t[1] / 1e3, t[0] / t[1]);
    }
    CK(cudaGetLastError());
    cudaFree(A); cudaFree(Q); cudaFree(W16); cudaFree(S); cudaFree(R); cudaFree(C); cudaFree(Cr);
  }
  printf(ok ? "ALL OK\n" : "SOME FAILED\n");
}
