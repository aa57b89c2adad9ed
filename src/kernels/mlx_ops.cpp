// pensieve_mlx: the CPU kernels (src/kernels/, Rust) as MLX primitives.
//
// A Python extension built by build.rs against the venv's mlx package (its
// headers, libmlx and the nanobind ABI its Python module uses, so mx.array
// crosses as itself). Each op adds one node to MLX's lazy graph; its
// eval_cpu dispatches the Rust kernel on MLX's CPU stream like any MLX
// primitive, so a model's forward pass stays one graph and one eval. The
// kernels are reached through a table of function pointers that the
// pensieve binary hands over at start (`bind`): nothing here links to Rust.

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <variant>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace nb = nanobind;
namespace mx = mlx::core;

// Must match `KernelTable` in src/kernels/ffi.rs.
struct View4 {
  const float* data;
  int64_t shape[4];
  int64_t strides[4];
};

struct AttentionArgs {
  View4 q, k, v, mask;
  int32_t has_mask;
  int32_t causal;
  float scale;
  float* out;
  int32_t blhd;
};

struct RopeArgs {
  View4 x;
  int32_t dims;
  int32_t traditional;
  float scale;
  const float* freqs;
  float base;
  const int32_t* offsets;
  int64_t n_offsets;
  float* out;
};

struct KernelTable {
  uint32_t version;
  void (*retain)(const void*);
  void (*release)(const void*);
  int32_t (*qmatmul)(const void*, const float*, int64_t, float*);
  int32_t (*gather)(const void*, const uint32_t*, int64_t, float*);
  int32_t (*attention)(const AttentionArgs*);
  int32_t (*silu_mul)(const float*, const float*, int64_t, float*);
  int32_t (*rope)(const RopeArgs*);
  int32_t (*rms_norm)(const float*, const float*, int64_t, int64_t, float, float*);
};

static KernelTable table{};

static void bind(uintptr_t addr) {
  auto t = reinterpret_cast<const KernelTable*>(addr);
  if (t->version != 3) {
    throw std::runtime_error("pensieve_mlx: kernel table version mismatch");
  }
  table = *t;
}

static void check_bound() {
  if (!table.qmatmul) {
    throw std::runtime_error("pensieve_mlx: kernels not bound");
  }
}

// A quantized matrix owned by the Rust side (an Arc), kept alive by every
// primitive and every dispatched task that uses it.
struct Matrix {
  const void* ptr;
  explicit Matrix(const void* p) : ptr(p) { table.retain(p); }
  ~Matrix() { table.release(ptr); }
};

// A row-contiguous copy of `a` when its layout is not one a kernel reads.
static mx::array row_major(const mx::array& a, mx::cpu::CommandEncoder& enc) {
  if (a.flags().row_contiguous) {
    return a;
  }
  mx::array c(a.shape(), a.dtype(), nullptr, {});
  c.set_data(mx::allocator::malloc(c.nbytes()));
  enc.add_temporary(c);
  // Strided gather, on the stream like everything else.
  enc.dispatch([src = a.data<float>(), dst = c.data<float>(), shape = a.shape(), strides = a.strides(), n = a.size()]() {
    int nd = shape.size();
    std::vector<int64_t> idx(nd, 0);
    for (size_t i = 0; i < n; i++) {
      int64_t off = 0;
      for (int d = 0; d < nd; d++) off += idx[d] * strides[d];
      dst[i] = src[off];
      for (int d = nd - 1; d >= 0; d--) {
        if (++idx[d] < shape[d]) break;
        idx[d] = 0;
      }
    }
  });
  return c;
}

