// kiln::attn_prefill_fa2 (FlashAttention-2 on mma.sync) on the GPU machine, standalone: outputs and lse
// against an fp32 reference (ragged batches, causal with a cached prefix, non-causal, head_dim 64 and
// 128), and its time (TFLOP/s). Before it: the two-pass WMMA kernel, 768 us at 2048 causal (NOTES).
//   nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/apc benchmarks/kernels/attn_prefill_check.cu && /tmp/apc
#include "../../passes/kernels/cuda/common.cuh"
#include "../../passes/kernels/cuda/attention_prefill.cuh"
#include "check_util.cuh"
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cmath>
using bf = __nv_bfloat16;

template <int D, int NW>
__global__ void __launch_bounds__(32 * NW) k_fa2(const bf* q, const int* qi, const bf* k, const bf* v, const int* ki, bf* o, float* lse, int B, int H, int Hk, int causal, float sc) {
  extern __shared__ __align__(128) unsigned char sm[];
  kiln::attn_prefill_fa2<bf, D, NW>(q, qi, k, v, ki, o, lse, B, H, Hk, causal, sc, sm);
}
// reference: one thread per (query row, head); fp32, two passes
__global__ void k_ref(const bf* q, const int* qi, const bf* k, const bf* v, const int* ki, float* o, float* lse, int B, int H, int Hk, int D, int causal, float sc, int total) {
  int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= total * H) return;
  int row = idx / H, h = idx % H, b = 0;
  while (qi[b + 1] <= row) ++b;
  int r = row - qi[b], q_len = qi[b + 1] - qi[b], kv0 = ki[b], kv_len = ki[b + 1] - kv0, kh = h / (H / Hk);
  int end = causal ? min(kv_len, r + kv_len - q_len + 1) : kv_len;
  float m = -1e30f, l = 0.f;
  for (int j = 0; j < end; ++j) {
    float s = 0.f;
    for (int d = 0; d < D; ++d) s += __bfloat162float(q[((size_t)row * H + h) * D + d]) * __bfloat162float(k[((size_t)(kv0 + j) * Hk + kh) * D + d]);
    m = fmaxf(m, s * sc * 1.4426950408889634f);
  }
  for (int d = 0; d < D; ++d) o[((size_t)row * H + h) * D + d] = 0.f;
  for (int j = 0; j < end; ++j) {
    float s = 0.f;
    for (int d = 0; d < D; ++d) s += __bfloat162float(q[((size_t)row * H + h) * D + d]) * __bfloat162float(k[((size_t)(kv0 + j) * Hk + kh) * D + d]);
    float p = exp2f(s * sc * 1.4426950408889634f - m);
    l += p;
    for (int d = 0; d < D; ++d) o[((size_t)row * H + h) * D + d] += p * __bfloat162float(v[((size_t)(kv0 + j) * Hk + kh) * D + d]);
  }
  for (int d = 0; d < D; ++d) o[((size_t)row * H + h) * D + d] = l > 0 ? o[((size_t)row * H + h) * D + d] / l : 0.f;
  lse[(size_t)row * H + h] = l > 0 ? m + log2f(l) : -1e30f;
}

struct Case { std::vector<int> qlen, prefix; int H, Hk, causal; };

