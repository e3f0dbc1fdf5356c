// kiln::attn_decode_partial (paged split-KV decode attention, attention_decode.cuh) on the GPU machine, standalone:
// checked against an fp32 reference on random pages, then us per call (and GB/s of K/V read) for the serving case --
// 128 sequences at a short context -- and a long single sequence, beside a variant with 2 query heads per block.
// H200, 2026-12-02 (results/attn_decode_check_h200-2026-12-02.txt, run with the variant since shipped as v2): one key
// per online-softmax update 51.6 / 39.1 / 76.6 / 85.9 / 63.8 us for the five cases below, two keys per update (now
// the kernel) 42.0 / 32.8 / 64.5 / 57.0 / 55.4 us; 2 query heads per block slower in both forms.
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -Xptxas -v -o /tmp/adc benchmarks/kernels/attn_decode_check.cu && /tmp/adc
#include "../../passes/kernels/cuda/common.cuh"
#include "../../passes/kernels/cuda/attention_decode.cuh"
#include "check_util.cuh"
#include <cmath>
#include <vector>
#include <algorithm>
#include <random>

using T = __nv_bfloat16;
constexpr int D = 128, HKV = 8, HQ = 32, G = 4, NW = 4, PS = 16, MERGE_GROUPS = 4;

template <int V>
__global__ void __launch_bounds__(NW * 32) k_partial(const T* q, const T* pages, const int* indptr, const int* values, const int* last,
                                                      float* ws, T* out, float* lse, int splits, float sm) {
  if constexpr (V == 1) kiln::attn_decode_partial<T, D, G, NW>(q, pages, indptr, values, last, ws, out, lse, HKV, 1, PS, splits, sm);
  else kiln::attn_decode_partial<T, D, G / 2, NW>(q, pages, indptr, values, last, ws, out, lse, HKV, 2, PS, splits, sm);
}

__global__ void k_merge(const float* ws, T* out, float* lse, int splits) { kiln::split_merge<T, D, D, MERGE_GROUPS>(ws, out, lse, splits); }

// fp32 reference: one block per (b, h); scores in shared memory
__global__ void k_ref_attn(const T* q, const T* pages, const int* indptr, const int* values, const int* last, float* out, float sm, int maxlen) {
  extern __shared__ float sc[];
  const int b = blockIdx.x / HQ, h = blockIdx.x % HQ, kvh = h / G;
  const int p0 = indptr[b], p1 = indptr[b + 1], len = (p1 - p0 - 1) * PS + last[b];
  for (int t = threadIdx.x; t < len; t += blockDim.x) {
    const T* k = pages + ((size_t)values[p0 + t / PS] * 2 * HKV + kvh) * PS * D + (t % PS) * D;
    float s = 0.f;
    for (int d = 0; d < D; ++d) s += __bfloat162float(q[((size_t)b * HQ + h) * D + d]) * __bfloat162float(k[d]);
    sc[t] = s * sm;
  }
  __syncthreads();
  __shared__ float mx, sum;
  if (threadIdx.x == 0) {
    mx = -1e30f;
    for (int t = 0; t < len; ++t) mx = fmaxf(mx, sc[t]);
    sum = 0.f;
    for (int t = 0; t < len; ++t) sum += expf(sc[t] - mx);
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
    for (int t = 0; t < len; ++t) {
      const T* v = pages + ((size_t)values[p0 + t / PS] * 2 * HKV + kvh) * PS * D + (size_t)HKV * PS * D + (t % PS) * D;
      o += expf(sc[t] - mx) * __bfloat162float(v[d]);
    }
    out[((size_t)b * HQ + h) * D + d] = o / sum;
  }
}

int splits_for(int B, int nnz_pages) {  // attention_cuda.py num_splits
  const int by_keys = (nnz_pages * PS + B * 32 - 1) / (B * 32), by_gpu = (528 + B * HKV - 1) / (B * HKV);
  return std::max(std::min(std::min(by_keys, by_gpu), 512), 1);
}

