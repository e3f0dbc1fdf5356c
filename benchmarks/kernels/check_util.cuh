// Shared by the standalone kernel checks in this folder (each compiled alone with nvcc on the GPU
// machine): the CUDA error check, the deterministic bf16 fill, the fp64 GEMM reference and a timer.
#pragma once
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdlib>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)

// p[i] = a hash of (i, seed) spread over [-scale, scale): the same values in every check and run.
__global__ void k_fill(__nv_bfloat16* p, size_t n, unsigned seed, float scale) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  for (; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)(i * 2654435761u) ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    p[i] = __float2bfloat16(((h & 0xFFFF) / 32768.f - 1.f) * scale);
  }
}

// C[m, n] = sum_k A[m, k] W[n, k] (+ R[m, n] when res) in fp64. Launch: grid (ceil(N / 128), M), 128 threads.
__global__ void k_ref(const __nv_bfloat16* A, const __nv_bfloat16* W, const __nv_bfloat16* R, float* C, int M, int N, int K, int res) {
  int n = blockIdx.x * blockDim.x + threadIdx.x, m = blockIdx.y;
  if (n >= N) return;
  double s = 0;
  for (int k = 0; k < K; ++k) s += (double)__bfloat162float(A[(size_t)m * K + k]) * (double)__bfloat162float(W[(size_t)n * K + k]);
  if (res) s += __bfloat162float(R[(size_t)m * N + n]);
  C[(size_t)m * N + n] = (float)s;
}

// Microseconds per call of run() over `reps` calls, after 3 warm-up calls (CUDA events on the default stream).
template <typename F>
float time_us(F run, int reps = 20) {
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0); cudaEventCreate(&e1);
  for (int i = 0; i < 3; ++i) run();
  cudaEventRecord(e0);
  for (int i = 0; i < reps; ++i) run();
  cudaEventRecord(e1); CK(cudaEventSynchronize(e1));
  float ms; cudaEventElapsedTime(&ms, e0, e1);
  cudaEventDestroy(e0); cudaEventDestroy(e1);
  return ms / reps * 1e3f;
}
