// oneDNN (v2.x API) kernels for JAX's typed XLA FFI on CPU: NHWC convolutions with HWIO
// kernels (forward, backward-data, backward-weights) and NHWC batch norm (training
// forward/backward, optionally fused with ReLU; inference forward), float32 and bfloat16.
//
// Built by `python -m preact.onednn.build`; loaded and registered by preact/onednn/__init__.py.
//
// Activations are handed to oneDNN in their plain NHWC layout (what JAX passes). Weights
// are described with format_tag::any so that oneDNN picks its fast blocked kernels; they
// are reordered from/to HWIO around each call (they are small). Primitives are cached per
// (kind, shapes, strides, padding, dtype) behind a mutex; the scratchpad is user-managed
// and allocated per call so that cached primitives may run concurrently (shard_map / pmap
// over CPU devices call the same primitive from several threads).

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream s(Engine());
  return s;
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// A cache of T (holding primitive descriptors and primitives) per string key.
template <typename T>
class Cache {
 public:
  template <typename Make>
  std::shared_ptr<T> Get(const std::string& key, Make make) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = map_.find(key);
      if (it != map_.end()) return it->second;
    }
    auto made = std::make_shared<T>(make());  // built outside the lock
    std::lock_guard<std::mutex> lock(mu_);
    return map_.emplace(key, made).first->second;
  }

 private:
  std::mutex mu_;
  std::unordered_map<std::string, std::shared_ptr<T>> map_;
};

bool DnnlType(ffi::DataType t, dt* out) {
  switch (t) {
    case ffi::DataType::F32: *out = dt::f32; return true;
    case ffi::DataType::BF16: *out = dt::bf16; return true;
    default: return false;
  }
}

std::string Key(const char* kind, std::initializer_list<memory::dims> parts, int dtype) {
  std::ostringstream s;
  s << kind << '|' << dtype;
  for (const auto& p : parts) {
    s << '|';
    for (auto v : p) s << v << ',';
  }
  return s.str();
}

memory::dims Dims(ffi::Span<const int64_t> d) { return memory::dims(d.begin(), d.end()); }

// Plain NHWC dims → oneDNN's logical NCHW dims.
memory::dims Nchw(const memory::dims& nhwc) { return {nhwc[0], nhwc[3], nhwc[1], nhwc[2]}; }
// Plain HWIO dims → oneDNN's logical OIHW dims.
memory::dims Oihw(const memory::dims& hwio) { return {hwio[3], hwio[2], hwio[0], hwio[1]}; }

void Exec(const dnnl::primitive& p, std::unordered_map<int, memory> args,
          const dnnl::primitive_desc_base& pd) {
  memory scratch;
  auto sd = pd.scratchpad_desc();
  if (sd.get_size() > 0) {
    scratch = memory(sd, Engine());
    args.emplace(DNNL_ARG_SCRATCHPAD, scratch);
  }
  p.execute(Stream(), args);
}

void Reorder(const memory& from, const memory& to) {
  dnnl::reorder(from, to).execute(Stream(), const_cast<memory&>(from), const_cast<memory&>(to));
}

// ---------------------------------------------------------------- convolution ----

struct ConvGeom {
  memory::dims x, w, y, strides, pad_l, pad_r;  // x, y NHWC; w HWIO
  dt type;
  std::string Key(const char* kind) const {
    return ::Key(kind, {x, w, y, strides, pad_l, pad_r}, static_cast<int>(type));
  }
  memory::desc XMd() const { return memory::desc(Nchw(x), type, tag::nhwc); }
  memory::desc YMd() const { return memory::desc(Nchw(y), type, tag::nhwc); }
  memory::desc WPlain(dt t) const { return memory::desc(Oihw(w), t, tag::hwio); }
  memory::desc WAny(dt t) const { return memory::desc(Oihw(w), t, tag::any); }
  // With `add`, a binary post-op adds a tensor of the output's shape to the f32
  // accumulator before the result is written (a residual sum in the same pass).
  dnnl::convolution_forward::primitive_desc FwdPd(bool add = false) const {
    dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_training,
                                      dnnl::algorithm::convolution_direct, XMd(), WAny(type),
                                      YMd(), strides, pad_l, pad_r);
    auto attr = UserScratchpad();
    if (add) {
      dnnl::post_ops ops;
      ops.append_binary(dnnl::algorithm::binary_add, YMd());
      attr.set_post_ops(ops);
    }
    return dnnl::convolution_forward::primitive_desc(d, attr, Engine());
  }
};

