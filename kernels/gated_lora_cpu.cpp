// Gated multi-LoRA on CPU in one call per layer (tspeft_rt.kernels.gated_lora_cpu builds and loads it).
//
// The same math as tspeft_rt.kernels.gated_lora.gated_lora for LoRA slots on one device: for each token t
// with a slot l >= 0 and each slice s of the layer,
//
//     h_s   = A_s[l] x_t                      rounded to the model dtype, as the PyTorch path's shrink
//     on_s  = h_s^T G_s[l] h_s >= max(tau_s^2 max(||base_s||^2, eps^2), floor_s)  and  l covers s   (fp32)
//     out[t, slice s] += B_s[l] h_s           only where on_s: off tokens skip the expand
//
// The shrink: up to `loop_tokens` tokens, a loop over each token's own slot (a decode step: the per-op
// overhead of a matmul dominates there); above it, one matmul for all tokens and slots. The expand is always
// per token, of its on slices only (a rank-r expand is bound by reading and writing the output rows, so
// skipping off rows saves what a dense matmul into the output would spend on them).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

struct Layer {
  int64_t slots, slices, rank, in, n, cols;  // cols = slots * slices * rank (the packed A's rows)
  std::vector<int64_t> offsets;              // slice s is columns offsets[s] .. offsets[s + 1]
  const float *gram, *tau_sq, *floor;        // [L, S*r, S*r], [L, S], [L, S]
  const bool* covered;                       // [L, S]
  float eps_sq;
};

// The squared norms and the decision of one token's slice, from its h (already rounded) and output row.
template <typename T>
bool decide(const Layer& g, int64_t l, int64_t s, const float* h, const T* out_row) {
  const int64_t sr = g.slices * g.rank;
  const float* gram = g.gram + (l * sr + s * g.rank) * sr + s * g.rank;
  float delta_sq = 0.f;
  for (int64_t i = 0; i < g.rank; ++i) {
    float gh = 0.f;
    for (int64_t j = 0; j < g.rank; ++j) gh += gram[i * sr + j] * h[j];
    delta_sq += h[i] * gh;
  }
  float base_sq = 0.f;
#pragma omp simd reduction(+ : base_sq)
  for (int64_t c = g.offsets[s]; c < g.offsets[s + 1]; ++c) {
    const float v = static_cast<float>(out_row[c]);
    base_sq += v * v;
  }
  const int64_t k = l * g.slices + s;
  const float threshold = std::max(std::max(base_sq, g.eps_sq) * g.tau_sq[k], g.floor[k]);
  return g.covered[k] && delta_sq >= threshold;
}

constexpr int64_t kBlock = 64;
constexpr int64_t kGrain = 8;  // tokens per thread at least: a 16-token decode step splits over two

// acc[c] = sum_i rows[i * n + c] h[i] for the c < width of one column block. A full fp32 block sums in vector
// registers (GCC/Clang vector extensions): as a local array the compiler keeps it in memory, and the loop is
// bound by its loads and stores.
typedef float Vec __attribute__((vector_size(64)));
constexpr int64_t kVecs = kBlock * sizeof(float) / sizeof(Vec);

template <typename T>
void block_sums(const T* rows, int64_t n, const float* h, int64_t rank, int64_t width, float* acc) {
  if constexpr (std::is_same_v<T, float>) {
    if (width == kBlock) {
      Vec sums[kVecs] = {};
      for (int64_t i = 0; i < rank; ++i)
        for (int64_t v = 0; v < kVecs; ++v) {
          Vec b;
          std::memcpy(&b, rows + i * n + v * sizeof(Vec) / sizeof(float), sizeof b);
          sums[v] += b * h[i];
        }
      std::memcpy(acc, sums, sizeof sums);
      return;
    }
  }
  std::fill(acc, acc + width, 0.f);
  for (int64_t i = 0; i < rank; ++i) {
    const T* row = rows + i * n;
    const float hi_ = h[i];
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) acc[c] += static_cast<float>(row[c]) * hi_;
  }
}

// out_row[slice s] += B_s[l] h (B stored transposed: b_t [cols, N]); the delta rounded to T before the add.
template <typename T>
void expand(const Layer& g, int64_t l, int64_t s, const float* h, const T* b_t, T* out_row) {
  const int64_t lo = g.offsets[s], hi = g.offsets[s + 1];
  const T* rows = b_t + (l * g.slices + s) * g.rank * g.n;
  float acc[kBlock];
  for (int64_t c0 = lo; c0 < hi; c0 += kBlock) {
    const int64_t width = std::min(kBlock, hi - c0);
    block_sums(rows + c0, g.n, h, g.rank, width, acc);
    T* out = out_row + c0;
#pragma omp simd
    for (int64_t c = 0; c < width; ++c)
      out[c] = static_cast<T>(static_cast<float>(out[c]) + static_cast<float>(static_cast<T>(acc[c])));
  }
}

