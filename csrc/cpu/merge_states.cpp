// CPU log-sum-exp merge of partial attention states (fp32 accumulation).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "convert.h"
#include "multiverse/cpu_kernels.h"
#include "parallel.h"

namespace multiverse::cpu {
namespace {

// Merge one row: states with lse -inf carry nothing (their values are never read, NaN or not); all
// empty (or no states) -> out 0, lse -inf; a NaN or +Inf lse -> out NaN, lse NaN.
template <class In, class Out>
void merge_rows(const MergeParams& p, int64_t b, int64_t e) {
  const int H = p.num_heads, D = p.head_dim;
  std::vector<float> acc(D);
  const auto* vin = static_cast<const typename In::T*>(p.partial_out_any);
  auto* out = static_cast<typename Out::T*>(p.out);
  for (int64_t idx = b; idx < e; ++idx) {
    const int64_t r = p.merge_rows != nullptr ? p.merge_rows[idx] : idx;
    if (r < 0) continue;  // capacity padding
    int32_t s_begin, s_end;
    if (p.row_partial_indices != nullptr) {
      s_begin = p.row_partial_indptr[r];
      s_end = p.row_partial_indptr[r + 1];
    } else {
      s_begin = static_cast<int32_t>(r * p.num_states);
      s_end = s_begin + p.num_states;
    }
    auto slot_of = [&](int32_t i) -> int64_t {
      return p.row_partial_indices != nullptr ? p.row_partial_indices[i] : i;
    };
    for (int h = 0; h < H; ++h) {
      float m = -std::numeric_limits<float>::infinity();
      bool bad = false;  // NaN policy (docs/errors.md): a NaN or +Inf lse makes the row NaN
      for (int32_t i = s_begin; i < s_end; ++i) {
        const float ls = p.partial_lse[slot_of(i) * H + h];
        if (std::isnan(ls) || ls == std::numeric_limits<float>::infinity()) bad = true;
        else m = std::max(m, ls);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float den = 0.0f;
      if (bad) {
        auto* dst = out + (r * H + h) * static_cast<int64_t>(D);
        for (int d = 0; d < D; ++d) dst[d] = Out::store(std::numeric_limits<float>::quiet_NaN());
        p.lse[r * H + h] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      if (std::isfinite(m)) {
        for (int32_t i = s_begin; i < s_end; ++i) {
          const int64_t sl = slot_of(i);
          const float ls = p.partial_lse[sl * H + h];
          if (ls == -std::numeric_limits<float>::infinity()) continue;
          const float w = std::exp(ls - m);
          den += w;
          const int64_t off = (sl * H + h) * D;
          if (p.partial_out != nullptr) {
            const float* src = p.partial_out + off;
            for (int d = 0; d < D; ++d) acc[d] += w * src[d];
          } else {
            const auto* src = vin + off;
            for (int d = 0; d < D; ++d) acc[d] += w * In::load(src[d]);
          }
        }
      }
      const float inv = den > 0.0f ? 1.0f / den : 0.0f;
      auto* dst = out + (r * H + h) * static_cast<int64_t>(D);
      for (int d = 0; d < D; ++d) dst[d] = Out::store(acc[d] * inv);
      p.lse[r * H + h] = den > 0.0f ? m + std::log(den) : -std::numeric_limits<float>::infinity();
    }
  }
}

template <class In>
void dispatch_out(const MergeParams& p) {
  parallel_for(p.num_rows, 16, [&](int64_t b, int64_t e) {
    switch (p.out_dtype) {
      case DType::kFloat32: merge_rows<In, F32>(p, b, e); break;
      case DType::kFloat16: merge_rows<In, F16>(p, b, e); break;
      case DType::kBFloat16: merge_rows<In, BF16>(p, b, e); break;
      default: break;  // fp8 is a KV-cache dtype only
    }
  });
}

}  // namespace

void merge_states(const MergeParams& p) {
  if (p.partial_out != nullptr) return dispatch_out<F32>(p);
  switch (p.v_dtype) {
    case DType::kFloat32: dispatch_out<F32>(p); break;
    case DType::kFloat16: dispatch_out<F16>(p); break;
    case DType::kBFloat16: dispatch_out<BF16>(p); break;
    default: break;  // fp8 is a KV-cache dtype only
  }
}

}  // namespace multiverse::cpu