struct ConvFwd {
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward prim;
  memory::desc w_plain;
  bool reorder_w;
};

struct ConvBwdData {
  dnnl::convolution_backward_data::primitive_desc pd;
  dnnl::convolution_backward_data prim;
  memory::desc w_plain;
  bool reorder_w;
};

struct ConvBwdWeights {
  dnnl::convolution_backward_weights::primitive_desc pd;
  dnnl::convolution_backward_weights prim;
  memory::desc w_plain;
  bool reorder_w;
};

Cache<ConvFwd> conv_fwd_cache;
Cache<ConvBwdData> conv_bwd_data_cache;
Cache<ConvBwdWeights> conv_bwd_weights_cache;

ffi::Error CheckGeom(ConvGeom& g, ffi::DataType t0, ffi::DataType t1,
                     ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_l,
                     ffi::Span<const int64_t> pad_r) {
  if (t0 != t1) return ffi::Error::InvalidArgument("onednn conv: dtypes differ");
  if (!DnnlType(t0, &g.type)) return ffi::Error::InvalidArgument("onednn conv: f32 or bf16 only");
  if (g.x.size() != 4 || g.w.size() != 4 || g.y.size() != 4)
    return ffi::Error::InvalidArgument("onednn conv: rank-4 NHWC/HWIO operands only");
  if (strides.size() != 2 || pad_l.size() != 2 || pad_r.size() != 2)
    return ffi::Error::InvalidArgument("onednn conv: 2 strides and 2 paddings expected");
  g.strides = Dims(strides);
  g.pad_l = Dims(pad_l);
  g.pad_r = Dims(pad_r);
  if (g.x[3] != g.w[2] || g.y[3] != g.w[3] || g.x[0] != g.y[0])
    return ffi::Error::InvalidArgument("onednn conv: inconsistent shapes");
  return ffi::Error::Success();
}

#define TRY_DNNL(...)                                                         \
  try {                                                                       \
    __VA_ARGS__                                                               \
  } catch (const dnnl::error& e) {                                            \
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());          \
  } catch (const std::exception& e) {                                         \
    return ffi::Error::Internal(std::string("onednn_ffi: ") + e.what());      \
  }

// x (NHWC), w (HWIO)[, addend (NHWC, the output's shape)] → y = conv(x, w) [+ addend].
ffi::Error ConvFwdCommon(ffi::AnyBuffer x, ffi::AnyBuffer w, const ffi::AnyBuffer* addend,
                         ffi::Result<ffi::AnyBuffer> y, ffi::Span<const int64_t> strides,
                         ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi) {
  ConvGeom g{Dims(x.dimensions()), Dims(w.dimensions()), Dims(y->dimensions())};
  if (auto err = CheckGeom(g, x.element_type(), w.element_type(), strides, pad_lo, pad_hi);
      !err.success())
    return err;
  if (addend && (addend->element_type() != x.element_type() ||
                 Dims(addend->dimensions()) != g.y))
    return ffi::Error::InvalidArgument("onednn conv: the addend must match the output");
  TRY_DNNL({
    auto c = conv_fwd_cache.Get(g.Key(addend ? "cfa" : "cf"), [&] {
      auto pd = g.FwdPd(addend != nullptr);
      auto plain = g.WPlain(g.type);
      return ConvFwd{pd, dnnl::convolution_forward(pd), plain, pd.weights_desc() != plain};
    });
    auto& eng = Engine();
    memory xm(g.XMd(), eng, x.untyped_data());
    memory ym(g.YMd(), eng, y->untyped_data());
    memory wm(c->w_plain, eng, w.untyped_data());
    memory wk = wm;
    if (c->reorder_w) {
      wk = memory(c->pd.weights_desc(), eng);
      Reorder(wm, wk);
    }
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wk}, {DNNL_ARG_DST, ym}};
    if (addend)
      args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                   memory(g.YMd(), eng, addend->untyped_data()));
    Exec(c->prim, std::move(args), c->pd);
    Stream().wait();
  })
  return ffi::Error::Success();
}