template <typename T>
void run(const Layer& g, at::Tensor& output, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b_t,
         const int32_t* slots, int64_t tokens, int64_t loop_tokens, int8_t* on) {
  const int64_t sr = g.slices * g.rank;
  at::Tensor h_all;  // [T, cols] every slot's shrink, from one matmul (large batches)
  if (tokens > loop_tokens) h_all = at::mm(x, a.t()).to(at::kFloat);
  const T* xp = x.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const T* bp = b_t.data_ptr<T>();
  T* op = output.data_ptr<T>();
  const int64_t x_stride = x.stride(0), out_stride = output.stride(0);
  at::parallel_for(0, tokens, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> h(sr);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t l = slots[t];
      if (l < 0) continue;
      if (h_all.defined()) {
        const float* row = h_all.data_ptr<float>() + t * g.cols + l * sr;
        std::copy(row, row + sr, h.begin());
      } else {
        const T* xt = xp + t * x_stride;
        for (int64_t j = 0; j < sr; ++j) {
          const T* aj = ap + (l * sr + j) * g.in;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t k = 0; k < g.in; ++k) dot += static_cast<float>(aj[k]) * static_cast<float>(xt[k]);
          h[j] = static_cast<float>(static_cast<T>(dot));  // the shrink's output dtype
        }
      }
      T* out_row = op + t * out_stride;
      for (int64_t s = 0; s < g.slices; ++s) {  // every slice decides on the base output, before any add
        on[t * g.slices + s] = decide(g, l, s, h.data() + s * g.rank, out_row);
      }
      for (int64_t s = 0; s < g.slices; ++s)
        if (on[t * g.slices + s]) expand(g, l, s, h.data() + s * g.rank, bp, out_row);
    }
  });
}

}  // namespace

// output [T, N] (rows may be strided) += the gated delta; counters [2, L] int64 (or empty): routed and kept.
void gated_lora_cpu(at::Tensor& output, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b_t,
                    const at::Tensor& gram, const at::Tensor& tau_sq, const at::Tensor& floor,
                    const at::Tensor& covered, const at::Tensor& covered_count, const at::Tensor& slots,
                    at::Tensor& counters, c10::IntArrayRef offsets, int64_t rank, double eps_sq,
                    int64_t loop_tokens) {
  const int64_t tokens = x.size(0), max_loras = tau_sq.size(0), slices = tau_sq.size(1);
  TORCH_CHECK(output.size(0) == tokens && output.stride(1) == 1 && x.stride(1) == 1, "tspeft-rt: rows of x and output");
  TORCH_CHECK(a.is_contiguous() && b_t.is_contiguous() && gram.is_contiguous() && tau_sq.is_contiguous() &&
              floor.is_contiguous() && covered.is_contiguous() && covered_count.is_contiguous() &&
              gram.scalar_type() == at::kFloat && tau_sq.scalar_type() == at::kFloat &&
              floor.scalar_type() == at::kFloat && covered.scalar_type() == at::kBool &&
              covered_count.scalar_type() == at::kLong, "tspeft-rt: packed layer state (contiguous, dtypes)");
  TORCH_CHECK(x.scalar_type() == output.scalar_type() && a.scalar_type() == x.scalar_type(), "tspeft-rt: dtypes");
  TORCH_CHECK(slots.scalar_type() == at::kInt && slots.size(0) >= tokens, "tspeft-rt: slots int32 [>= T]");
  TORCH_CHECK(counters.numel() == 0 || (counters.scalar_type() == at::kLong && counters.dim() == 2 &&
                                        counters.size(0) == 2 && counters.size(1) >= max_loras),
              "tspeft-rt: counters int64 [2, >= L]");
  TORCH_CHECK(x.size(1) == a.size(1) && b_t.size(1) == output.size(1) && b_t.size(0) == a.size(0) &&
              static_cast<int64_t>(offsets.size()) == slices + 1 && offsets.back() == output.size(1),
              "tspeft-rt: shapes of the packed layer");
  Layer g{max_loras, slices, rank, x.size(1), output.size(1), a.size(0), offsets.vec(),
          gram.data_ptr<float>(), tau_sq.data_ptr<float>(), floor.data_ptr<float>(), covered.data_ptr<bool>(),
          static_cast<float>(eps_sq)};
  const int32_t* sp = slots.data_ptr<int32_t>();
  std::vector<int8_t> on(tokens * slices, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_lora_cpu", [&] {
    run<scalar_t>(g, output, x, a, b_t, sp, tokens, loop_tokens, on.data());
  });
  if (counters.numel() == 0) return;
  auto cp = counters.accessor<int64_t, 2>();
  const int64_t* covered_count_p = covered_count.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    if (sp[t] < 0) continue;
    cp[0][sp[t]] += covered_count_p[sp[t]];
    for (int64_t s = 0; s < slices; ++s) cp[1][sp[t]] += on[t * slices + s];
  }
}

// A dispatcher op (not a Python custom op, whose wrapper costs more than a decode step's layer call).
TORCH_LIBRARY_FRAGMENT(tspeft, m) {
  m.def("gated_lora_cpu(Tensor(a!) output, Tensor x, Tensor a, Tensor b_t, Tensor gram, Tensor tau_sq, "
        "Tensor floor, Tensor covered, Tensor covered_count, Tensor slots, Tensor(b!) counters, int[] offsets, "
        "int rank, float eps_sq, int loop_tokens) -> ()");
}

TORCH_LIBRARY_IMPL(tspeft, CPU, m) { m.impl("gated_lora_cpu", &gated_lora_cpu); }