template <int D, int NW = 4>
bool run_case(const Case& c, bool timing, const char* name) {
  int B = c.qlen.size();
  std::vector<int> qi(B + 1, 0), ki(B + 1, 0);
  for (int b = 0; b < B; ++b) { qi[b + 1] = qi[b] + c.qlen[b]; ki[b + 1] = ki[b] + c.qlen[b] + c.prefix[b]; }
  int tq = qi[B], tk = ki[B], H = c.H, Hk = c.Hk;
  bf *q, *k, *v, *o; float *lse, *ro, *rl; int *dqi, *dki;
  CK(cudaMalloc(&q, (size_t)tq * H * D * 2)); CK(cudaMalloc(&k, (size_t)tk * Hk * D * 2)); CK(cudaMalloc(&v, (size_t)tk * Hk * D * 2));
  CK(cudaMalloc(&o, (size_t)tq * H * D * 2)); CK(cudaMalloc(&lse, (size_t)tq * H * 4));
  CK(cudaMalloc(&dqi, (B + 1) * 4)); CK(cudaMalloc(&dki, (B + 1) * 4));
  CK(cudaMemcpy(dqi, qi.data(), (B + 1) * 4, cudaMemcpyHostToDevice)); CK(cudaMemcpy(dki, ki.data(), (B + 1) * 4, cudaMemcpyHostToDevice));
  k_fill<<<1024, 256>>>(q, (size_t)tq * H * D, 1, 1.f); k_fill<<<1024, 256>>>(k, (size_t)tk * Hk * D, 2, 1.f); k_fill<<<1024, 256>>>(v, (size_t)tk * Hk * D, 3, 1.f);
  const float sc = 1.f / sqrtf((float)D);
  const int smem = kiln::attn_fa2_smem_bytes<D, NW>();
  CK(cudaFuncSetAttribute(k_fa2<D, NW>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  dim3 grid((tq + 16 * NW - 1) / (16 * NW) + B, H);
  auto fa2 = [&]() { k_fa2<D, NW><<<grid, 32 * NW, smem>>>(q, dqi, k, v, dki, o, lse, B, H, Hk, c.causal, sc); };
  fa2();
  CK(cudaDeviceSynchronize());
  bool ok = true;
  if (!timing) {
    CK(cudaMalloc(&ro, (size_t)tq * H * D * 4)); CK(cudaMalloc(&rl, (size_t)tq * H * 4));
    k_ref<<<(tq * H + 127) / 128, 128>>>(q, dqi, k, v, dki, ro, rl, B, H, Hk, D, c.causal, sc, tq);
    CK(cudaDeviceSynchronize());
    std::vector<bf> ho((size_t)tq * H * D); std::vector<float> hr((size_t)tq * H * D), hl(tq * H), hrl(tq * H);
    CK(cudaMemcpy(ho.data(), o, ho.size() * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hr.data(), ro, hr.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hl.data(), lse, hl.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hrl.data(), rl, hrl.size() * 4, cudaMemcpyDeviceToHost));
    double e = 0, mx = 0, el = 0;
    for (size_t i = 0; i < hr.size(); ++i) { e = fmax(e, fabs(__bfloat162float(ho[i]) - hr[i])); mx = fmax(mx, fabs(hr[i])); }
    for (size_t i = 0; i < hl.size(); ++i) el = fmax(el, fabs(hl[i] - hrl[i]));
    ok = e <= 2e-2 * mx && el <= 2e-2 && std::isfinite(e);
    printf("%-34s D=%3d NW=%d: out err %.2e of max %.2f, lse err %.2e %s\n", name, D, NW, e / mx, mx, el, ok ? "ok" : "FAIL");
    cudaFree(ro); cudaFree(rl);
  } else {
    const float t = time_us(fa2, 10);
    double fl = 0;
    for (int b = 0; b < B; ++b) {
      double ql = c.qlen[b], kl = ql + c.prefix[b];
      double pairs = c.causal ? ql * (kl - ql) + ql * (ql + 1) / 2 : ql * kl;
      fl += 4.0 * pairs * D * H;
    }
    printf("%-34s D=%3d NW=%d: fa2 %8.1f us %6.1f TF/s\n", name, D, NW, t, fl / t / 1e6);
  }
  cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(o); cudaFree(lse); cudaFree(dqi); cudaFree(dki);
  return ok;
}

int main() {
  bool ok = true;
  ok &= run_case<128>({{300}, {0}, 8, 2, 1}, false, "one seq 300, causal");
  ok &= run_case<128>({{100, 513, 64, 1}, {0, 37, 200, 5}, 8, 2, 1}, false, "ragged 4 seqs + prefix, causal");
  ok &= run_case<128>({{77, 130}, {10, 0}, 4, 4, 0}, false, "ragged non-causal, MHA");
  ok &= run_case<64>({{100, 513, 64}, {0, 37, 200}, 9, 3, 1}, false, "ragged + prefix, causal");
  ok &= run_case<64>({{1, 65}, {64, 0}, 8, 1, 1}, false, "one-token + MQA, causal");
  ok &= run_case<128, 8>({{100, 513, 64, 1}, {0, 37, 200, 5}, 8, 2, 1}, false, "ragged 4 seqs + prefix, causal");
  ok &= run_case<64, 8>({{1, 65}, {64, 0}, 8, 1, 1}, false, "one-token + MQA, causal");
  run_case<128, 8>({{2048}, {0}, 32, 8, 1}, true, "8B: 2048 causal");
  run_case<128, 8>({{8192}, {0}, 32, 8, 1}, true, "8B: 8192 causal");
  run_case<128, 8>({std::vector<int>(16, 128), std::vector<int>(16, 0), 32, 8, 1}, true, "8B: 16 x 128 causal (serving)");
  run_case<64, 8>({{2048}, {0}, 9, 3, 1}, true, "SmolLM2: 2048 causal");
  run_case<128>({{2048}, {0}, 32, 8, 1}, true, "8B: 2048 causal");
  run_case<128>({{8192}, {0}, 32, 8, 1}, true, "8B: 8192 causal");
  run_case<128>({std::vector<int>(16, 128), std::vector<int>(16, 0), 32, 8, 1}, true, "8B: 16 x 128 causal (serving)");
  run_case<128>({{1024}, {1024}, 32, 8, 1}, true, "8B: 1024 after 1024 cached");
  run_case<64>({{2048}, {0}, 9, 3, 1}, true, "SmolLM2: 2048 causal");
  printf(ok ? "ALL OK\n" : "SOME FAILED\n");
  return ok ? 0 : 1;
}