ffi::Error ConvFwdImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                       ffi::Span<const int64_t> pad_hi) {
  return ConvFwdCommon(x, w, nullptr, y, strides, pad_lo, pad_hi);
}

ffi::Error ConvFwdAddImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer addend,
                          ffi::Result<ffi::AnyBuffer> y, ffi::Span<const int64_t> strides,
                          ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi) {
  return ConvFwdCommon(x, w, &addend, y, strides, pad_lo, pad_hi);
}

// dy (NHWC, the output's shape), w (HWIO) → dx (NHWC, the input's shape).
ffi::Error ConvBwdDataImpl(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                           ffi::Span<const int64_t> strides, ffi::Span<const int64_t> pad_lo,
                       ffi::Span<const int64_t> pad_hi) {
  ConvGeom g{Dims(dx->dimensions()), Dims(w.dimensions()), Dims(dy.dimensions())};
  if (auto err = CheckGeom(g, dy.element_type(), w.element_type(), strides, pad_lo, pad_hi);
      !err.success())
    return err;
  TRY_DNNL({
    auto c = conv_bwd_data_cache.Get(g.Key("cd"), [&] {
      auto hint = g.FwdPd();
      dnnl::convolution_backward_data::desc d(dnnl::algorithm::convolution_direct, g.XMd(),
                                              g.WAny(g.type), g.YMd(), g.strides, g.pad_l,
                                              g.pad_r);
      dnnl::convolution_backward_data::primitive_desc pd(d, UserScratchpad(), Engine(), hint);
      auto plain = g.WPlain(g.type);
      return ConvBwdData{pd, dnnl::convolution_backward_data(pd), plain,
                         pd.weights_desc() != plain};
    });
    auto& eng = Engine();
    memory dym(g.YMd(), eng, dy.untyped_data());
    memory dxm(g.XMd(), eng, dx->untyped_data());
    memory wm(c->w_plain, eng, w.untyped_data());
    memory wk = wm;
    if (c->reorder_w) {
      wk = memory(c->pd.weights_desc(), eng);
      Reorder(wm, wk);
    }
    Exec(c->prim, {{DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_WEIGHTS, wk}, {DNNL_ARG_DIFF_SRC, dxm}},
         c->pd);
    Stream().wait();
  })
  return ffi::Error::Success();
}

