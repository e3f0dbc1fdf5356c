// kiln::gemm_rows_big (B > 64) on the GPU machine, standalone: rows vs an fp64 reference, rows of B = 65 / 128 / 200
// bit-equal to the same rows at B = 256 (invariance within the kernel), time against the middle kernel.
//   nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/grb benchmarks/kernels/gemm_rows_big_check.cu && /tmp/grb
#include "../../passes/kernels/cuda/common.cuh"
#include "../../passes/kernels/cuda/gemm_rows.cuh"
#include "check_util.cuh"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cmath>
using bf = __nv_bfloat16;
__global__ void __launch_bounds__(256) kmid(const bf* A, const bf* W, const bf* R, bf* C, int M, int N, int K) {
  __shared__ float red[kiln::GROWS_RED_FLOATS];
  kiln::gemm_rows<bf, bf, true, 8>(A, W, W, R, C, M, N, K, red);
}
__global__ void __launch_bounds__(256) kbig(const bf* A, const bf* W, const bf* R, bf* C, float* ws, int M, int N, int K, int ks) {
  extern __shared__ __align__(16) unsigned char sm[];
  kiln::gemm_rows_big<bf, bf, true>(A, W, R, C, ws, M, N, K, ks, sm);
}
__global__ void kred(const float* ws, const bf* R, bf* C, int M, int N, int ks) { kiln::gemm_rows_big_reduce<bf, bf, true>(ws, R, C, M, N, ks); }
__global__ void k_ref(const bf* A, const bf* W, const bf* R, float* C, int M, int N, int K) {
  int n = blockIdx.x * blockDim.x + threadIdx.x, m = blockIdx.y;
  if (n >= N) return;
  double s = 0;
  for (int k = 0; k < K; ++k) s += (double)__bfloat162float(A[(size_t)m * K + k]) * (double)__bfloat162float(W[(size_t)n * K + k]);
  C[(size_t)m * N + n] = (float)(s + __bfloat162float(R[(size_t)m * N + n]));
}
int ksplit_for(int N, int K) { int t = (N + 127) / 128, ks = 1; while (t * ks < 120 && ks < 8 && K % (64 * ks * 2) == 0) ks *= 2; return ks; }
void big(const bf* A, const bf* W, const bf* R, bf* C, float* ws, int M, int N, int K) {
  int ks = ksplit_for(N, K);
  kbig<<<dim3((M + 127) / 128, (N + 127) / 128, ks), 256, kiln::GBIG_SMEM_BYTES>>>(A, W, R, C, ws, M, N, K, ks);
  if (ks > 1) kred<<<(unsigned)(((size_t)M * N + 255) / 256), 256>>>(ws, R, C, M, N, ks);
}
float bf2f(bf x) { return __bfloat162float(x); }
int main() {
  CK(cudaFuncSetAttribute(kbig, cudaFuncAttributeMaxDynamicSharedMemorySize, kiln::GBIG_SMEM_BYTES));
  int shapes[][2] = {{6144, 4096}, {28672, 4096}, {4096, 4096}, {4096, 14336}, {128256, 4096}, {200, 192}, {77, 4160}};
  const int MMAX = 256;
  bool ok = true;
  for (auto& sh : shapes) {
    int N = sh[0], K = sh[1];
    bf *A, *W, *R, *C, *C2; float *ws, *Cr;
    CK(cudaMalloc(&A, (size_t)MMAX * K * 2)); CK(cudaMalloc(&W, (size_t)N * K * 2)); CK(cudaMalloc(&R, (size_t)MMAX * N * 2));
    CK(cudaMalloc(&C, (size_t)MMAX * N * 2)); CK(cudaMalloc(&C2, (size_t)MMAX * N * 2)); CK(cudaMalloc(&Cr, (size_t)MMAX * N * 4));
    CK(cudaMalloc(&ws, (size_t)8 * MMAX * N * 4));
    k_fill<<<1024, 256>>>(A, (size_t)MMAX * K, 1, 1.f); k_fill<<<4096, 256>>>(W, (size_t)N * K, 2, 0.05f); k_fill<<<1024, 256>>>(R, (size_t)MMAX * N, 3, 1.f);
    std::vector<bf> h((size_t)MMAX * N), h2((size_t)MMAX * N); std::vector<float> hr((size_t)MMAX * N);
    // correctness vs fp64 and invariance (rows of M=65 / 128 within M=256)
    big(A, W, R, C2, ws, 256, N, K);
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(h2.data(), C2, (size_t)256 * N * 2, cudaMemcpyDeviceToHost));
    for (int M : {65, 128, 200}) {
      big(A, W, R, C, ws, M, N, K);
      k_ref<<<dim3((N + 127) / 128, M), 128>>>(A, W, R, Cr, M, N, K);
      CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(h.data(), C, (size_t)M * N * 2, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(hr.data(), Cr, (size_t)M * N * 4, cudaMemcpyDeviceToHost));
      double err = 0, ref = 0; bool inv = true;
      for (size_t i = 0; i < (size_t)M * N; ++i) {
        err = fmax(err, fabs(bf2f(h[i]) - hr[i])); ref = fmax(ref, fabs(hr[i]));
        inv &= memcmp(&h[i], &h2[i], 2) == 0;
      }
      bool good = err <= 8e-3 * ref && inv; ok &= good;
      printf("N=%6d K=%6d M=%3d ks=%d: err %.2e invariant %d %s\n", N, K, M, ksplit_for(N, K), err / ref, (int)inv, good ? "ok" : "FAIL");
    }
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    for (int M : {32, 64, 96, 128, 256}) {
      float t[2];
      for (int v = 0; v < 2; ++v) {
        auto go = [&]() { if (v == 0) kmid<<<dim3((M + 63) / 64, (N + 31) / 32), 256>>>(A, W, R, C, M, N, K); else big(A, W, R, C, ws, M, N, K); };
        for (int i = 0; i < 3; ++i) go();
        cudaEventRecord(e0); for (int i = 0; i < 20; ++i) go(); cudaEventRecord(e1); cudaEventSynchronize(e1);
        cudaEventElapsedTime(&t[v], e0, e1); t[v] = t[v] / 20 * 1e3;
      }
      printf("  time M=%3d: mid %7.1f us | big %7.1f us (%5.0f TF/s, %5.0f GB/s)\n", M, t[0], t[1], 2.0 * M * N * K / t[1] / 1e6, (double)N * K * 2 / t[1] / 1e3);
    }
    CK(cudaGetLastError());
    cudaFree(A); cudaFree(W); cudaFree(R); cudaFree(C); cudaFree(C2); cudaFree(Cr); cudaFree(ws);
  }
  printf(ok ? "ALL OK\n" : "SOME FAILED\n");
  return 0;
}
