// kiln::gemm_wg_q (prompt GEMM over 4-bit / int8 / e4m3 codes on wgmma), long prompts' dequant_weight + gemm_ws (the weight
// widened once, then the persistent bf16 kernel) and kiln::gemm_rows_wg_q (decode_batch over e4m3 codes) on the GPU machine,
// standalone: against an fp64 reference that decodes every code as the kernels do, dequant + gemm_ws bit-equal to gemm_wg_q,
// rows bit-equal across B, and time against each other, gemm_tn_q (WMMA) / the middle fp8 row kernel.
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -o /tmp/gwq benchmarks/kernels/gemm_wg_q_check.cu && /tmp/gwq
#include "../../passes/kernels/cuda/common.cuh"
#include "../../passes/kernels/cuda/attention_prefill.cuh"
#include "../../passes/kernels/cuda/gemm.cuh"
#include "../../passes/kernels/cuda/gemm_rows.cuh"
#include "../../passes/kernels/cuda/gemm_wg.cuh"
#include "check_util.cuh"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cmath>
#include <algorithm>
using bf = __nv_bfloat16;

template <int CODE, int G>
__global__ void __launch_bounds__(256, 1) kwq(const bf* A, const void* Q, const void* S, const void* Z, bf* C, int M, int N, int K) {
  extern __shared__ __align__(16) unsigned char sm[];
  kiln::gemm_wg_q<bf, CODE, G>(A, Q, S, Z, C, M, N, K, sm);
}
template <int CODE, int G>
__global__ void __launch_bounds__(256) kdq(const void* Q, const void* S, const void* Z, bf* W, int N, int K) {
  kiln::dequant_weight<bf, CODE, G>(Q, S, Z, W, N, K);
}
template <int CODE>
__global__ void __launch_bounds__(kiln::WS_THREADS, 1) kwsd(const bf* A, const bf* W, const void* S, bf* C, int M, int N, int K, unsigned char* tm) {
  extern __shared__ __align__(16) unsigned char sm[];
  kiln::gemm_ws<bf, false, CODE == 9 ? 9 : 0>(A, W, nullptr, C, M, N, K, sm, tm, static_cast<const float*>(S));
}
unsigned char* g_tmaps;  // WS_TMAP_BYTES per block of the persistent grid
template <int CODE, int G>
__global__ void __launch_bounds__(256) ktq(const bf* A, const void* Q, const void* S, const void* Z, bf* C, int M, int N, int K) {
  extern __shared__ __align__(16) unsigned char sm[];
  kiln::gemm_tn_q<bf, CODE, G>(A, Q, S, Z, C, M, N, K, sm);
}
template <typename OutT>
__global__ void __launch_bounds__(256, 1) krf8(const bf* A, const void* W, const void* S, OutT* C, float* ws, int M, int N, int K, int ks) {
  extern __shared__ __align__(16) unsigned char sm[];
  kiln::gemm_rows_wg_q<bf, OutT, 9, 8>(A, W, S, S, C, ws, M, N, K, ks, sm);
}
template <typename OutT>
__global__ void kred(const float* ws, OutT* C, int M, int N, int ks) { kiln::gemm_rows_big_reduce<bf, OutT, false>(ws, nullptr, C, M, N, ks); }
__global__ void __launch_bounds__(256) kmid8(const bf* A, const void* W, const void* S, bf* C, int M, int N, int K) {
  __shared__ float red[kiln::GROWS_RED_FLOATS];
  kiln::gemm_rows<bf, bf, false, 8, uint8_t>(A, W, S, A, C, M, N, K, red);
}
// the weight as the kernels see it (decoded per code, rounded to bf16 for 4 / 8; e4m3 exact, scale after)
__device__ double wdec(int code, int G, const uint8_t* Q, const __half* S, const __half* Z, int n, int k, int K) {
  if (code == 4) {
    const uint32_t w = reinterpret_cast<const uint32_t*>(Q + (size_t)n * K / 2)[k / 8];
    const int ng = K / G;
    const float v = fmaf((float)((w >> (4 * (k % 8))) & 0xF), __half2float(S[(size_t)n * ng + k / G]), __half2float(Z[(size_t)n * ng + k / G]));
    return __bfloat162float(__float2bfloat16_rn(v));
  }
  if (code == 8) {
    const int ng = K / G;
    const float v = (float)(int8_t)Q[(size_t)n * K + k] * __half2float(S[(size_t)n * ng + k / G]);
    return __bfloat162float(__float2bfloat16_rn(v));
  }
  return kiln::kv_decode<kiln::kKvFp8>(Q[(size_t)n * K + k]);
}
__global__ void k_ref(int code, int G, const bf* A, const uint8_t* Q, const void* S, const __half* Z, float* C, int M, int N, int K) {
  int n = blockIdx.x * blockDim.x + threadIdx.x, m = blockIdx.y;
  if (n >= N) return;
  double s = 0;
  for (int k = 0; k < K; ++k) s += (double)__bfloat162float(A[(size_t)m * K + k]) * wdec(code, G, Q, (const __half*)S, Z, n, k, K);
  if (code == 9) s *= ((const float*)S)[n];
  C[(size_t)m * N + n] = (float)s;
}
__global__ void k_bytes(uint8_t* p, size_t n, unsigned seed, bool fp8) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  for (; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)(i * 2654435761u) ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    uint8_t b = h >> 8;
    if (fp8 && (b & 0x7F) == 0x7F) b = 0;  // no NaN codes
    p[i] = b;
  }
}
__global__ void k_halves(__half* p, size_t n, unsigned seed, float lo, float hi) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  for (; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)(i * 2654435761u) ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    p[i] = __float2half(lo + (hi - lo) * ((h & 0xFFFF) / 65536.f));
  }
}
__global__ void k_floats(float* p, size_t n, unsigned seed) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  for (; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)(i * 2654435761u) ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    p[i] = 0.001f + 0.002f * ((h & 0xFFFF) / 65536.f);
  }
}