// x (NHWC), dy (NHWC) → dw (HWIO). bf16 accumulates the weight gradient in f32 and
// rounds once at the end.
ffi::Error ConvBwdWeightsImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                              ffi::Result<ffi::AnyBuffer> dw,
                              ffi::Span<const int64_t> strides,
                              ffi::Span<const int64_t> pad_lo,
                              ffi::Span<const int64_t> pad_hi) {
  ConvGeom g{Dims(x.dimensions()), Dims(dw->dimensions()), Dims(dy.dimensions())};
  if (auto err = CheckGeom(g, x.element_type(), dy.element_type(), strides, pad_lo, pad_hi);
      !err.success())
    return err;
  if (dw->element_type() != x.element_type())
    return ffi::Error::InvalidArgument("onednn conv: dw dtype differs");
  TRY_DNNL({
    auto c = conv_bwd_weights_cache.Get(g.Key("cw"), [&] {
      auto hint = g.FwdPd();
      dnnl::convolution_backward_weights::desc d(dnnl::algorithm::convolution_direct, g.XMd(),
                                                 g.WAny(dt::f32), g.YMd(), g.strides, g.pad_l,
                                                 g.pad_r);
      dnnl::convolution_backward_weights::primitive_desc pd(d, UserScratchpad(), Engine(),
                                                            hint);
      auto plain = g.WPlain(g.type);
      return ConvBwdWeights{pd, dnnl::convolution_backward_weights(pd), plain,
                            pd.diff_weights_desc() != plain};
    });
    auto& eng = Engine();
    memory xm(g.XMd(), eng, x.untyped_data());
    memory dym(g.YMd(), eng, dy.untyped_data());
    memory dwm(c->w_plain, eng, dw->untyped_data());
    memory dwk = dwm;
    if (c->reorder_w) dwk = memory(c->pd.diff_weights_desc(), eng);
    Exec(c->prim, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_DIFF_WEIGHTS, dwk}},
         c->pd);
    if (c->reorder_w) Reorder(dwk, dwm);
    Stream().wait();
  })
  return ffi::Error::Success();
}

// ----------------------------------------------------------------- batch norm ----

struct BnFwd {
  dnnl::batch_normalization_forward::primitive_desc pd;
  dnnl::batch_normalization_forward prim;
};

struct BnBwd {
  dnnl::batch_normalization_backward::primitive_desc pd;
  dnnl::batch_normalization_backward prim;
};

Cache<BnFwd> bn_fwd_cache;
Cache<BnBwd> bn_bwd_cache;

dnnl::normalization_flags BnFlags(bool relu, bool global_stats) {
  auto f = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
  if (relu) f = f | dnnl::normalization_flags::fuse_norm_relu;
  if (global_stats) f = f | dnnl::normalization_flags::use_global_stats;
  return f;
}

memory::desc BnData(const memory::dims& nhwc, dt type) {
  return memory::desc(Nchw(nhwc), type, tag::nhwc);
}

memory::desc BnChannel(int64_t c) { return memory::desc({c}, dt::f32, tag::a); }

dnnl::batch_normalization_forward::primitive_desc BnFwdPd(const memory::dims& nhwc, dt type,
                                                          float eps, bool relu,
                                                          bool inference) {
  dnnl::batch_normalization_forward::desc d(
      inference ? dnnl::prop_kind::forward_inference : dnnl::prop_kind::forward_training,
      BnData(nhwc, type), eps, BnFlags(relu, inference));
  return dnnl::batch_normalization_forward::primitive_desc(d, UserScratchpad(), Engine());
}

std::shared_ptr<BnFwd> GetBnFwd(const memory::dims& nhwc, dt type, float eps, bool relu,
                                bool inference) {
  std::ostringstream k;
  k << "bf|" << static_cast<int>(type) << '|' << eps << '|' << relu << '|' << inference;
  for (auto v : nhwc) k << '|' << v;
  return bn_fwd_cache.Get(k.str(), [&] {
    auto pd = BnFwdPd(nhwc, type, eps, relu, inference);
    return BnFwd{pd, dnnl::batch_normalization_forward(pd)};
  });
}

ffi::Error CheckBn(const memory::dims& nhwc, ffi::DataType t, dt* type) {
  if (!DnnlType(t, type)) return ffi::Error::InvalidArgument("onednn bn: f32 or bf16 only");
  if (nhwc.size() != 4) return ffi::Error::InvalidArgument("onednn bn: rank-4 NHWC only");
  return ffi::Error::Success();
}

ffi::Error CheckChannel(const ffi::AnyBuffer& b, int64_t c) {
  if (b.element_type() != ffi::DataType::F32 || b.element_count() != static_cast<size_t>(c))
    return ffi::Error::InvalidArgument("onednn bn: per-channel operands must be f32[C]");
  return ffi::Error::Success();
}

