// Tiny-node absorption (see multiverse/absorb.h and multiverse_kernels/absorption.py). Sequential;
// O(nodes + list entries + output pages). Step for step the torch implementation (_absorb_torch),
// with its level-by-level decision replaced by one walk per chain (same values: a node's decision
// depends only on its predecessor's).
#include "multiverse/absorb.h"

#include <algorithm>
#include <stdexcept>

namespace multiverse {

namespace {
// int64 product that wraps like torch's int64 tensors instead of being undefined on overflow.
inline int64_t wrap_mul(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint64_t>(a) * static_cast<uint64_t>(b));
}
}  // namespace

bool absorb_tiny_nodes(const int32_t* node_page_indptr, const int32_t* node_page_indices,
                       const int32_t* node_len, int32_t num_nodes, const int32_t* qo_indptr,
                       const int32_t* vis_indptr, const int32_t* vis_nodes, int32_t num_groups,
                       int32_t page_size, int32_t group, int32_t head_dim, int32_t kv_elem_size,
                       int32_t max_absorbed_tokens, HostForest* out) {
  if (num_nodes < 0 || num_groups < 0) throw std::invalid_argument("num_nodes: expected non-negative sizes");
  if (page_size < 1) throw std::invalid_argument("page_size: expected a positive int");
  if (group < 1 || head_dim < 1 || kv_elem_size < 1)
    throw std::invalid_argument("group, head_dim, kv_elem_size: expected positive ints");
  if (max_absorbed_tokens < 0)
    throw std::invalid_argument("max_absorbed_tokens: expected a non-negative int");
  if (out == nullptr) throw std::invalid_argument("out: expected a HostForest to fill");
  const int32_t N = num_nodes, G = num_groups;
  const int32_t E = vis_indptr[G];
  if (N == 0 || E == 0) return false;
  const int32_t* L = node_len;
  const int32_t* vn = vis_nodes;
  const auto live = [&](int32_t g) { return qo_indptr[g + 1] - qo_indptr[g] > 0; };

  // pred(s) over the live lists: unique when its min and max agree (-1 = START); rows reading s.
  std::vector<int32_t> pmin(N, N + 1), pmax(N, -2);
  std::vector<int64_t> rows(N, 0);
  for (int32_t g = 0; g < G; ++g) {
    const int32_t q_len = qo_indptr[g + 1] - qo_indptr[g];
    for (int32_t e = vis_indptr[g]; e < vis_indptr[g + 1]; ++e) {
      const int32_t s = vn[e];
      if (s < 0 || s >= N) throw std::invalid_argument("vis_nodes: node id out of range");
      if (q_len <= 0) continue;
      const int32_t pred = e == vis_indptr[g] ? -1 : vn[e - 1];
      pmin[s] = std::min(pmin[s], pred);
      pmax[s] = std::max(pmax[s], pred);
      rows[s] += q_len;
    }
  }
  // head_pages[n]: the pages n contributes at the head of a chain, node_len / page_size when it fills
  // whole pages (node_len > 0 and a multiple of page_size), else -1 (it cannot precede a candidate).
  // Candidate edges p[s] -> s (p = pmin where cand), and per node n: k candidate successors, the rows
  // reading them, and whether n still ends a segment (last of a live list, or followed by a
  // non-candidate).
  std::vector<int32_t> head_pages(N);
  for (int32_t n = 0; n < N; ++n) head_pages[n] = L[n] > 0 && L[n] % page_size == 0 ? L[n] / page_size : -1;
  std::vector<uint8_t> cand(N, 0), alone(N, 0);
  std::vector<int32_t> k(N, 0);
  std::vector<int64_t> rows_via(N, 0);
  const std::vector<int32_t>& p = pmin;
  for (int32_t s = 0; s < N; ++s) {
    const int32_t n = pmin[s];
    cand[s] = rows[s] > 0 && node_len[s] > 0 && n == pmax[s] && n >= 0 && head_pages[n] >= 0;
    if (cand[s]) {
      ++k[n];
      rows_via[n] += rows[s];
    }
  }
  for (int32_t g = 0; g < G; ++g) {
    const int32_t a = vis_indptr[g], b = vis_indptr[g + 1];
    if (!live(g) || a == b) continue;
    for (int32_t e = a; e < b; ++e)
      if (e == b - 1 || !cand[vn[e + 1]]) alone[vn[e]] = 1;
  }

  // The byte rule (absorption.py; int64 like the torch code).
  const int64_t tok_bytes = 2 * static_cast<int64_t>(head_dim) * kv_elem_size;
  const int64_t part_bytes = static_cast<int64_t>(group) * (static_cast<int64_t>(head_dim) + 1) * 4 * 2;
  const auto decide = [&](int32_t n, int64_t chain_len) {
    if (k[n] < 1 || chain_len > max_absorbed_tokens) return false;
    const int64_t extra = wrap_mul(wrap_mul(k[n] + alone[n] - 1, chain_len), tok_bytes);
    return extra < wrap_mul(rows_via[n], part_bytes);
  };

  // Predecessor first. Nodes without a candidate in-edge start chains (chain_len = node_len); a
  // candidate s is decided after p[s]: walk back over pending candidates to a decided node, then
  // decide the walked nodes from there forward. A walk that meets itself (or a node known to lead into
  // a cycle) marks its nodes never decided: not absorbed, like the torch code's undecided nodes.
  enum : uint8_t { kPending, kOnWalk, kDecided, kNever };
  std::vector<uint8_t> state(N, kPending), absorbed(N, 0);
  std::vector<int64_t> chain(N, 0);
  for (int32_t n = 0; n < N; ++n) {
    if (cand[n]) continue;
    state[n] = kDecided;
    chain[n] = L[n];
    absorbed[n] = decide(n, chain[n]);
  }
  std::vector<int32_t> walk;
  for (int32_t s = 0; s < N; ++s) {
    if (state[s] != kPending) continue;
    int32_t cur = s;
    while (state[cur] == kPending) {  // pending nodes are candidates: p[cur] is a node
      state[cur] = kOnWalk;
      walk.push_back(cur);
      cur = p[cur];
    }
    const bool ok = state[cur] == kDecided;
    for (auto it = walk.rbegin(); it != walk.rend(); ++it) {
      const int32_t x = *it;
      if (!ok) {
        state[x] = kNever;
        continue;
      }
      chain[x] = L[x] + (absorbed[p[x]] ? chain[p[x]] : 0);
      absorbed[x] = decide(x, chain[x]);
      state[x] = kDecided;
    }
    walk.clear();
  }
  // edge[s]: s has its predecessor's chain in front of it.
  std::vector<uint8_t> edge(N, 0);
  bool any = false;
  for (int32_t s = 0; s < N; ++s) {
    edge[s] = cand[s] && state[s] == kDecided && absorbed[p[s]];
    any = any || edge[s];
  }
  if (!any) return false;

  // Rewrite the live lists: drop entries absorbed into the next one (ids first, mapped to virtual ids
  // below once every segment end is known). Dead lists are copied.
  HostForest f;
  f.vis_indptr.assign(G + 1, 0);
  f.vis_nodes.resize(E);
  int32_t* const nv = f.vis_nodes.data();
  int32_t w = 0;  // entries written
  std::vector<uint8_t> end_node(N, 0);
  for (int32_t g = 0; g < G; ++g) {
    const int32_t a = vis_indptr[g], b = vis_indptr[g + 1];
    if (!live(g)) {
      std::copy(vn + a, vn + b, nv + w);
      w += b - a;
    } else if (a < b) {
      for (int32_t e = a; e < b; ++e) {
        if (e != b - 1 && edge[vn[e + 1]]) continue;
        nv[w++] = vn[e];
        end_node[vn[e]] = 1;
      }
    }
    f.vis_indptr[g + 1] = w;
  }
  f.vis_nodes.resize(w);
  std::vector<int32_t> vid(N), virt;
  for (int32_t n = 0; n < N; ++n) {
    vid[n] = n;
    if (edge[n] && end_node[n]) {
      vid[n] = N + static_cast<int32_t>(virt.size());
      virt.push_back(n);
    }
  }
  for (int32_t g = 0; g < G; ++g) {
    if (!live(g)) continue;
    for (int32_t i = f.vis_indptr[g]; i < f.vis_indptr[g + 1]; ++i) f.vis_nodes[i] = vid[f.vis_nodes[i]];
  }

  // Nodes: the originals, then the virtual ones. A virtual node's pages are its chain's members' root
  // first: each member but the last its head_pages (whole pages), the last all of its pages. Members
  // are found walking back over absorbed edges (root last); chains are short (<= max_absorbed_tokens +
  // 1 members, each at least one page but the last), so the walks cost no more than the pages copied.
  const int32_t P = node_page_indptr[N];
  const size_t V = virt.size();
  std::vector<int32_t> members, member_start(V + 1, 0);
  int64_t total = P;
  for (size_t v = 0; v < V; ++v) {
    int32_t cur = virt[v];
    members.push_back(cur);
    total += node_page_indptr[cur + 1] - node_page_indptr[cur];
    while (edge[cur]) {
      cur = p[cur];
      members.push_back(cur);
      total += head_pages[cur];
    }
    member_start[v + 1] = static_cast<int32_t>(members.size());
  }
  f.node_page_indptr.reserve(N + 1 + V);
  f.node_page_indptr.assign(node_page_indptr, node_page_indptr + N + 1);
  f.node_len.reserve(N + V);
  f.node_len.assign(L, L + N);
  f.node_page_indices.resize(total);
  int32_t* const pages = f.node_page_indices.data();
  std::copy(node_page_indices, node_page_indices + P, pages);
  int32_t* dst = pages + P;
  for (size_t v = 0; v < V; ++v) {
    int64_t len = 0;
    for (int32_t i = member_start[v + 1] - 1; i >= member_start[v]; --i) {
      const int32_t m = members[i];
      const int32_t cnt = i == member_start[v] ? node_page_indptr[m + 1] - node_page_indptr[m] : head_pages[m];
      const int32_t* src = node_page_indices + node_page_indptr[m];
      for (int32_t j = 0; j < cnt; ++j) *dst++ = src[j];  // a few pages each: no memmove call
      len += L[m];
    }
    f.node_len.push_back(static_cast<int32_t>(len));
    f.node_page_indptr.push_back(static_cast<int32_t>(dst - pages));
  }
  *out = std::move(f);
  return true;
}

}  // namespace multiverse