template <int CODE, int G>
bool prompt_case(int M, int N, int K, bool timing) {
  bf *A, *C, *C2; uint8_t* Q; void* S; __half* Z; float* Cr;
  size_t qbytes = CODE == 4 ? (size_t)N * K / 2 : (size_t)N * K;
  size_t ns = CODE == 9 ? (size_t)N : (size_t)N * (K / G);
  CK(cudaMalloc(&A, (size_t)M * K * 2)); CK(cudaMalloc(&C, (size_t)M * N * 2)); CK(cudaMalloc(&C2, (size_t)M * N * 2));
  CK(cudaMalloc(&Q, qbytes)); CK(cudaMalloc(&S, ns * 4)); CK(cudaMalloc(&Z, ns * 2)); CK(cudaMalloc(&Cr, (size_t)M * N * 4));
  k_fill<<<1024, 256>>>(A, (size_t)M * K, 1, 1.f); k_bytes<<<4096, 256>>>(Q, qbytes, 2, CODE == 9);
  if (CODE == 9) k_floats<<<256, 256>>>((float*)S, ns, 3); else { k_halves<<<256, 256>>>((__half*)S, ns, 3, 0.001f, 0.004f); k_halves<<<256, 256>>>(Z, ns, 4, -0.03f, 0.f); }
  const int smq = kiln::GEMM_WG_SMEM_BYTES, smt = kiln::QGEMM_SMEM_BYTES;
  CK(cudaFuncSetAttribute(kwq<CODE, G>, cudaFuncAttributeMaxDynamicSharedMemorySize, smq));
  CK(cudaFuncSetAttribute(ktq<CODE, G>, cudaFuncAttributeMaxDynamicSharedMemorySize, smt));
  dim3 grid((N + 255) / 256, (M + 127) / 128);
  auto wg = [&]() { kwq<CODE, G><<<grid, 256, smq>>>(A, Q, S, Z, C, M, N, K); };
  bf* Wd;
  CK(cudaMalloc(&Wd, (size_t)N * K * 2));
  CK(cudaFuncSetAttribute(kwsd<CODE>, cudaFuncAttributeMaxDynamicSharedMemorySize, kiln::GEMM_WS_SMEM_BYTES));
  auto dq = [&]() {  // what the artifact runs for a long prompt: widen the weight, then the persistent bf16 GEMM
    kdq<CODE, G><<<132 * 4, 256>>>(Q, S, Z, Wd, N, K);
    kwsd<CODE><<<std::min<int>(132, grid.x * grid.y), kiln::WS_THREADS, kiln::GEMM_WS_SMEM_BYTES>>>(A, Wd, S, C2, M, N, K, g_tmaps);
  };
  auto tn = [&]() { ktq<CODE, G><<<grid, 256, smt>>>(A, Q, S, Z, C2, M, N, K); };
  bool ok = true;
  if (!timing) {
    wg();
    k_ref<<<dim3((N + 127) / 128, M), 128>>>(CODE, G, A, Q, S, Z, Cr, M, N, K);
    CK(cudaDeviceSynchronize());
    std::vector<bf> h((size_t)M * N); std::vector<float> hr((size_t)M * N);
    CK(cudaMemcpy(h.data(), C, h.size() * 2, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(hr.data(), Cr, hr.size() * 4, cudaMemcpyDeviceToHost));
    double md = 0, mx = 0;
    for (size_t i = 0; i < h.size(); ++i) { md = fmax(md, fabs((double)__bfloat162float(h[i]) - hr[i])); mx = fmax(mx, fabs(hr[i])); }
    ok = md <= 8e-3 * mx && std::isfinite(md) && mx > 0;
    CK(cudaMemset(C2, 0xFF, (size_t)M * N * 2));
    dq();
    CK(cudaDeviceSynchronize());
    std::vector<bf> h2((size_t)M * N);
    CK(cudaMemcpy(h2.data(), C2, h2.size() * 2, cudaMemcpyDeviceToHost));
    const bool same = memcmp(h.data(), h2.data(), h.size() * 2) == 0;
    ok &= same;
    printf("prompt CODE=%d G=%4d M=%5d N=%6d K=%6d: %.2e of max %.3g, dequant + gemm_ws bit-equal to gemm_wg_q: %s %s\n", CODE, G, M, N, K, md / mx,
           mx, same ? "yes" : "NO", ok ? "ok" : "FAIL");
  } else {
    const float t[3] = {time_us(wg, 10), time_us(tn, 10), time_us(dq, 10)};
    double fl = 2.0 * M * N * K;
    printf("prompt CODE=%d G=%4d M=%5d N=%6d K=%6d: dequant+ws %7.1f us %6.1f TF/s | wg_q %7.1f us %6.1f TF/s | tn_q %6.1f TF/s | x%.2f\n", CODE,
           G, M, N, K, t[2], fl / t[2] / 1e6, t[0], fl / t[0] / 1e6, fl / t[1] / 1e6, t[0] / t[2]);
  }
  cudaFree(Wd);
  cudaFree(A); cudaFree(C); cudaFree(C2); cudaFree(Q); cudaFree(S); cudaFree(Z); cudaFree(Cr);
  return ok;
}

template <int CODE, int G>
__global__ void __launch_bounds__(256, 1) krq(const bf* A, const void* W, const void* S, const void* Z, bf* C, float* ws, int M, int N, int K, int ks) {
  extern __shared__ __align__(16) unsigned char sm[];
  kiln::gemm_rows_wg_q<bf, bf, CODE, G>(A, W, S, Z, C, ws, M, N, K, ks, sm);
}
int ksplit_wg(int N, int K);
// a short prompt over 4-bit / int8 codes through the split-K kernel, against the reference
template <int CODE, int G>
bool split_case(int M, int N, int K) {
  bf *A, *C; uint8_t* Q; __half *S, *Z; float *Cr, *ws;
  size_t qbytes = CODE == 4 ? (size_t)N * K / 2 : (size_t)N * K, ns = (size_t)N * (K / G);
  CK(cudaMalloc(&A, (size_t)M * K * 2)); CK(cudaMalloc(&C, (size_t)M * N * 2)); CK(cudaMalloc(&Q, qbytes));
  CK(cudaMalloc(&S, ns * 2)); CK(cudaMalloc(&Z, ns * 2)); CK(cudaMalloc(&Cr, (size_t)M * N * 4)); CK(cudaMalloc(&ws, (size_t)8 * M * N * 4));
  k_fill<<<1024, 256>>>(A, (size_t)M * K, 1, 1.f); k_bytes<<<4096, 256>>>(Q, qbytes, 2, false);
  k_halves<<<256, 256>>>(S, ns, 3, 0.001f, 0.004f); k_halves<<<256, 256>>>(Z, ns, 4, -0.03f, 0.f);
  const int sm = kiln::GEMM_WG_SMEM_BYTES, ks = ksplit_wg(N, K);
  CK(cudaFuncSetAttribute(krq<CODE, G>, cudaFuncAttributeMaxDynamicSharedMemorySize, sm));
  krq<CODE, G><<<dim3((N + 255) / 256, (M + 127) / 128, ks), 256, sm>>>(A, Q, S, Z, C, ws, M, N, K, ks);
  if (ks > 1) kred<bf><<<(unsigned)(((size_t)M * N + 255) / 256), 256>>>(ws, C, M, N, ks);
  k_ref<<<dim3((N + 127) / 128, M), 128>>>(CODE, G, A, Q, S, Z, Cr, M, N, K);
  CK(cudaDeviceSynchronize());
  std::vector<bf> h((size_t)M * N); std::vector<float> hr((size_t)M * N);
  CK(cudaMemcpy(h.data(), C, h.size() * 2, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(hr.data(), Cr, hr.size() * 4, cudaMemcpyDeviceToHost));
  double md = 0, mx = 0;
  for (size_t i = 0; i < h.size(); ++i) { md = fmax(md, fabs((double)__bfloat162float(h[i]) - hr[i])); mx = fmax(mx, fabs(hr[i])); }
  bool ok = md <= 8e-3 * mx && std::isfinite(md) && mx > 0;
  printf("split CODE=%d G=%d M=%d N=%d K=%d ks=%d: %.2e of max %s\n", CODE, G, M, N, K, ks, md / mx, ok ? "ok" : "FAIL");
  cudaFree(A); cudaFree(C); cudaFree(Q); cudaFree(S); cudaFree(Z); cudaFree(Cr); cudaFree(ws);
  return ok;
}

int ksplit_wg(int N, int K) { int t = (N + 255) / 256, ks = 1; while (ks < 8 && t * ks * 2 <= 132 && K % (64 * ks * 2) == 0) ks *= 2; return ks; }

bool rows_case(int N, int K) {
  const int MM = 256;
  bf *A, *C, *C2; uint8_t* Q; float *S, *Cr, *ws;
  CK(cudaMalloc(&A, (size_t)MM * K * 2)); CK(cudaMalloc(&C, (size_t)MM * N * 2)); CK(cudaMalloc(&C2, (size_t)MM * N * 2));
  CK(cudaMalloc(&Q, (size_t)N * K)); CK(cudaMalloc(&S, (size_t)N * 4)); CK(cudaMalloc(&Cr, (size_t)MM * N * 4)); CK(cudaMalloc(&ws, (size_t)8 * MM * N * 4));
  k_fill<<<1024, 256>>>(A, (size_t)MM * K, 1, 1.f); k_bytes<<<4096, 256>>>(Q, (size_t)N * K, 2, true); k_floats<<<256, 256>>>(S, N, 3);
  const int sm = kiln::GEMM_WG_SMEM_BYTES, ks = ksplit_wg(N, K);
  CK(cudaFuncSetAttribute(krf8<bf>, cudaFuncAttributeMaxDynamicSharedMemorySize, sm));
  auto rows = [&](bf* out, int M) {
    krf8<bf><<<dim3((N + 255) / 256, (M + 127) / 128, ks), 256, sm>>>(A, Q, S, out, ws, M, N, K, ks);
    if (ks > 1) kred<bf><<<(unsigned)(((size_t)M * N + 255) / 256), 256>>>(ws, out, M, N, ks);
  };
  rows(C2, MM);
  k_ref<<<dim3((N + 127) / 128, MM), 128>>>(9, 8, A, Q, S, nullptr, Cr, MM, N, K);
  CK(cudaDeviceSynchronize());
  std::vector<bf> h((size_t)MM * N), h2((size_t)MM * N); std::vector<float> hr((size_t)MM * N);
  CK(cudaMemcpy(h2.data(), C2, h2.size() * 2, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(hr.data(), Cr, hr.size() * 4, cudaMemcpyDeviceToHost));
  double md = 0, mx = 0;
  for (size_t i = 0; i < h2.size(); ++i) { md = fmax(md, fabs((double)__bfloat162float(h2[i]) - hr[i])); mx = fmax(mx, fabs(hr[i])); }
  bool ok = md <= 8e-3 * mx && std::isfinite(md);
  for (int M : {9, 65, 128}) {
    rows(C, M);
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(h.data(), C, (size_t)M * N * 2, cudaMemcpyDeviceToHost));
    ok &= memcmp(h.data(), h2.data(), (size_t)M * N * 2) == 0;
  }
  printf("rows f8 N=%6d K=%6d ks=%d: %.2e of max, B = 9/65/128 bit-equal to 256: %s |", N, K, ks, md / mx, ok ? "ok" : "FAIL");
  for (int M : {16, 64, 128}) {
    const float t[2] = {time_us([&]() { rows(C, M); }),
                        time_us([&]() { kmid8<<<dim3((M + 63) / 64, (N + 31) / 32), 256>>>(A, Q, S, C, M, N, K); })};
    printf(" B=%d: wg %.1f / mid %.1f us", M, t[0], t[1]);
  }
  printf("\n");
  cudaFree(A); cudaFree(C); cudaFree(C2); cudaFree(Q); cudaFree(S); cudaFree(Cr); cudaFree(ws);
  return ok;
}

int main() {
  CK(cudaMalloc(&g_tmaps, (size_t)kiln::WS_TMAP_BYTES * 132));
  bool ok = true;
  ok &= prompt_case<9, 4096>(200, 6144, 4096, false);  // (e4m3: G = K, one scale per row)
  ok &= prompt_case<4, 128>(200, 6144, 4096, false);
  ok &= prompt_case<4, 32>(77, 320, 576, false);
  ok &= prompt_case<8, 128>(300, 4096, 14336, false);
  ok &= prompt_case<8, 32>(1, 256, 64, false);
  ok &= prompt_case<9, 192>(128, 200, 192, false);
  ok &= split_case<4, 128>(100, 4096, 4096);
  ok &= split_case<4, 32>(1, 6144, 4096);
  ok &= split_case<8, 128>(256, 4096, 14336);
  ok &= prompt_case<4, 128>(2100, 4096, 320, false);  // two or three tiles per persistent block
  for (int M : {512, 2048}) {
    prompt_case<9, 4096>(M, 28672, 4096, true); prompt_case<9, 14336>(M, 4096, 14336, true);
    prompt_case<4, 128>(M, 28672, 4096, true); prompt_case<4, 128>(M, 4096, 14336, true);
    prompt_case<4, 128>(M, 6144, 4096, true); prompt_case<4, 128>(M, 4096, 4096, true);
    prompt_case<8, 128>(M, 28672, 4096, true); prompt_case<4, 32>(M, 28672, 4096, true);
  }
  for (auto sh : {std::pair<int, int>{6144, 4096}, {4096, 4096}, {28672, 4096}, {4096, 14336}, {128256, 4096}}) ok &= rows_case(sh.first, sh.second);
  printf(ok ? "ALL OK\n" : "SOME FAILED\n");
  return ok ? 0 : 1;
}
