// CPU append: token i of k/v [n, Hk, D] -> slot token_pos[i] of node token_node[i], or flat slot
// slots[i] (dtype cast).
#include "convert.h"
#include "multiverse/cpu_kernels.h"
#include "multiverse/index_math.h"
#include "parallel.h"

namespace multiverse::cpu {
namespace {

template <class S, class C>
void append_impl(const AppendParams& p) {
  const auto* k = static_cast<const typename S::T*>(p.k);
  const auto* v = static_cast<const typename S::T*>(p.v);
  auto* kc = static_cast<typename C::T*>(p.k_cache);
  auto* vc = static_cast<typename C::T*>(p.v_cache);
  parallel_for(p.num_tokens, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (p.slots != nullptr && p.slots[i] < 0) continue;  // padding
      for (int h = 0; h < p.num_kv_heads; ++h) {
        const int64_t ko = append_offset(p, i, h, false), vo = append_offset(p, i, h, true);
        const auto* ks = k + i * p.k_stride_tok + h * p.k_stride_head;
        const auto* vs = v + i * p.v_stride_tok + h * p.v_stride_head;
        for (int d = 0; d < p.head_dim; ++d) kc[ko + d] = C::store(S::load(ks[d]));
        for (int d = 0; d < p.head_dim; ++d) vc[vo + d] = C::store(S::load(vs[d]));
      }
    }
  });
}

template <class S>
void dispatch_cache(const AppendParams& p) {
  switch (p.cache_dtype) {
    case DType::kFloat32: append_impl<S, F32>(p); break;
    case DType::kFloat16: append_impl<S, F16>(p); break;
    case DType::kBFloat16: append_impl<S, BF16>(p); break;
    default: break;  // fp8: the cpu backend appends to fp8 caches with the reference
  }
}

}  // namespace

void append_paged_kv(const AppendParams& p) {
  switch (p.src_dtype) {
    case DType::kFloat32: dispatch_cache<F32>(p); break;
    case DType::kFloat16: dispatch_cache<F16>(p); break;
    case DType::kBFloat16: dispatch_cache<BF16>(p); break;
    default: break;  // fp8: the cpu backend appends to fp8 caches with the reference
  }
}

}  // namespace multiverse::cpu
