// Fused group advantages with Top-k filtering (SPEC §3.1), hand-written CUDA: one warp per group.
//
// Per group of G rewards (any G up to 32 * MAX_VPT):
//   V = finite rewards; rank_i = #{j in V : r_j > r_i or (r_j == r_i and j < i)}
//   S = V if top_k == 0 or 2k >= |V| else {i in V : rank_i < k or rank_i >= |V| - k}
//   T = S (stats_kept) or V; m, s over T in double (ddof 1 if unbiased; s = 0 if |T| < 2)
//   A_i = (r_i - m) / scale for i in S (scale = s + eps, or 1 for scale_mode 2), 0 elsewhere;
//   optional clip; drop_zero: s <= zero_tol -> A = 0, keep = false.
// Lane l holds samples l, l + 32, l + 64, ... (VPT slots); ranks come from broadcasting every
// sample through warp shuffles (G shuffles per lane), statistics from xor-shuffle reductions.
// The batch-std mode needs a grid-wide reduction and is served by the Triton kernel instead.

// Only the Tensor class and the one operator used (at::empty): ATen/ATen.h declares every operator and
// triples nvcc's time on the host pass.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename scalar_t, int VPT>
__global__ void group_advantages_kernel(const scalar_t* __restrict__ rewards, float* __restrict__ adv,
                                        bool* __restrict__ keep, float* __restrict__ mean_out,
                                        float* __restrict__ std_out, int64_t P, int G, int top_k,
                                        bool stats_kept, bool unbiased, int scale_mode, float eps, float clip,
                                        bool has_clip, bool drop_zero, float zero_tol) {
  const int lane = threadIdx.x % kWarp;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (g >= P) return;  // whole warp exits together
  const scalar_t* row = rewards + g * G;

  float r[VPT];
  bool valid[VPT];
  int n_valid = 0;
#pragma unroll
  for (int s = 0; s < VPT; ++s) {
    const int i = s * kWarp + lane;
    r[s] = i < G ? static_cast<float>(row[i]) : NAN;
    valid[s] = i < G && isfinite(r[s]);
    n_valid += valid[s];
  }
  n_valid = warp_sum(n_valid);

  bool kept[VPT];
#pragma unroll
  for (int s = 0; s < VPT; ++s) kept[s] = valid[s];
  if (top_k > 0 && 2 * top_k < n_valid) {
    int rank[VPT];
#pragma unroll
    for (int s = 0; s < VPT; ++s) rank[s] = 0;
#pragma unroll
    for (int js = 0; js < VPT; ++js) {
      for (int src = 0; src < kWarp; ++src) {
        const int j = js * kWarp + src;
        const float rj = __shfl_sync(0xffffffffu, r[js], src);
        const bool vj = __shfl_sync(0xffffffffu, valid[js], src);
        if (!vj) continue;
#pragma unroll
        for (int s = 0; s < VPT; ++s) {
          const int i = s * kWarp + lane;
          rank[s] += (rj > r[s]) || (rj == r[s] && j < i);
        }
      }
    }
#pragma unroll
    for (int s = 0; s < VPT; ++s) kept[s] = valid[s] && (rank[s] < top_k || rank[s] >= n_valid - top_k);
  }

  double sum = 0.0;
  int cnt = 0;
#pragma unroll
  for (int s = 0; s < VPT; ++s) {
    const bool t = stats_kept ? kept[s] : valid[s];
    sum += t ? static_cast<double>(r[s]) : 0.0;
    cnt += t;
  }
  sum = warp_sum(sum);
  cnt = warp_sum(cnt);
  const double m = sum / cnt;  // NaN for an empty group, as in the reference
  double ss = 0.0;
#pragma unroll
  for (int s = 0; s < VPT; ++s) {
    const bool t = stats_kept ? kept[s] : valid[s];
    const double d = t ? static_cast<double>(r[s]) - m : 0.0;
    ss += d * d;
  }
  ss = warp_sum(ss);
  const int denom = max(unbiased ? cnt - 1 : cnt, 1);
  const double sd = cnt >= 2 ? sqrt(ss / denom) : 0.0;
  const double scale = scale_mode == 0 ? sd + eps : 1.0;
  const bool flat = drop_zero && sd <= zero_tol;

#pragma unroll
  for (int s = 0; s < VPT; ++s) {
    const int i = s * kWarp + lane;
    if (i >= G) continue;
    double a = kept[s] ? (static_cast<double>(r[s]) - m) / scale : 0.0;
    if (has_clip) a = fmin(fmax(a, -static_cast<double>(clip)), static_cast<double>(clip));
    adv[g * G + i] = flat ? 0.f : static_cast<float>(a);
    keep[g * G + i] = kept[s] && !flat;
  }
  if (lane == 0) {
    mean_out[g] = static_cast<float>(m);
    std_out[g] = static_cast<float>(sd);
  }
}