// x, scale, shift → y, mean, var, workspace (bytes; 1 byte when relu is 0).
ffi::Error BnFwdTrainImpl(ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer shift,
                          ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                          ffi::Result<ffi::AnyBuffer> var, ffi::Result<ffi::AnyBuffer> ws,
                          float eps, int64_t relu) {
  auto dims = Dims(x.dimensions());
  dt type;
  if (auto err = CheckBn(dims, x.element_type(), &type); !err.success()) return err;
  for (auto* b : {&scale, &shift})
    if (auto err = CheckChannel(*b, dims[3]); !err.success()) return err;
  TRY_DNNL({
    auto c = GetBnFwd(dims, type, eps, relu != 0, false);
    auto& eng = Engine();
    auto data = BnData(dims, type);
    auto ch = BnChannel(dims[3]);
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, memory(data, eng, x.untyped_data())},
        {DNNL_ARG_DST, memory(data, eng, y->untyped_data())},
        {DNNL_ARG_SCALE, memory(ch, eng, scale.untyped_data())},
        {DNNL_ARG_SHIFT, memory(ch, eng, shift.untyped_data())},
        {DNNL_ARG_MEAN, memory(ch, eng, mean->untyped_data())},
        {DNNL_ARG_VARIANCE, memory(ch, eng, var->untyped_data())}};
    if (relu) {
      auto wd = c->pd.workspace_desc();
      if (ws->size_bytes() < wd.get_size())
        return ffi::Error::InvalidArgument("onednn bn: workspace buffer too small");
      args.emplace(DNNL_ARG_WORKSPACE, memory(wd, eng, ws->untyped_data()));
    }
    Exec(c->prim, std::move(args), c->pd);
    Stream().wait();
  })
  return ffi::Error::Success();
}

// x, dy, mean, var, scale, shift, workspace → dx, dscale, dshift. (oneDNN 2.6 wants the
// shift among backward's arguments too.)
ffi::Error BnBwdImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer mean,
                     ffi::AnyBuffer var, ffi::AnyBuffer scale, ffi::AnyBuffer shift,
                     ffi::AnyBuffer ws,
                     ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dscale,
                     ffi::Result<ffi::AnyBuffer> dshift, float eps, int64_t relu) {
  auto dims = Dims(x.dimensions());
  dt type;
  if (auto err = CheckBn(dims, x.element_type(), &type); !err.success()) return err;
  if (dy.element_type() != x.element_type())
    return ffi::Error::InvalidArgument("onednn bn: dy dtype differs from x");
  for (auto* b : {&mean, &var, &scale, &shift})
    if (auto err = CheckChannel(*b, dims[3]); !err.success()) return err;
  TRY_DNNL({
    auto f = GetBnFwd(dims, type, eps, relu != 0, false);
    std::ostringstream k;
    k << "bb|" << static_cast<int>(type) << '|' << eps << '|' << relu;
    for (auto v : dims) k << '|' << v;
    auto c = bn_bwd_cache.Get(k.str(), [&] {
      auto data = BnData(dims, type);
      dnnl::batch_normalization_backward::desc d(dnnl::prop_kind::backward, data, data, eps,
                                                 BnFlags(relu != 0, false));
      dnnl::batch_normalization_backward::primitive_desc pd(d, UserScratchpad(), Engine(),
                                                            f->pd);
      return BnBwd{pd, dnnl::batch_normalization_backward(pd)};
    });
    auto& eng = Engine();
    auto data = BnData(dims, type);
    auto ch = BnChannel(dims[3]);
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, memory(data, eng, x.untyped_data())},
        {DNNL_ARG_DIFF_DST, memory(data, eng, dy.untyped_data())},
        {DNNL_ARG_MEAN, memory(ch, eng, mean.untyped_data())},
        {DNNL_ARG_VARIANCE, memory(ch, eng, var.untyped_data())},
        {DNNL_ARG_SCALE, memory(ch, eng, scale.untyped_data())},
        {DNNL_ARG_SHIFT, memory(ch, eng, shift.untyped_data())},
        {DNNL_ARG_DIFF_SRC, memory(data, eng, dx->untyped_data())},
        {DNNL_ARG_DIFF_SCALE, memory(ch, eng, dscale->untyped_data())},
        {DNNL_ARG_DIFF_SHIFT, memory(ch, eng, dshift->untyped_data())}};
    if (relu) {
      auto wd = f->pd.workspace_desc();
      if (ws.size_bytes() < wd.get_size())
        return ffi::Error::InvalidArgument("onednn bn: workspace buffer too small");
      args.emplace(DNNL_ARG_WORKSPACE, memory(wd, eng, ws.untyped_data()));
    }
    Exec(c->prim, std::move(args), c->pd);
    Stream().wait();
  })
  return ffi::Error::Success();
}

