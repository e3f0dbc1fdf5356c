// Variants of kiln::gemm_rows_tile (row tiles RT, prefetch depth PF, token tiles TT): each must be bit-equal
// to the first (the K split is the same), then timed per shape and M. Results: benchmarks/NOTES.md.
//   nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/grv benchmarks/kernels/gemm_rows_variants.cu && /tmp/grv
#include "../../passes/kernels/cuda/common.cuh"
#include "../../passes/kernels/cuda/gemm_rows.cuh"
#include "check_util.cuh"
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cmath>
using bf = __nv_bfloat16;

template <int TTMAX, int RT, int PF>
__global__ void __launch_bounds__(256) kv(const bf* A, const bf* W, const bf* R, bf* C, int M, int N, int K) {
  __shared__ float red[kiln::GROWS_RED_FLOATS];
  const int m0 = blockIdx.x * TTMAX * 8, n0 = blockIdx.y * RT * 16, mt = M - m0;
  if (TTMAX == 1 || mt <= 8) kiln::gemm_rows_tile<bf, bf, true, 1, RT, PF>(A, W, W, R, C, M, N, K, m0, n0, red);
  else if constexpr (TTMAX >= 2) {
    if (TTMAX == 2 || mt <= 16) kiln::gemm_rows_tile<bf, bf, true, 2, RT, PF>(A, W, W, R, C, M, N, K, m0, n0, red);
    else if constexpr (TTMAX >= 4) {
      if (TTMAX == 4 || mt <= 32) kiln::gemm_rows_tile<bf, bf, true, 4, RT, PF>(A, W, W, R, C, M, N, K, m0, n0, red);
      else if constexpr (TTMAX >= 8) {
        if (TTMAX == 8 || mt <= 64) kiln::gemm_rows_tile<bf, bf, true, 8, RT, PF>(A, W, W, R, C, M, N, K, m0, n0, red);
        else if constexpr (TTMAX >= 16) kiln::gemm_rows_tile<bf, bf, true, 16, RT, PF>(A, W, W, R, C, M, N, K, m0, n0, red);
      }
    }
  }
}
typedef void (*Kern)(const bf*, const bf*, const bf*, bf*, int, int, int);
struct V { const char* name; Kern k; int ttmax, rt; };

int main() {
  V vs[] = {{"v1", kv<8, 2, 1>, 8, 2}, {"rt2pf2tt8", kv<8, 2, 2>, 8, 2},
            {"rt4pf1tt8", kv<8, 4, 1>, 8, 4}, {"rt2pf2tt16", kv<16, 2, 2>, 16, 2}, {"rt4pf2tt4", kv<4, 4, 2>, 4, 4},
            {"rt2pf2tt1", kv<1, 2, 2>, 1, 2}, {"rt2pf3tt1", kv<1, 2, 3>, 1, 2}, {"rt4pf2tt1", kv<1, 4, 2>, 1, 4},
            {"rt2pf2tt2", kv<2, 2, 2>, 2, 2}, {"rt2pf2tt4", kv<4, 2, 2>, 4, 2}};
  const int NV = sizeof(vs) / sizeof(vs[0]);
  int shapes[][2] = {{6144, 4096}, {28672, 4096}, {4096, 4096}, {4096, 14336}, {128256, 4096}, {77, 4128}};
  const int MMAX = 128;
  bool ok = true;
  for (auto& sh : shapes) {
    int N = sh[0], K = sh[1];
    bf *A, *W, *R, *C, *C0;
    CK(cudaMalloc(&A, (size_t)MMAX * K * 2)); CK(cudaMalloc(&W, (size_t)N * K * 2)); CK(cudaMalloc(&R, (size_t)MMAX * N * 2));
    CK(cudaMalloc(&C, (size_t)MMAX * N * 2)); CK(cudaMalloc(&C0, (size_t)MMAX * N * 2));
    k_fill<<<1024, 256>>>(A, (size_t)MMAX * K, 1, 1.f); k_fill<<<4096, 256>>>(W, (size_t)N * K, 2, 0.05f); k_fill<<<1024, 256>>>(R, (size_t)MMAX * N, 3, 1.f);
    std::vector<unsigned short> h0((size_t)MMAX * N), h1((size_t)MMAX * N);
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    for (int M : {1, 4, 8, 16, 32, 64, 128}) {
      printf("N=%6d K=%6d M=%4d:", N, K, M);
      for (int v = 0; v < NV; ++v) {
        dim3 grid((M + vs[v].ttmax * 8 - 1) / (vs[v].ttmax * 8), (N + vs[v].rt * 16 - 1) / (vs[v].rt * 16));
        vs[v].k<<<grid, 256>>>(A, W, R, v == 0 ? C0 : C, M, N, K);
        CK(cudaDeviceSynchronize());
        if (v == 0) CK(cudaMemcpy(h0.data(), C0, (size_t)M * N * 2, cudaMemcpyDeviceToHost));
        else {
          CK(cudaMemcpy(h1.data(), C, (size_t)M * N * 2, cudaMemcpyDeviceToHost));
          for (size_t i = 0; i < (size_t)M * N; ++i) if (h0[i] != h1[i]) { ok = false; printf(" [%s differs at %zu]", vs[v].name, i); break; }
        }
        for (int i = 0; i < 3; ++i) vs[v].k<<<grid, 256>>>(A, W, R, C, M, N, K);
        int it = 20; cudaEventRecord(e0);
        for (int i = 0; i < it; ++i) vs[v].k<<<grid, 256>>>(A, W, R, C, M, N, K);
        cudaEventRecord(e1); cudaEventSynchronize(e1); float ms; cudaEventElapsedTime(&ms, e0, e1); ms /= it;
        printf("  %s %7.1fus %5.0fGB/s", vs[v].name, ms * 1e3, (double)N * K * 2 / ms / 1e6);
      }
      printf("\n");
    }
    CK(cudaGetLastError());
    cudaFree(A); cudaFree(W); cudaFree(R); cudaFree(C); cudaFree(C0);
  }
  printf(ok ? "ALL BIT-EQUAL\n" : "DIFFER\n");
  return 0;
}