template <typename scalar_t, int VPT>
void launch(const at::Tensor& r, at::Tensor& adv, at::Tensor& keep, at::Tensor& mean, at::Tensor& sd, int64_t top_k,
            bool stats_kept, bool unbiased, int64_t scale_mode, double eps, double clip, bool has_clip,
            bool drop_zero, double zero_tol) {
  const int64_t P = r.size(0);
  const int G = static_cast<int>(r.size(1));
  const dim3 block(kWarp * kWarpsPerBlock);
  const dim3 grid(static_cast<unsigned>((P + kWarpsPerBlock - 1) / kWarpsPerBlock));
  group_advantages_kernel<scalar_t, VPT><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      r.data_ptr<scalar_t>(), adv.data_ptr<float>(), keep.data_ptr<bool>(), mean.data_ptr<float>(),
      sd.data_ptr<float>(), P, G, static_cast<int>(top_k), stats_kept, unbiased, static_cast<int>(scale_mode),
      static_cast<float>(eps), static_cast<float>(clip), has_clip, drop_zero, static_cast<float>(zero_tol));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_advantages_cuda(
    const at::Tensor& rewards, int64_t top_k, bool stats_kept, bool unbiased, int64_t scale_mode, double eps,
    double clip, bool has_clip, bool drop_zero, double zero_tol) {
  TORCH_CHECK(rewards.is_cuda(), "rewards must be a CUDA tensor");
  TORCH_CHECK(rewards.dim() == 2, "rewards must be [P, G]");
  TORCH_CHECK(scale_mode == 0 || scale_mode == 2,
              "the native kernel supports std='group' and 'none'; std='batch' runs on the Triton kernel");
  const int64_t G = rewards.size(1);
  TORCH_CHECK(G >= 1 && G <= 32 * 32, "the native kernel supports 1 <= G <= 1024, got ", G);
  TORCH_CHECK(top_k >= 0 && top_k <= G, "top_k out of range");
  const c10::cuda::CUDAGuard guard(rewards.device());
  const at::Tensor r = rewards.contiguous();
  auto opts = r.options().dtype(at::kFloat);
  at::Tensor adv = at::empty({r.size(0), G}, opts);
  at::Tensor keep = at::empty({r.size(0), G}, opts.dtype(at::kBool));
  at::Tensor mean = at::empty({r.size(0)}, opts);
  at::Tensor sd = at::empty({r.size(0)}, opts);
  if (r.size(0) == 0) return {adv, keep, mean, sd};
  const int vpt = static_cast<int>((G + kWarp - 1) / kWarp);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "group_advantages_cuda", [&] {
    const auto go = [&](auto vpt_tag) {
      launch<scalar_t, decltype(vpt_tag)::value>(r, adv, keep, mean, sd, top_k, stats_kept, unbiased, scale_mode,
                                                 eps, clip, has_clip, drop_zero, zero_tol);
    };
    if (vpt <= 1) go(std::integral_constant<int, 1>{});
    else if (vpt <= 2) go(std::integral_constant<int, 2>{});
    else if (vpt <= 4) go(std::integral_constant<int, 4>{});
    else if (vpt <= 8) go(std::integral_constant<int, 8>{});
    else if (vpt <= 16) go(std::integral_constant<int, 16>{});
    else go(std::integral_constant<int, 32>{});
  });
  return {adv, keep, mean, sd};
}

}  // namespace

TORCH_LIBRARY(spatialcore, m) {
  m.def(
      "group_advantages(Tensor rewards, int top_k, bool stats_kept, bool unbiased, int scale_mode, float eps, "
      "float clip, bool has_clip, bool drop_zero, float zero_tol) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(spatialcore, CUDA, m) { m.impl("group_advantages", &group_advantages_cuda); }
