// kiln::gemm_rows on the GPU machine, standalone: every row vs an fp64 reference (bf16 and fp32 out, with and
// without the residual), row 0 bit-equal at every M (batch invariance), and time against gemm_tn.
//   nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/grc benchmarks/kernels/gemm_rows_check.cu && /tmp/grc
#include "../../passes/kernels/cuda/common.cuh"
#include "../../passes/kernels/cuda/gemm_rows.cuh"
#include "../../passes/kernels/cuda/gemm.cuh"
#include "check_util.cuh"
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cmath>
using bf = __nv_bfloat16;

template <typename OutT, bool RES, int TT = 8>
__global__ void k_rows(const bf* A, const bf* W, const bf* R, OutT* C, int M, int N, int K) {
  __shared__ float red[kiln::GROWS_RED_FLOATS];
  kiln::gemm_rows<bf, OutT, RES, TT>(A, W, W, R, C, M, N, K, red);
}
__global__ void k_tn(const bf* A, const bf* W, bf* C, int M, int N, int K) {
  extern __shared__ __align__(16) unsigned char sm[];
  kiln::gemm_tn<bf, false>(A, W, C, C, M, N, K, sm);
}

int main() {
  int shapes[][2] = {{6144, 4096}, {28672, 4096}, {4096, 4096}, {4096, 14336}, {128256, 4096}, {200, 96}, {77, 4128},
                     {768, 512}, {512, 512}, {1024, 512}};
  int Ms[] = {1, 3, 4, 5, 8, 13, 16, 32, 64, 100, 128};
  const bool timing = getenv("NO_TIMING") == nullptr;
  const int MMAX = 128;
  cudaFuncSetAttribute(k_tn, cudaFuncAttributeMaxDynamicSharedMemorySize, kiln::GEMM_SMEM_BYTES);
  bool ok = true;
  for (auto& sh : shapes) {
    int N = sh[0], K = sh[1];
    bf *A, *W, *R, *C; float *Cf, *Cr;
    CK(cudaMalloc(&A, (size_t)MMAX * K * 2)); CK(cudaMalloc(&W, (size_t)N * K * 2)); CK(cudaMalloc(&R, (size_t)MMAX * N * 2));
    CK(cudaMalloc(&C, (size_t)MMAX * N * 2)); CK(cudaMalloc(&Cf, (size_t)MMAX * N * 4)); CK(cudaMalloc(&Cr, (size_t)MMAX * N * 4));
    k_fill<<<1024, 256>>>(A, (size_t)MMAX * K, 1, 1.f); k_fill<<<4096, 256>>>(W, (size_t)N * K, 2, 0.05f); k_fill<<<1024, 256>>>(R, (size_t)MMAX * N, 3, 1.f);
    CK(cudaDeviceSynchronize());
    std::vector<float> row0(N), hr((size_t)MMAX * N), hc((size_t)MMAX * N);
    std::vector<bf> hb((size_t)MMAX * N), first((size_t)N);
    for (int M : Ms) {
      for (int res = 0; res < 2; ++res) {
        dim3 grid((M + 63) / 64, (N + 31) / 32);
        for (int tt = 8; tt >= (M <= 8 ? 1 : 8); tt -= 7) {  // the B <= 8 kernel (one token tile) too
        if (tt == 1) { if (res) k_rows<bf, true, 1><<<dim3(1, (N + 31) / 32), 256>>>(A, W, R, C, M, N, K); else k_rows<bf, false, 1><<<dim3(1, (N + 31) / 32), 256>>>(A, W, R, C, M, N, K); }
        else if (res) k_rows<bf, true><<<grid, 256>>>(A, W, R, C, M, N, K); else k_rows<bf, false><<<grid, 256>>>(A, W, R, C, M, N, K);
        k_ref<<<dim3((N + 127) / 128, M), 128>>>(A, W, R, Cr, M, N, K, res);
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(hb.data(), C, (size_t)M * N * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(hr.data(), Cr, (size_t)M * N * 4, cudaMemcpyDeviceToHost));
        double maxerr = 0, maxref = 0;
        for (size_t i = 0; i < (size_t)M * N; ++i) { maxerr = fmax(maxerr, fabs(__bfloat162float(hb[i]) - hr[i])); maxref = fmax(maxref, fabs(hr[i])); }
        bool inv = true;
        if (M == 1 && !res) for (int n = 0; n < N; ++n) first[n] = hb[n];
        if (!res) for (int n = 0; n < N; ++n) inv &= (*(unsigned short*)&first[n] == *(unsigned short*)&hb[n]);
        bool good = maxerr <= 8e-3 * maxref && inv;
        ok &= good;
        if (!good || M == 128) printf("N=%6d K=%6d M=%4d TT=%d res=%d  max|err|/max|ref| = %.2e  row0 invariant=%d %s\n", N, K, M, tt, res, maxerr / maxref, (int)inv, good ? "ok" : "FAIL");
        }
      }
      // fp32 out (the LM head)
      dim3 grid((M + 63) / 64, (N + 31) / 32);
      k_rows<float, false><<<grid, 256>>>(A, W, R, Cf, M, N, K);
      k_ref<<<dim3((N + 127) / 128, M), 128>>>(A, W, R, Cr, M, N, K, false);
      CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(hc.data(), Cf, (size_t)M * N * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(hr.data(), Cr, (size_t)M * N * 4, cudaMemcpyDeviceToHost));
      double maxerr = 0, maxref = 0;
      for (size_t i = 0; i < (size_t)M * N; ++i) { maxerr = fmax(maxerr, fabs(hc[i] - hr[i])); maxref = fmax(maxref, fabs(hr[i])); }
      bool good = maxerr <= 1e-4 * maxref; ok &= good;
      if (!good) printf("fp32 out N=%d K=%d M=%d err %.2e FAIL\n", N, K, M, maxerr / maxref);
    }
    // timing
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    for (int M : {1, 8, 16, 32, 64, 128}) {
      if (!timing) break;
      dim3 grid((M + 63) / 64, (N + 31) / 32);
      for (int i = 0; i < 3; ++i) k_rows<bf, true><<<grid, 256>>>(A, W, R, C, M, N, K);
      int it = 20; cudaEventRecord(e0);
      for (int i = 0; i < it; ++i) k_rows<bf, true><<<grid, 256>>>(A, W, R, C, M, N, K);
      cudaEventRecord(e1); cudaEventSynchronize(e1); float ms; cudaEventElapsedTime(&ms, e0, e1); ms /= it;
      dim3 g2((N + 255) / 256, (M + 127) / 128);
      for (int i = 0; i < 3; ++i) k_tn<<<g2, 256, kiln::GEMM_SMEM_BYTES>>>(A, W, C, M, N, K);
      cudaEventRecord(e0);
      for (int i = 0; i < it; ++i) k_tn<<<g2, 256, kiln::GEMM_SMEM_BYTES>>>(A, W, C, M, N, K);
      cudaEventRecord(e1); cudaEventSynchronize(e1); float ms2; cudaEventElapsedTime(&ms2, e0, e1); ms2 /= it;
      double gb = (double)N * K * 2 / 1e9;
      printf("time N=%6d K=%6d M=%4d: gemm_rows %8.1f us %6.0f GB/s %6.1f TF/s | gemm_tn %8.1f us %6.0f GB/s\n", N, K, M, ms * 1e3, gb / ms * 1e3,
             2.0 * M * N * K / ms / 1e9, ms2 * 1e3, gb / ms2 * 1e3);
    }
    CK(cudaGetLastError());
    cudaFree(A); cudaFree(W); cudaFree(R); cudaFree(C); cudaFree(Cf); cudaFree(Cr);
  }
  printf(ok ? "ALL OK\n" : "SOME FAILED\n");
  return ok ? 0 : 1;
}