int main() {
  struct Case { int B, ctx; } cases[] = {{128, 192}, {128, 130}, {64, 512}, {16, 2048}, {1, 32768}};
  const float sm = 1.f / sqrtf((float)D);
  std::mt19937 rng(7);
  CK(cudaFuncSetAttribute(k_ref_attn, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  for (auto cs : cases) {
    const int B = cs.B, ctx = cs.ctx, ppseq = (ctx + PS - 1) / PS, nnz = B * ppseq, npages = nnz + 3;
    std::vector<int> indptr(B + 1), values(nnz), last(B), perm(npages);
    for (int i = 0; i < npages; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int b = 0; b <= B; ++b) indptr[b] = b * ppseq;
    for (int i = 0; i < nnz; ++i) values[i] = perm[i];
    for (int b = 0; b < B; ++b) last[b] = ctx - (ppseq - 1) * PS;
    T *q, *pages, *out;
    int *d_indptr, *d_values, *d_last;
    float *lse, *ref, *ws;
    const int splits = splits_for(B, nnz);
    const size_t page_elems = (size_t)npages * 2 * HKV * PS * D;
    CK(cudaMalloc(&q, (size_t)B * HQ * D * 2)); CK(cudaMalloc(&pages, page_elems * 2)); CK(cudaMalloc(&out, (size_t)B * HQ * D * 2));
    CK(cudaMalloc(&lse, (size_t)B * HQ * 4)); CK(cudaMalloc(&ref, (size_t)B * HQ * D * 4));
    CK(cudaMalloc(&ws, (size_t)B * HQ * splits * (D + 2) * 4 + 16));
    CK(cudaMalloc(&d_indptr, (B + 1) * 4)); CK(cudaMalloc(&d_values, nnz * 4)); CK(cudaMalloc(&d_last, B * 4));
    CK(cudaMemcpy(d_indptr, indptr.data(), (B + 1) * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_values, values.data(), nnz * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_last, last.data(), B * 4, cudaMemcpyHostToDevice));
    k_fill<<<1024, 256>>>(q, (size_t)B * HQ * D, 11, 1.f);
    k_fill<<<4096, 256>>>(pages, page_elems, 12, 1.f);
    k_ref_attn<<<B * HQ, 128, ctx * 4>>>(q, pages, d_indptr, d_values, d_last, ref, sm, ctx);
    CK(cudaDeviceSynchronize());
    std::vector<float> r((size_t)B * HQ * D);
    CK(cudaMemcpy(r.data(), ref, r.size() * 4, cudaMemcpyDeviceToHost));
    const double kv_gb = (double)B * ctx * HKV * D * 2 * 2 / 1e9;
    printf("B %d ctx %d (splits %d, %.1f MB of K/V)\n", B, ctx, splits, kv_gb * 1e3);
    for (int v = 1; v <= 2; ++v) {  // 1: the kernel as shipped (4 query heads per block); 2: 2 query heads per block
      auto run = [&] {
        const int nb = B * HKV * splits * v;
        if (v == 1) k_partial<1><<<nb, NW * 32>>>(q, pages, d_indptr, d_values, d_last, ws, out, lse, splits, sm);
        else k_partial<2><<<nb, NW * 32>>>(q, pages, d_indptr, d_values, d_last, ws, out, lse, splits, sm);
        if (splits > 1) k_merge<<<B * HQ, D * MERGE_GROUPS>>>(ws, out, lse, splits);
      };
      CK(cudaMemset(out, 0, (size_t)B * HQ * D * 2));
      run();
      CK(cudaDeviceSynchronize());
      std::vector<T> o((size_t)B * HQ * D);
      CK(cudaMemcpy(o.data(), out, o.size() * 2, cudaMemcpyDeviceToHost));
      double err = 0, mx = 0;
      for (size_t i = 0; i < o.size(); ++i) {
        err = std::max(err, (double)fabsf(__bfloat162float(o[i]) - r[i]));
        mx = std::max(mx, (double)fabsf(r[i]));
      }
      const float us = time_us(run, 50);
      printf("  v%d: max err %.3g (of max %.3g) %s  %8.2f us  %6.0f GB/s\n", v, err, mx, err <= 2e-2 * std::max(mx, 1e-3) + 4e-3 ? "ok" : "FAIL",
             us, kv_gb / (us * 1e-6));
    }
    cudaFree(q); cudaFree(pages); cudaFree(out); cudaFree(lse); cudaFree(ref); cudaFree(ws);
    cudaFree(d_indptr); cudaFree(d_values); cudaFree(d_last);
  }
  return 0;
}
