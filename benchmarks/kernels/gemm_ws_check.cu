// kiln::gemm_ws / gemm_rows_ws (warp-specialised wgmma fed by TMA, sm_90a; gemm_ws persistent) on the GPU machine, standalone: correct
// against an fp64 reference and bit-equal to gemm_wg (same tile, same wgmma order); then TFLOP/s of both
// on the Llama-3-8B projection shapes (prompts) and us per call of the decode_batch rows (split K) at
// B = 16..256, with the split-K choices for B = 128.
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -Xptxas -v -o /tmp/gws benchmarks/kernels/gemm_ws_check.cu && /tmp/gws
#include "../../passes/kernels/cuda/common.cuh"
#include "../../passes/kernels/cuda/gemm.cuh"
#include "../../passes/kernels/cuda/gemm_rows.cuh"
#include "../../passes/kernels/cuda/gemm_wg.cuh"
#include "check_util.cuh"
#include <cmath>
#include <cstring>
#include <vector>
#include <algorithm>
using bf = __nv_bfloat16;
template <bool RES>
__global__ void __launch_bounds__(256, 1) kwg(const bf* A, const bf* B, const bf* R, bf* C, int M, int N, int K) {
  extern __shared__ __align__(16) unsigned char sm[];
  kiln::gemm_wg<bf, RES>(A, B, R, C, M, N, K, sm);
}
unsigned char* g_tmaps;  // WS_TMAP_BYTES per block of the largest grid
template <bool RES>
__global__ void __launch_bounds__(kiln::WS_THREADS, 1) kws(const bf* A, const bf* B, const bf* R, bf* C, int M, int N, int K, unsigned char* tm) {
  extern __shared__ __align__(16) unsigned char sm[];
  kiln::gemm_ws<bf, RES>(A, B, R, C, M, N, K, sm, tm);
}
__global__ void __launch_bounds__(256, 1) krwg(const bf* A, const bf* W, const bf* R, bf* C, float* ws, int M, int N, int K, int ks) {
  extern __shared__ __align__(16) unsigned char sm[];
  kiln::gemm_rows_wg<bf, bf, true>(A, W, R, C, ws, M, N, K, ks, sm);
}
__global__ void __launch_bounds__(kiln::WS_THREADS, 1) krws(const bf* A, const bf* W, const bf* R, bf* C, float* ws, int M, int N, int K, int ks,
                                                             unsigned char* tm) {
  extern __shared__ __align__(16) unsigned char sm[];
  kiln::gemm_rows_ws<bf, bf, true>(A, W, R, C, ws, M, N, K, ks, sm, tm);
}
__global__ void kred(const float* ws, const bf* R, bf* C, int M, int N, int ks) { kiln::gemm_rows_big_reduce<bf, bf, true>(ws, R, C, M, N, ks); }
int ksplit_wg(int N, int K) { int t = (N + 255) / 256, ks = 1; while (ks < 8 && t * ks * 2 <= 132 && K % (64 * ks * 2) == 0) ks *= 2; return ks; }
void rows(bool ws_kernel, const bf* A, const bf* W, const bf* R, bf* C, float* ws, int M, int N, int K, int ks) {
  dim3 grid((N + 255) / 256, (M + 127) / 128, ks);
  if (ws_kernel) krws<<<grid, kiln::WS_THREADS, kiln::GEMM_WS_SMEM_BYTES>>>(A, W, R, C, ws, M, N, K, ks, g_tmaps);
  else krwg<<<grid, 256, kiln::GEMM_WG_SMEM_BYTES>>>(A, W, R, C, ws, M, N, K, ks);
  if (ks > 1) kred<<<(unsigned)(((size_t)M * N + 255) / 256), 256>>>(ws, R, C, M, N, ks);
}
// gemm_ws is persistent: a 1-D grid of min(tiles, blocks) (132: one per SM of an H100 / H200 SXM)
void gemm(bool ws_kernel, const bf* A, const bf* B, const bf* R, bf* C, int M, int N, int K, bool res, int blocks = 132) {
  dim3 grid((N + 255) / 256, (M + 127) / 128);
  if (ws_kernel) {
    const int pg = std::min<int>(blocks, grid.x * grid.y);
    if (res) kws<true><<<pg, kiln::WS_THREADS, kiln::GEMM_WS_SMEM_BYTES>>>(A, B, R, C, M, N, K, g_tmaps);
    else kws<false><<<pg, kiln::WS_THREADS, kiln::GEMM_WS_SMEM_BYTES>>>(A, B, R, C, M, N, K, g_tmaps);
  } else {
    if (res) kwg<true><<<grid, 256, kiln::GEMM_WG_SMEM_BYTES>>>(A, B, R, C, M, N, K);
    else kwg<false><<<grid, 256, kiln::GEMM_WG_SMEM_BYTES>>>(A, B, R, C, M, N, K);
  }
}
int main() {
  CK(cudaMalloc(&g_tmaps, (size_t)kiln::WS_TMAP_BYTES * 65536));
  CK(cudaFuncSetAttribute(kws<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kiln::GEMM_WS_SMEM_BYTES));
  CK(cudaFuncSetAttribute(kws<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, kiln::GEMM_WS_SMEM_BYTES));
  CK(cudaFuncSetAttribute(krws, cudaFuncAttributeMaxDynamicSharedMemorySize, kiln::GEMM_WS_SMEM_BYTES));
  CK(cudaFuncSetAttribute(kwg<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kiln::GEMM_WG_SMEM_BYTES));
  CK(cudaFuncSetAttribute(kwg<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, kiln::GEMM_WG_SMEM_BYTES));
  CK(cudaFuncSetAttribute(krwg, cudaFuncAttributeMaxDynamicSharedMemorySize, kiln::GEMM_WG_SMEM_BYTES));
  bool ok = true;
  int cshapes[][3] = {{200, 6144, 4096}, {77, 320, 576}, {1, 256, 64}, {300, 4096, 14336}, {128, 200, 192}, {33, 333, 128}, {129, 256, 320},
                      {2100, 4096, 320}};  // the last: 17 x 16 tiles, two or three per persistent block
  for (auto& sh : cshapes) {
    int M = sh[0], N = sh[1], K = sh[2];
    bf *A, *W, *R, *C, *C2; float* Cr;
    CK(cudaMalloc(&A, (size_t)M * K * 2)); CK(cudaMalloc(&W, (size_t)N * K * 2)); CK(cudaMalloc(&R, (size_t)M * N * 2));
    CK(cudaMalloc(&C, (size_t)M * N * 2)); CK(cudaMalloc(&C2, (size_t)M * N * 2)); CK(cudaMalloc(&Cr, (size_t)M * N * 4));
    k_fill<<<1024, 256>>>(A, (size_t)M * K, 1, 1.f); k_fill<<<1024, 256>>>(W, (size_t)N * K, 2, 0.05f); k_fill<<<1024, 256>>>(R, (size_t)M * N, 3, 1.f);
    for (int res = 0; res < 2; ++res) {
      CK(cudaMemset(C, 0xFF, (size_t)M * N * 2)); CK(cudaMemset(C2, 0xEE, (size_t)M * N * 2));
      gemm(true, A, W, R, C, M, N, K, res, res ? 132 : 7);  // 7 blocks: many tiles each through one ring
      CK(cudaDeviceSynchronize());
      gemm(false, A, W, R, C2, M, N, K, res);
      k_ref<<<dim3((N + 127) / 128, M), 128>>>(A, W, R, Cr, M, N, K, res);
      CK(cudaDeviceSynchronize());
      std::vector<bf> h((size_t)M * N), h2((size_t)M * N); std::vector<float> hr((size_t)M * N);
      CK(cudaMemcpy(h.data(), C, h.size() * 2, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(h2.data(), C2, h2.size() * 2, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(hr.data(), Cr, hr.size() * 4, cudaMemcpyDeviceToHost));
      double md = 0, mx = 0;
      for (size_t i = 0; i < h.size(); ++i) { md = fmax(md, fabs((double)__bfloat162float(h[i]) - hr[i])); mx = fmax(mx, fabs(hr[i])); }
      const bool same = memcmp(h.data(), h2.data(), h.size() * 2) == 0;
      bool good = md <= 8e-3 * mx && std::isfinite(md) && same;
      ok &= good;
      printf("check gemm_ws M=%d N=%d K=%d res=%d: max|diff| %.3g of max %.3g (%.2e), bit-equal to gemm_wg: %s %s\n", M, N, K, res, md, mx,
             md / mx, same ? "yes" : "NO", good ? "ok" : "FAIL");
    }
    // split-K rows: bit-equal to gemm_rows_wg at the same ksplit
    for (int ks : {1, 2}) {
      if (K % (64 * ks)) continue;
      bf* ws_c; float* wsp; CK(cudaMalloc(&ws_c, (size_t)M * N * 2)); CK(cudaMalloc(&wsp, (size_t)ks * M * N * 4));
      rows(true, A, W, R, C, wsp, M, N, K, ks); rows(false, A, W, R, C2, wsp, M, N, K, ks);
      CK(cudaDeviceSynchronize());
      std::vector<bf> h((size_t)M * N), h2((size_t)M * N);
      CK(cudaMemcpy(h.data(), C, h.size() * 2, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(h2.data(), C2, h2.size() * 2, cudaMemcpyDeviceToHost));
      const bool same = memcmp(h.data(), h2.data(), h.size() * 2) == 0;
      ok &= same;
      printf("check rows_ws M=%d N=%d K=%d ks=%d: bit-equal to rows_wg: %s\n", M, N, K, ks, same ? "yes" : "NO (FAIL)");
      cudaFree(ws_c); cudaFree(wsp);
    }
    cudaFree(A); cudaFree(W); cudaFree(R); cudaFree(C); cudaFree(C2); cudaFree(Cr);
  }
  printf("%s\n", ok ? "ALL CHECKS OK" : "SOME CHECKS FAILED");
  int shapes[][2] = {{6144, 4096}, {4096, 4096}, {28672, 4096}, {4096, 14336}, {128256, 4096}};
  printf("prompt GEMM  %6s %7s %6s | %8s %8s | ws/wg speed\n", "M", "N", "K", "ws TF/s", "wg TF/s");
  for (auto& sh : shapes) for (int M : {128, 512, 2048, 8192}) {
    int N = sh[0], K = sh[1];
    if ((size_t)N * M > (size_t)600e6) continue;
    bf *A, *W, *C;
    CK(cudaMalloc(&A, (size_t)M * K * 2)); CK(cudaMalloc(&W, (size_t)N * K * 2)); CK(cudaMalloc(&C, (size_t)M * N * 2));
    k_fill<<<1024, 256>>>(A, (size_t)M * K, 1, 1.f); k_fill<<<4096, 256>>>(W, (size_t)N * K, 2, 0.05f);
    const float t0 = time_us([&]() { gemm(true, A, W, nullptr, C, M, N, K, false); }), t1 = time_us([&]() { gemm(false, A, W, nullptr, C, M, N, K, false); });
    const double fl = 2.0 * M * N * K;
    printf("prompt GEMM  %6d %7d %6d | %8.1f %8.1f | %5.2f  (ws %.1f us)\n", M, N, K, fl / t0 / 1e6, fl / t1 / 1e6, t1 / t0, t0);
    cudaFree(A); cudaFree(W); cudaFree(C);
  }
  printf("rows (decode_batch): N K | B: ws us / wg us at ksplit_wg; then B=128 ws at ks 1/2/4/8 (GB/s of weights)\n");
  for (auto& sh : shapes) {
    int N = sh[0], K = sh[1], MM = 256;
    bf *A, *W, *R, *C; float* wsp;
    CK(cudaMalloc(&A, (size_t)MM * K * 2)); CK(cudaMalloc(&W, (size_t)N * K * 2)); CK(cudaMalloc(&R, (size_t)MM * N * 2));
    CK(cudaMalloc(&C, (size_t)MM * N * 2)); CK(cudaMalloc(&wsp, (size_t)8 * MM * N * 4));
    k_fill<<<1024, 256>>>(A, (size_t)MM * K, 1, 1.f); k_fill<<<4096, 256>>>(W, (size_t)N * K, 2, 0.05f); k_fill<<<1024, 256>>>(R, (size_t)MM * N, 3, 1.f);
    const int ks = ksplit_wg(N, K);
    printf("rows %6d %6d ks %d |", N, K, ks);
    for (int M : {16, 32, 64, 128, 256}) {
      const float a = time_us([&]() { rows(true, A, W, R, C, wsp, M, N, K, ks); }), b = time_us([&]() { rows(false, A, W, R, C, wsp, M, N, K, ks); });
      printf(" %d: %.1f / %.1f", M, a, b);
    }
    printf(" | B=128:");
    for (int k2 : {1, 2, 4, 8}) {
      if (K % (64 * k2)) continue;
      const float a = time_us([&]() { rows(true, A, W, R, C, wsp, 128, N, K, k2); });
      printf(" ks%d %.1f (%.0f)", k2, a, (double)N * K * 2 / a / 1e3);
    }
    printf("\n");
    cudaFree(A); cudaFree(W); cudaFree(R); cudaFree(C); cudaFree(wsp);
  }
  return ok ? 0 : 1;
}