// x, mean, var, scale, shift → y (inference: given statistics).
ffi::Error BnFwdInferImpl(ffi::AnyBuffer x, ffi::AnyBuffer mean, ffi::AnyBuffer var,
                          ffi::AnyBuffer scale, ffi::AnyBuffer shift,
                          ffi::Result<ffi::AnyBuffer> y, float eps, int64_t relu) {
  auto dims = Dims(x.dimensions());
  dt type;
  if (auto err = CheckBn(dims, x.element_type(), &type); !err.success()) return err;
  for (auto* b : {&mean, &var, &scale, &shift})
    if (auto err = CheckChannel(*b, dims[3]); !err.success()) return err;
  TRY_DNNL({
    auto c = GetBnFwd(dims, type, eps, relu != 0, true);
    auto& eng = Engine();
    auto data = BnData(dims, type);
    auto ch = BnChannel(dims[3]);
    Exec(c->prim,
         {{DNNL_ARG_SRC, memory(data, eng, x.untyped_data())},
          {DNNL_ARG_DST, memory(data, eng, y->untyped_data())},
          {DNNL_ARG_MEAN, memory(ch, eng, mean.untyped_data())},
          {DNNL_ARG_VARIANCE, memory(ch, eng, var.untyped_data())},
          {DNNL_ARG_SCALE, memory(ch, eng, scale.untyped_data())},
          {DNNL_ARG_SHIFT, memory(ch, eng, shift.untyped_data())}},
         c->pd);
    Stream().wait();
  })
  return ffi::Error::Success();
}

}  // namespace

// The convolutions return one array and share their attributes, after two arrays (the
// forward with a sum: three).
template <typename Arrays>
static auto ConvBinding(Arrays&& arrays) {
  return std::move(arrays)
      .template Ret<ffi::AnyBuffer>()
      .template Attr<ffi::Span<const int64_t>>("strides")
      .template Attr<ffi::Span<const int64_t>>("pad_lo")
      .template Attr<ffi::Span<const int64_t>>("pad_hi");
}

static auto TwoArrays() { return ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(PreactOnednnConvFwd, ConvFwdImpl, ConvBinding(TwoArrays()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PreactOnednnConvFwdAdd, ConvFwdAddImpl,
                              ConvBinding(TwoArrays().Arg<ffi::AnyBuffer>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PreactOnednnConvBwdData, ConvBwdDataImpl,
                              ConvBinding(TwoArrays()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PreactOnednnConvBwdWeights, ConvBwdWeightsImpl,
                              ConvBinding(TwoArrays()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PreactOnednnBnFwdTrain, BnFwdTrainImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PreactOnednnBnBwd, BnBwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PreactOnednnBnFwdInfer, BnFwdInferImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu"));

// Plain C helpers for ctypes.

extern "C" {

// Bytes of the fused BN+ReLU workspace for NHWC x of dtype 0=f32, 1=bf16; -1 on error.
int64_t preact_onednn_bn_workspace_bytes(int64_t n, int64_t h, int64_t w, int64_t c,
                                         int32_t dtype) {
  try {
    auto pd = BnFwdPd({n, h, w, c}, dtype == 1 ? dt::bf16 : dt::f32, 1e-5f, true, false);
    return static_cast<int64_t>(pd.workspace_desc().get_size());
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