// x times a quantized matrix's rows, plus a residual when given (a
// layer's output projection and the skip connection around it, one node).
class QuantMatmul : public mx::Primitive {
 public:
  QuantMatmul(mx::Stream s, std::shared_ptr<Matrix> m, bool residual = false)
      : mx::Primitive(s), m_(std::move(m)), residual_(residual) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    mx::array x = row_major(inputs[0], enc);
    std::optional<mx::array> res;
    if (residual_) res = row_major(inputs[1], enc);
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    int64_t n = x.size() / x.shape(-1);
    enc.set_input_array(x);
    if (res) enc.set_input_array(*res);
    enc.set_output_array(out);
    enc.dispatch([m = m_, x = x.data<float>(), n, r = res ? res->data<float>() : nullptr, size = (int64_t)out.size(),
                  o = out.data<float>()]() {
      if (table.qmatmul(m->ptr, x, n, o) != 0) throw std::runtime_error("pensieve_mlx: quantized matmul failed");
      if (r) {
        for (int64_t i = 0; i < size; i++) o[i] += r[i];
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("pensieve_mlx: CPU only");
  }
  const char* name() const override { return "PensieveQuantMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto o = dynamic_cast<const QuantMatmul*>(&other);
    return o && o->m_->ptr == m_->ptr && o->residual_ == residual_;
  }

 private:
  std::shared_ptr<Matrix> m_;
  bool residual_;
};

class QuantGather : public mx::Primitive {
 public:
  QuantGather(mx::Stream s, std::shared_ptr<Matrix> m) : mx::Primitive(s), m_(std::move(m)) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    mx::array ids = row_major(inputs[0], enc);
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    enc.set_input_array(ids);
    enc.set_output_array(out);
    enc.dispatch([m = m_, ids = ids.data<uint32_t>(), n = (int64_t)ids.size(), o = out.data<float>()]() {
      if (table.gather(m->ptr, ids, n, o) != 0) throw std::runtime_error("pensieve_mlx: embedding lookup out of range");
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("pensieve_mlx: CPU only");
  }
  const char* name() const override { return "PensieveQuantGather"; }

 private:
  std::shared_ptr<Matrix> m_;
};

static View4 view_of(const mx::array& a) {
  View4 v{};
  v.data = a.data<float>();
  int nd = a.ndim();
  for (int i = 0; i < 4; i++) {
    int d = i - (4 - nd);
    v.shape[i] = d < 0 ? 1 : a.shape(d);
    v.strides[i] = d < 0 ? 0 : a.strides()[d];
  }
  return v;
}

class Attention : public mx::Primitive {
 public:
  Attention(mx::Stream s, float scale, bool causal, bool has_mask, bool blhd)
      : mx::Primitive(s), scale_(scale), causal_(causal), has_mask_(has_mask), blhd_(blhd) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    // The kernel reads any non-negative strides with a contiguous last dim.
    auto usable = [](const mx::array& a) {
      if (a.strides().back() != 1 && a.shape(-1) != 1) return false;
      for (auto s : a.strides()) if (s < 0) return false;
      return true;
    };
    std::vector<mx::array> ins;
    for (auto& a : inputs) ins.push_back(usable(a) ? a : row_major(a, enc));
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    AttentionArgs args{};
    args.q = view_of(ins[0]);
    args.k = view_of(ins[1]);
    args.v = view_of(ins[2]);
    if (has_mask_) args.mask = view_of(ins[3]);
    args.has_mask = has_mask_;
    args.causal = causal_;
    args.scale = scale_;
    args.out = out.data<float>();
    args.blhd = blhd_;
    for (auto& a : ins) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch([args]() {
      if (table.attention(&args) != 0) throw std::runtime_error("pensieve_mlx: attention failed");
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("pensieve_mlx: CPU only");
  }
  const char* name() const override { return "PensieveAttention"; }

 private:
  float scale_;
  bool causal_;
  bool has_mask_;
  bool blhd_;
};

class SiluMul : public mx::Primitive {
 public:
  explicit SiluMul(mx::Stream s) : mx::Primitive(s) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    mx::array g = row_major(inputs[0], enc);
    mx::array x = row_major(inputs[1], enc);
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    enc.set_input_array(g);
    enc.set_input_array(x);
    enc.set_output_array(out);
    enc.dispatch([g = g.data<float>(), x = x.data<float>(), n = (int64_t)out.size(), o = out.data<float>()]() {
      if (table.silu_mul(g, x, n, o) != 0) throw std::runtime_error("pensieve_mlx: silu_mul failed");
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("pensieve_mlx: CPU only");
  }
  const char* name() const override { return "PensieveSiluMul"; }
  bool is_equivalent(const mx::Primitive& other) const override { return dynamic_cast<const SiluMul*>(&other) != nullptr; }
};

static mx::array silu_mul(const mx::array& gate, const mx::array& x) {
  check_bound();
  if (gate.dtype() != mx::float32 || x.dtype() != mx::float32 || gate.shape() != x.shape()) {
    throw std::invalid_argument("pensieve_mlx.silu_mul: gate and x must be float32 of one shape");
  }
  return mx::array(x.shape(), mx::float32, std::make_shared<SiluMul>(mx::default_stream(mx::Device::cpu)), {gate, x});
}

static mx::array qmatmul(const mx::array& x, uintptr_t handle, int rows, int cols) {
  check_bound();
  if (x.dtype() != mx::float32) throw std::invalid_argument("pensieve_mlx.qmatmul: x must be float32");
  if (x.ndim() < 1 || x.shape(-1) != cols) throw std::invalid_argument("pensieve_mlx.qmatmul: x's last dimension must be " + std::to_string(cols));
  auto shape = x.shape();
  shape.back() = rows;
  auto m = std::make_shared<Matrix>(reinterpret_cast<const void*>(handle));
  return mx::array(shape, mx::float32, std::make_shared<QuantMatmul>(mx::default_stream(mx::Device::cpu), m), {x});
}

static mx::array qmatmul_add(const mx::array& x, uintptr_t handle, int rows, int cols, const mx::array& residual) {
  check_bound();
  if (x.dtype() != mx::float32 || residual.dtype() != mx::float32) throw std::invalid_argument("pensieve_mlx.qmatmul_add: x and residual must be float32");
  if (x.ndim() < 1 || x.shape(-1) != cols) throw std::invalid_argument("pensieve_mlx.qmatmul_add: x's last dimension must be " + std::to_string(cols));
  auto shape = x.shape();
  shape.back() = rows;
  if (residual.shape() != shape) throw std::invalid_argument("pensieve_mlx.qmatmul_add: residual must have the product's shape");
  auto m = std::make_shared<Matrix>(reinterpret_cast<const void*>(handle));
  return mx::array(shape, mx::float32, std::make_shared<QuantMatmul>(mx::default_stream(mx::Device::cpu), m, true), {x, residual});
}

static mx::array gather(const mx::array& ids, uintptr_t handle, int cols) {
  check_bound();
  auto shape = ids.shape();
  shape.push_back(cols);
  auto m = std::make_shared<Matrix>(reinterpret_cast<const void*>(handle));
  auto i = mx::astype(ids, mx::uint32);
  return mx::array(shape, mx::float32, std::make_shared<QuantGather>(mx::default_stream(mx::Device::cpu), m), {i});
}

static mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                           std::variant<std::monostate, std::string, mx::array> mask, bool blhd) {
  check_bound();
  for (auto* a : {&q, &k, &v}) {
    if (a->dtype() != mx::float32 || a->ndim() != 4) throw std::invalid_argument("pensieve_mlx.attention: q, k, v must be 4-D float32");
  }
  if (k.shape(0) != q.shape(0) || v.shape(0) != q.shape(0) || k.shape(1) != v.shape(1) || k.shape(2) != v.shape(2) ||
      k.shape(3) != q.shape(3) || q.shape(1) % k.shape(1) != 0) {
    throw std::invalid_argument("pensieve_mlx.attention: q, k, v shapes do not agree");
  }
  std::vector<mx::array> ins{q, k, v};
  bool causal = false, has_mask = false;
  if (auto s = std::get_if<std::string>(&mask)) {
    if (*s != "causal") throw std::invalid_argument("pensieve_mlx.attention: unknown mask " + *s);
    if (k.shape(2) < q.shape(2)) throw std::invalid_argument("pensieve_mlx.attention: causal needs at least as many keys as queries");
    causal = true;
  } else if (auto m = std::get_if<mx::array>(&mask)) {
    mx::array a = *m;
    if (a.dtype() == mx::bool_) {
      a = mx::where(a, mx::array(0.0f), mx::array(-std::numeric_limits<float>::infinity()));
    } else {
      a = mx::astype(a, mx::float32);
    }
    if (a.ndim() > 4) throw std::invalid_argument("pensieve_mlx.attention: mask has more than 4 dimensions");
    mx::Shape want{q.shape(0), q.shape(1), q.shape(2), k.shape(2)};
    for (int i = 0; i < a.ndim(); i++) {
      int d = a.shape(a.ndim() - 1 - i), w = want[3 - i];
      if (d != 1 && d != w) throw std::invalid_argument("pensieve_mlx.attention: mask does not broadcast to the scores");
    }
    ins.push_back(a);
    has_mask = true;
  }
  // [B, L, Hq * Dv] when blhd: the layout the output projection reads.
  mx::Shape out = blhd ? mx::Shape{q.shape(0), q.shape(2), q.shape(1) * v.shape(3)} : mx::Shape{q.shape(0), q.shape(1), q.shape(2), v.shape(3)};
  return mx::array(out, mx::float32, std::make_shared<Attention>(mx::default_stream(mx::Device::cpu), scale, causal, has_mask, blhd), ins);
}

class RoPE : public mx::Primitive {
 public:
  RoPE(mx::Stream s, int dims, bool traditional, float base, float scale, bool has_freqs)
      : mx::Primitive(s), dims_(dims), traditional_(traditional), base_(base), scale_(scale), has_freqs_(has_freqs) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    const mx::array& xin = inputs[0];
    bool usable = xin.strides().back() == 1 || xin.shape(-1) == 1;
    for (auto st : xin.strides()) usable = usable && st >= 0;
    mx::array x = usable ? xin : row_major(xin, enc);
    mx::array off = row_major(inputs[1], enc);
    std::optional<mx::array> freqs;
    if (has_freqs_) freqs = row_major(inputs[2], enc);
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    RopeArgs args{};
    args.x = view_of(x);
    args.dims = dims_;
    args.traditional = traditional_;
    args.scale = scale_;
    args.freqs = freqs ? freqs->data<float>() : nullptr;
    args.base = base_;
    args.offsets = off.data<int32_t>();
    args.n_offsets = off.size();
    args.out = out.data<float>();
    enc.set_input_array(x);
    enc.set_input_array(off);
    if (freqs) enc.set_input_array(*freqs);
    enc.set_output_array(out);
    enc.dispatch([args]() {
      if (table.rope(&args) != 0) throw std::runtime_error("pensieve_mlx: rope failed");
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("pensieve_mlx: CPU only");
  }
  const char* name() const override { return "PensieveRoPE"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto o = dynamic_cast<const RoPE*>(&other);
    return o && o->dims_ == dims_ && o->traditional_ == traditional_ && o->base_ == base_ && o->scale_ == scale_ &&
           o->has_freqs_ == has_freqs_;
  }

 private:
  int dims_;
  bool traditional_;
  float base_, scale_;
  bool has_freqs_;
};

class RMSNorm : public mx::Primitive {
 public:
  RMSNorm(mx::Stream s, float eps, bool has_weight) : mx::Primitive(s), eps_(eps), has_weight_(has_weight) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    mx::array x = row_major(inputs[0], enc);
    std::optional<mx::array> w;
    if (has_weight_) w = row_major(inputs[1], enc);
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    int64_t dims = x.shape(-1), rows = dims ? x.size() / dims : 0;
    enc.set_input_array(x);
    if (w) enc.set_input_array(*w);
    enc.set_output_array(out);
    enc.dispatch([x = x.data<float>(), w = w ? w->data<float>() : nullptr, rows, dims, eps = eps_, o = out.data<float>()]() {
      if (table.rms_norm(x, w, rows, dims, eps, o) != 0) throw std::runtime_error("pensieve_mlx: rms_norm failed");
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("pensieve_mlx: CPU only");
  }
  const char* name() const override { return "PensieveRMSNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto o = dynamic_cast<const RMSNorm*>(&other);
    return o && o->eps_ == eps_ && o->has_weight_ == has_weight_;
  }

 private:
  float eps_;
  bool has_weight_;
};

// Rope's inputs after the rotated array: the offsets as int32 (one, or one
// per batch row) and the frequencies when given, checked.
static void rope_inputs(const char* who, int batch, int dims, const std::variant<int, mx::array>& offset,
                        const std::optional<mx::array>& freqs, std::vector<mx::array>& ins) {
  auto fail = [who](const char* what) { throw std::invalid_argument(std::string("pensieve_mlx.") + who + ": " + what); };
  mx::array off = std::holds_alternative<int>(offset) ? mx::array(std::get<int>(offset), mx::int32)
                                                      : mx::astype(std::get<mx::array>(offset), mx::int32);
  if (off.ndim() > 1 || (off.ndim() == 1 && off.size() != 1 && off.shape(0) != batch)) fail("offset must be a scalar or one per batch row");
  if (off.ndim() == 0) off = mx::reshape(off, {1});
  ins.push_back(off);
  if (freqs) {
    if (freqs->ndim() != 1 || freqs->shape(0) != dims / 2) fail("freqs must hold dims/2 values");
    ins.push_back(mx::astype(*freqs, mx::float32));
  }
}

static mx::array rope(const mx::array& a, int dims, bool traditional, std::optional<float> base, float scale,
                      std::variant<int, mx::array> offset, std::optional<mx::array> freqs) {
  check_bound();
  if (a.dtype() != mx::float32 || a.ndim() < 3) throw std::invalid_argument("pensieve_mlx.rope: a must be float32 with at least 3 dimensions");
  int d = a.shape(-1);
  if (dims <= 0 || dims % 2 || dims > d) throw std::invalid_argument("pensieve_mlx.rope: dims must be even and at most the last dimension");
  if (base.has_value() == freqs.has_value()) throw std::invalid_argument("pensieve_mlx.rope: exactly one of base and freqs");
  // [B, N, T, D], as MLX's own rope reads its input.
  mx::array x = a;
  if (a.ndim() == 3) {
    x = mx::expand_dims(a, 1);
  } else if (a.ndim() > 4) {
    x = mx::flatten(a, 1, a.ndim() - 3);
  }
  std::vector<mx::array> ins{x};
  rope_inputs("rope", x.shape(0), dims, offset, freqs, ins);
  auto s = mx::default_stream(mx::Device::cpu);
  mx::array y(x.shape(), mx::float32, std::make_shared<RoPE>(s, dims, traditional, base.value_or(0.0f), scale, freqs.has_value()), ins);
  return a.ndim() == 4 ? y : mx::reshape(y, a.shape());
}

static mx::array rms_norm(const mx::array& x, std::optional<mx::array> weight, float eps) {
  check_bound();
  if (x.dtype() != mx::float32 || x.ndim() < 1) throw std::invalid_argument("pensieve_mlx.rms_norm: x must be float32");
  std::vector<mx::array> ins{x};
  if (weight) {
    if (weight->dtype() != mx::float32 || weight->ndim() != 1 || weight->shape(0) != x.shape(-1)) {
      throw std::invalid_argument("pensieve_mlx.rms_norm: weight must be float32 with one value per feature");
    }
    ins.push_back(*weight);
  }
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array(x.shape(), mx::float32, std::make_shared<RMSNorm>(s, eps, weight.has_value()), ins);
}

// `x` (n rows of cols) times a quantized matrix into `out`, through the
// RMS norm with weight `norm` first when given: a layer's input norm, which
// only the products after it read. Runs inside a dispatched task.
static void normed_product(const void* m, const float* x, int64_t n, int64_t cols, const float* norm, float eps,
                           float* out, const char* what) {
  std::vector<float> normed;
  if (norm) {
    normed.resize(n * cols);
    if (table.rms_norm(x, norm, n, cols, eps, normed.data()) != 0) throw std::runtime_error("pensieve_mlx: rms_norm failed");
    x = normed.data();
  }
  if (table.qmatmul(m, x, n, out) != 0) throw std::runtime_error(std::string("pensieve_mlx: ") + what + " product failed");
}

// A fused product's norm weight, checked and appended to its inputs.
static void norm_input(const char* who, const std::optional<mx::array>& norm, int cols, std::vector<mx::array>& ins) {
  if (!norm) return;
  if (norm->dtype() != mx::float32 || norm->ndim() != 1 || norm->shape(0) != cols) {
    throw std::invalid_argument(std::string("pensieve_mlx.") + who + ": norm must be float32 with one value per input feature");
  }
  ins.push_back(*norm);
}

// A layer's q/k/v projections as one product over their stacked rows, with
// the bias, rope on q and k, and the [B, L, H, D] -> [B, H, L, D] layout
// change done in the same task: what takes mlx-lm's attention eleven ops
// (three products, six reshapes and transposes, two ropes).
class QkvRope : public mx::Primitive {
 public:
  QkvRope(mx::Stream s, std::shared_ptr<Matrix> m, int hq, int hkv, int hd, int dims, bool traditional, float base,
          float scale, bool has_freqs, bool has_bias, bool has_norm, float eps)
      : mx::Primitive(s), m_(std::move(m)), hq_(hq), hkv_(hkv), hd_(hd), dims_(dims), traditional_(traditional),
        base_(base), scale_(scale), has_freqs_(has_freqs), has_bias_(has_bias), has_norm_(has_norm), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    mx::array x = row_major(inputs[0], enc);
    mx::array off = row_major(inputs[1], enc);
    int next = 2;
    std::optional<mx::array> freqs, bias, norm;
    if (has_freqs_) freqs = row_major(inputs[next++], enc);
    if (has_bias_) bias = row_major(inputs[next++], enc);
    if (has_norm_) norm = row_major(inputs[next++], enc);
    for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
    int64_t b = x.shape(0), l = x.shape(1);
    enc.set_input_array(x);
    enc.set_input_array(off);
    if (freqs) enc.set_input_array(*freqs);
    if (bias) enc.set_input_array(*bias);
    if (norm) enc.set_input_array(*norm);
    for (auto& o : outputs) enc.set_output_array(o);
    enc.dispatch([m = m_, x = x.data<float>(), cols = (int64_t)x.shape(-1), norm = norm ? norm->data<float>() : nullptr,
                  eps = eps_, off = off.data<int32_t>(), n_off = (int64_t)off.size(),
                  freqs = freqs ? freqs->data<float>() : nullptr, bias = bias ? bias->data<float>() : nullptr, b, l,
                  hq = hq_, hkv = hkv_, hd = hd_, dims = dims_, traditional = traditional_, base = base_, scale = scale_,
                  qo = outputs[0].data<float>(), ko = outputs[1].data<float>(), vo = outputs[2].data<float>()]() {
      int64_t r = (int64_t)(hq + 2 * hkv) * hd, n = b * l;
      std::vector<float> tmp(n * r);
      normed_product(m->ptr, x, n, cols, norm, eps, tmp.data(), "q/k/v");
      if (bias) {
        for (int64_t i = 0; i < n; i++)
          for (int64_t c = 0; c < r; c++) tmp[i * r + c] += bias[c];
      }
      RopeArgs a{};
      a.dims = dims;
      a.traditional = traditional;
      a.scale = scale;
      a.freqs = freqs;
      a.base = base;
      a.offsets = off;
      a.n_offsets = n_off;
      // The product's rows of one head, [B, L, H, D], read as [B, H, L, D].
      auto heads = [&](int64_t first, int64_t h) {
        View4 v{};
        v.data = tmp.data() + first;
        int64_t shape[4] = {b, h, l, hd}, strides[4] = {l * r, hd, r, 1};
        std::memcpy(v.shape, shape, sizeof shape);
        std::memcpy(v.strides, strides, sizeof strides);
        return v;
      };
      a.x = heads(0, hq);
      a.out = qo;
      if (table.rope(&a) != 0) throw std::runtime_error("pensieve_mlx: rope failed");
      a.x = heads((int64_t)hq * hd, hkv);
      a.out = ko;
      if (table.rope(&a) != 0) throw std::runtime_error("pensieve_mlx: rope failed");
      for (int64_t bi = 0; bi < b; bi++)
        for (int64_t h = 0; h < hkv; h++)
          for (int64_t li = 0; li < l; li++)
            std::memcpy(vo + ((bi * hkv + h) * l + li) * hd, tmp.data() + (bi * l + li) * r + (int64_t)(hq + hkv) * hd + h * hd,
                        hd * sizeof(float));
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("pensieve_mlx: CPU only");
  }
  const char* name() const override { return "PensieveQkvRope"; }

 private:
  std::shared_ptr<Matrix> m_;
  int hq_, hkv_, hd_, dims_;
  bool traditional_;
  float base_, scale_;
  bool has_freqs_, has_bias_, has_norm_;
  float eps_;
};

// A gated MLP's gate and up projections as one product over their stacked
// rows, and silu(gate) * up on it in the same task.
class GateUpSilu : public mx::Primitive {
 public:
  GateUpSilu(mx::Stream s, std::shared_ptr<Matrix> m, int hidden, bool has_norm, float eps)
      : mx::Primitive(s), m_(std::move(m)), hidden_(hidden), has_norm_(has_norm), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    mx::array x = row_major(inputs[0], enc);
    std::optional<mx::array> norm;
    if (has_norm_) norm = row_major(inputs[1], enc);
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    int64_t cols = x.shape(-1), n = x.size() / cols;
    enc.set_input_array(x);
    if (norm) enc.set_input_array(*norm);
    enc.set_output_array(out);
    enc.dispatch([m = m_, x = x.data<float>(), n, cols, norm = norm ? norm->data<float>() : nullptr, eps = eps_,
                  f = (int64_t)hidden_, o = out.data<float>()]() {
      std::vector<float> tmp(n * 2 * f);
      normed_product(m->ptr, x, n, cols, norm, eps, tmp.data(), "gate/up");
      for (int64_t i = 0; i < n; i++) {
        if (table.silu_mul(tmp.data() + i * 2 * f, tmp.data() + i * 2 * f + f, f, o + i * f) != 0)
          throw std::runtime_error("pensieve_mlx: silu_mul failed");
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("pensieve_mlx: CPU only");
  }
  const char* name() const override { return "PensieveGateUpSilu"; }

 private:
  std::shared_ptr<Matrix> m_;
  int hidden_;
  bool has_norm_;
  float eps_;
};

static std::vector<mx::array> qkv_rope(const mx::array& x, uintptr_t handle, int rows, int cols, int hq, int hkv, int hd,
                                       int dims, bool traditional, std::optional<float> base, float scale,
                                       std::variant<int, mx::array> offset, std::optional<mx::array> freqs,
                                       std::optional<mx::array> bias, std::optional<mx::array> norm, float eps) {
  check_bound();
  if (x.dtype() != mx::float32 || x.ndim() != 3 || x.shape(-1) != cols) {
    throw std::invalid_argument("pensieve_mlx.qkv_rope: x must be float32 [B, L, " + std::to_string(cols) + "]");
  }
  if (hq <= 0 || hkv <= 0 || hd <= 0 || (int64_t)(hq + 2 * hkv) * hd != rows) {
    throw std::invalid_argument("pensieve_mlx.qkv_rope: heads do not match the stacked rows");
  }
  if (dims <= 0 || dims % 2 || dims > hd) throw std::invalid_argument("pensieve_mlx.qkv_rope: rope dims must be even and at most the head size");
  if (base.has_value() == freqs.has_value()) throw std::invalid_argument("pensieve_mlx.qkv_rope: exactly one of base and freqs");
  std::vector<mx::array> ins{x};
  rope_inputs("qkv_rope", x.shape(0), dims, offset, freqs, ins);
  if (bias) {
    if (bias->ndim() != 1 || bias->shape(0) != rows) throw std::invalid_argument("pensieve_mlx.qkv_rope: bias must hold one value per row");
    ins.push_back(mx::astype(*bias, mx::float32));
  }
  norm_input("qkv_rope", norm, cols, ins);
  int b = x.shape(0), l = x.shape(1);
  auto m = std::make_shared<Matrix>(reinterpret_cast<const void*>(handle));
  auto p = std::make_shared<QkvRope>(mx::default_stream(mx::Device::cpu), m, hq, hkv, hd, dims, traditional,
                                     base.value_or(0.0f), scale, freqs.has_value(), bias.has_value(), norm.has_value(), eps);
  return mx::array::make_arrays({{b, hq, l, hd}, {b, hkv, l, hd}, {b, hkv, l, hd}}, {mx::float32, mx::float32, mx::float32}, p, ins);
}

static mx::array gate_up_silu(const mx::array& x, uintptr_t handle, int rows, int cols, std::optional<mx::array> norm, float eps) {
  check_bound();
  if (x.dtype() != mx::float32 || x.ndim() < 1 || x.shape(-1) != cols) {
    throw std::invalid_argument("pensieve_mlx.gate_up_silu: x must be float32 with a last dimension of " + std::to_string(cols));
  }
  if (rows <= 0 || rows % 2) throw std::invalid_argument("pensieve_mlx.gate_up_silu: the stacked rows must be gate and up, equally many");
  std::vector<mx::array> ins{x};
  norm_input("gate_up_silu", norm, cols, ins);
  auto shape = x.shape();
  shape.back() = rows / 2;
  auto m = std::make_shared<Matrix>(reinterpret_cast<const void*>(handle));
  auto p = std::make_shared<GateUpSilu>(mx::default_stream(mx::Device::cpu), m, rows / 2, norm.has_value(), eps);
  return mx::array(shape, mx::float32, p, ins);
}

NB_MODULE(pensieve_mlx, m) {
  m.doc() = "pensieve's CPU kernels as MLX primitives (built by pensieve's build.rs)";
  m.def("bind", &bind, nb::arg("table"));
  m.def("qmatmul", &qmatmul, nb::arg("x"), nb::arg("handle"), nb::arg("rows"), nb::arg("cols"));
  m.def("gather", &gather, nb::arg("ids"), nb::arg("handle"), nb::arg("cols"));
  m.def("silu_mul", &silu_mul, nb::arg("gate"), nb::arg("x"));
  m.def("rope", &rope, nb::arg("a"), nb::arg("dims"), nb::arg("traditional"), nb::arg("base").none(), nb::arg("scale"),
        nb::arg("offset"), nb::arg("freqs").none() = nb::none());
  m.def("qkv_rope", &qkv_rope, nb::arg("x"), nb::arg("handle"), nb::arg("rows"), nb::arg("cols"), nb::arg("n_heads"),
        nb::arg("n_kv_heads"), nb::arg("head_dim"), nb::arg("dims"), nb::arg("traditional"), nb::arg("base").none(),
        nb::arg("scale"), nb::arg("offset"), nb::arg("freqs").none() = nb::none(), nb::arg("bias").none() = nb::none(),
        nb::arg("norm").none() = nb::none(), nb::arg("eps") = 0.0f);
  m.def("gate_up_silu", &gate_up_silu, nb::arg("x"), nb::arg("handle"), nb::arg("rows"), nb::arg("cols"),
        nb::arg("norm").none() = nb::none(), nb::arg("eps") = 0.0f);
  m.def("qmatmul_add", &qmatmul_add, nb::arg("x"), nb::arg("handle"), nb::arg("rows"), nb::arg("cols"), nb::arg("residual"));
  m.def("rms_norm", &rms_norm, nb::arg("x"), nb::arg("weight").none(), nb::arg("eps"));
  m.def("attention", &attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("scale"), nb::arg("mask").none() = nb::none(),
        nb::arg("blhd") = false);
}
