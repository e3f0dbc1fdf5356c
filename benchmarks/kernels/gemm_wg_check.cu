// kiln::gemm_wg (wgmma, sm_90a) on the GPU machine, standalone: against an fp64 reference and
// against kiln::gemm_tn (WMMA) on the Llama-3-8B projection shapes, TFLOP/s; then gemm_rows_wg
// (decode_batch, B > 64, split K) against the reference, its rows bit-equal across B, and its time
// against gemm_rows_big.
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -o /tmp/gwg benchmarks/kernels/gemm_wg_check.cu && /tmp/gwg
// cuBLAS beside it: benchmarks/kernels/gemm_peer_torch.py (same shapes, torch.matmul) in the same device call.
#include "../../passes/kernels/cuda/common.cuh"
#include "../../passes/kernels/cuda/gemm.cuh"
#include "../../passes/kernels/cuda/gemm_rows.cuh"
#include "../../passes/kernels/cuda/gemm_wg.cuh"
#include "check_util.cuh"
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cmath>
#include <cstring>
using bf = __nv_bfloat16;
template <bool RES>
__global__ void __launch_bounds__(256, 1) kwg(const bf* A, const bf* B, const bf* R, bf* C, int M, int N, int K) {
  extern __shared__ __align__(16) unsigned char sm[];
  kiln::gemm_wg<bf, RES>(A, B, R, C, M, N, K, sm);
}
__global__ void __launch_bounds__(256) ktn(const bf* A, const bf* B, const bf* R, bf* C, int M, int N, int K) {
  extern __shared__ __align__(16) unsigned char sm[];
  kiln::gemm_tn<bf, false>(A, B, R, C, M, N, K, sm);
}
template <typename OutT>
__global__ void __launch_bounds__(256, 1) krwg(const bf* A, const bf* W, const bf* R, OutT* C, float* ws, int M, int N, int K, int ks) {
  extern __shared__ __align__(16) unsigned char sm[];
  kiln::gemm_rows_wg<bf, OutT, true>(A, W, R, C, ws, M, N, K, ks, sm);
}
template <typename OutT>
__global__ void kred(const float* ws, const bf* R, OutT* C, int M, int N, int ks) { kiln::gemm_rows_big_reduce<bf, OutT, true>(ws, R, C, M, N, ks); }
__global__ void __launch_bounds__(256) kbig(const bf* A, const bf* W, const bf* R, bf* C, float* ws, int M, int N, int K, int ks) {
  extern __shared__ __align__(16) unsigned char sm[];
  kiln::gemm_rows_big<bf, bf, true>(A, W, R, C, ws, M, N, K, ks, sm);
}
int ksplit_big(int N, int K) { int t = (N + 127) / 128, ks = 1; while (t * ks < 120 && ks < 8 && K % (64 * ks * 2) == 0) ks *= 2; return ks; }
// passes/kernels/gemm_cuda.py rows_wg_ksplit: the most K ranges that keep the blocks within one wave of 132 SMs
int ksplit_wg(int N, int K) { int t = (N + 255) / 256, ks = 1; while (ks < 8 && t * ks * 2 <= 132 && K % (64 * ks * 2) == 0) ks *= 2; return ks; }
template <typename OutT>
void rows_wg(const bf* A, const bf* W, const bf* R, OutT* C, float* ws, int M, int N, int K) {
  int ks = ksplit_wg(N, K);
  krwg<OutT><<<dim3((N + 255) / 256, (M + 127) / 128, ks), 256, kiln::GEMM_WG_SMEM_BYTES>>>(A, W, R, C, ws, M, N, K, ks);
  if (ks > 1) kred<OutT><<<(unsigned)(((size_t)M * N + 255) / 256), 256>>>(ws, R, C, M, N, ks);
}
__global__ void __launch_bounds__(256) kmid(const bf* A, const bf* W, const bf* R, bf* C, int M, int N, int K) {
  __shared__ float red[kiln::GROWS_RED_FLOATS];
  kiln::gemm_rows<bf, bf, true, 8>(A, W, W, R, C, M, N, K, red);
}
void rows_big(const bf* A, const bf* W, const bf* R, bf* C, float* ws, int M, int N, int K) {
  int ks = ksplit_big(N, K);
  kbig<<<dim3((M + 127) / 128, (N + 127) / 128, ks), 256, kiln::GBIG_SMEM_BYTES>>>(A, W, R, C, ws, M, N, K, ks);
  if (ks > 1) kred<bf><<<(unsigned)(((size_t)M * N + 255) / 256), 256>>>(ws, R, C, M, N, ks);
}
void wg(const bf* A, const bf* B, const bf* R, bf* C, int M, int N, int K, bool res) {
  dim3 grid((N + 255) / 256, (M + 127) / 128);
  if (res) kwg<true><<<grid, 256, kiln::GEMM_WG_SMEM_BYTES>>>(A, B, R, C, M, N, K);
  else kwg<false><<<grid, 256, kiln::GEMM_WG_SMEM_BYTES>>>(A, B, R, C, M, N, K);
}
void tn(const bf* A, const bf* B, bf* C, int M, int N, int K) {
  ktn<<<dim3((N + 255) / 256, (M + 127) / 128), 256, kiln::GEMM_SMEM_BYTES>>>(A, B, C, C, M, N, K);
}
int main() {
  CK(cudaFuncSetAttribute(kwg<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, kiln::GEMM_WG_SMEM_BYTES));
  CK(cudaFuncSetAttribute(kwg<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, kiln::GEMM_WG_SMEM_BYTES));
  CK(cudaFuncSetAttribute(ktn, cudaFuncAttributeMaxDynamicSharedMemorySize, kiln::GEMM_SMEM_BYTES));
  CK(cudaFuncSetAttribute(krwg<bf>, cudaFuncAttributeMaxDynamicSharedMemorySize, kiln::GEMM_WG_SMEM_BYTES));
  CK(cudaFuncSetAttribute(krwg<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, kiln::GEMM_WG_SMEM_BYTES));
  CK(cudaFuncSetAttribute(kbig, cudaFuncAttributeMaxDynamicSharedMemorySize, kiln::GBIG_SMEM_BYTES));
  bool ok = true;
  // correctness: odd M / N (zero-fill and edges), residual on and off
  int cshapes[][3] = {{200, 6144, 4096}, {77, 320, 576}, {1, 256, 64}, {300, 4096, 14336}, {128, 200, 192}, {33, 333, 128}};
  for (auto& sh : cshapes) {
    int M = sh[0], N = sh[1], K = sh[2];
    bf *A, *W, *R, *C; float* Cr;
    CK(cudaMalloc(&A, (size_t)M * K * 2)); CK(cudaMalloc(&W, (size_t)N * K * 2)); CK(cudaMalloc(&R, (size_t)M * N * 2));
    CK(cudaMalloc(&C, (size_t)M * N * 2)); CK(cudaMalloc(&Cr, (size_t)M * N * 4));
    k_fill<<<1024, 256>>>(A, (size_t)M * K, 1, 1.f); k_fill<<<1024, 256>>>(W, (size_t)N * K, 2, 0.05f); k_fill<<<1024, 256>>>(R, (size_t)M * N, 3, 1.f);
    for (int res = 0; res < 2; ++res) {
      CK(cudaMemset(C, 0xFF, (size_t)M * N * 2));
      wg(A, W, R, C, M, N, K, res);
      k_ref<<<dim3((N + 127) / 128, M), 128>>>(A, W, R, Cr, M, N, K, res);
      CK(cudaDeviceSynchronize());
      std::vector<bf> h((size_t)M * N); std::vector<float> hr((size_t)M * N);
      CK(cudaMemcpy(h.data(), C, h.size() * 2, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(hr.data(), Cr, hr.size() * 4, cudaMemcpyDeviceToHost));
      double md = 0, mx = 0;
      for (size_t i = 0; i < h.size(); ++i) { md = fmax(md, fabs((double)__bfloat162float(h[i]) - hr[i])); mx = fmax(mx, fabs(hr[i])); }
      bool good = md <= 8e-3 * mx && std::isfinite(md);
      ok &= good;
      printf("check M=%d N=%d K=%d res=%d: max|diff| %.3g of max %.3g (%.2e) %s\n", M, N, K, res, md, mx, md / mx, good ? "ok" : "FAIL");
    }
    cudaFree(A); cudaFree(W); cudaFree(R); cudaFree(C); cudaFree(Cr);
  }
  // speed
  int shapes[][2] = {{6144, 4096}, {4096, 4096}, {28672, 4096}, {4096, 14336}, {128256, 4096}};
  int Ms[] = {128, 512, 2048, 8192};
  printf("%6s %7s %6s | %9s %9s | wg/tn\n", "M", "N", "K", "wg TF/s", "tn TF/s");
  for (auto& sh : shapes) for (int M : Ms) {
    int N = sh[0], K = sh[1];
    if ((size_t)N * M > (size_t)600e6) continue;
    bf *A, *W, *C;
    CK(cudaMalloc(&A, (size_t)M * K * 2)); CK(cudaMalloc(&W, (size_t)N * K * 2)); CK(cudaMalloc(&C, (size_t)M * N * 2));
    k_fill<<<1024, 256>>>(A, (size_t)M * K, 1, 1.f); k_fill<<<4096, 256>>>(W, (size_t)N * K, 2, 0.05f);
    const float t[2] = {time_us([&]() { wg(A, W, nullptr, C, M, N, K, false); }), time_us([&]() { tn(A, W, C, M, N, K); })};
    double fl = 2.0 * M * N * K;
    printf("%6d %7d %6d | %9.1f %9.1f | %5.2f   (wg %.1f us)\n", M, N, K, fl / t[0] / 1e6, fl / t[1] / 1e6, t[1] / t[0], t[0]);
    cudaFree(A); cudaFree(W); cudaFree(C);
  }
  // decode_batch rows: correctness (bf16 and fp32 out), rows of B = 65 / 128 / 200 bit-equal to B = 256, time vs gemm_rows_big
  int rshapes[][2] = {{6144, 4096}, {4096, 4096}, {28672, 4096}, {4096, 14336}, {128256, 4096}, {200, 192}, {1027, 512}};
  printf("rows: %7s %6s %3s | B: us wg / us big / us mid\n", "N", "K", "ks");
  for (auto& sh : rshapes) {
    int N = sh[0], K = sh[1], MM = 256;
    bf *A, *W, *R, *C, *C2; float *ws, *Cr, *Cf;
    CK(cudaMalloc(&A, (size_t)MM * K * 2)); CK(cudaMalloc(&W, (size_t)N * K * 2)); CK(cudaMalloc(&R, (size_t)MM * N * 2));
    CK(cudaMalloc(&C, (size_t)MM * N * 2)); CK(cudaMalloc(&C2, (size_t)MM * N * 2)); CK(cudaMalloc(&Cr, (size_t)MM * N * 4));
    CK(cudaMalloc(&Cf, (size_t)MM * N * 4)); CK(cudaMalloc(&ws, (size_t)8 * MM * N * 4));
    k_fill<<<1024, 256>>>(A, (size_t)MM * K, 1, 1.f); k_fill<<<4096, 256>>>(W, (size_t)N * K, 2, 0.05f); k_fill<<<1024, 256>>>(R, (size_t)MM * N, 3, 1.f);
    rows_wg<bf>(A, W, R, C2, ws, MM, N, K);
    rows_wg<float>(A, W, R, Cf, ws, MM, N, K);
    k_ref<<<dim3((N + 127) / 128, MM), 128>>>(A, W, R, Cr, MM, N, K, 1);
    CK(cudaDeviceSynchronize());
    std::vector<bf> h2((size_t)MM * N), h((size_t)MM * N); std::vector<float> hr((size_t)MM * N), hf((size_t)MM * N);
    CK(cudaMemcpy(h2.data(), C2, h2.size() * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hr.data(), Cr, hr.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hf.data(), Cf, hf.size() * 4, cudaMemcpyDeviceToHost));
    double md = 0, mdf = 0, mx = 0;
    for (size_t i = 0; i < h2.size(); ++i) {
      md = fmax(md, fabs((double)__bfloat162float(h2[i]) - hr[i])); mdf = fmax(mdf, fabs((double)hf[i] - hr[i])); mx = fmax(mx, fabs(hr[i]));
    }
    bool good = md <= 8e-3 * mx && mdf <= 1e-4 * mx && std::isfinite(md) && std::isfinite(mdf);
    for (int M : {65, 128, 200}) {
      CK(cudaMemset(C, 0xFF, (size_t)MM * N * 2));
      rows_wg<bf>(A, W, R, C, ws, M, N, K);
      CK(cudaDeviceSynchronize());
      CK(cudaMemcpy(h.data(), C, (size_t)M * N * 2, cudaMemcpyDeviceToHost));
      good &= memcmp(h.data(), h2.data(), (size_t)M * N * 2) == 0;
    }
    ok &= good;
    printf("rows: %7d %6d %3d | bf16 %.2e fp32 %.2e of max, B = 65/128/200 bit-equal to 256: %s |", N, K, ksplit_wg(N, K), md / mx, mdf / mx,
           good ? "ok" : "FAIL");
    for (int M : {16, 32, 48, 64, 65, 96, 128, 256}) {
      const float t[3] = {time_us([&]() { rows_wg<bf>(A, W, R, C, ws, M, N, K); }), time_us([&]() { rows_big(A, W, R, C, ws, M, N, K); }),
                          time_us([&]() { kmid<<<dim3((M + 63) / 64, (N + 31) / 32), 256>>>(A, W, R, C, M, N, K); })};
      printf(" %d: %.1f / %.1f / %.1f", M, t[0], t[1], t[2]);
    }
    printf("\n");
    cudaFree(A); cudaFree(W); cudaFree(R); cudaFree(C); cudaFree(C2); cudaFree(Cr); cudaFree(Cf); cudaFree(ws);
  }
  printf(ok ? "ALL OK\n" : "SOME FAILED\n");
  return ok ? 0 : 1;
}
