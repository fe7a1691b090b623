// torch.ops.alast: op schemas, argument checks and the tensor-level wrappers around the CUDA launchers.
//
// Every argument is checked with TORCH_CHECK before anything is allocated or launched. The same wrappers
// are registered for CPU tensors too: there every check runs and the last one reports that a CUDA tensor
// was expected, so the checks are testable on machines without a GPU. Index values are not read on the
// host (that would synchronise): the kernels check them on the device, and alast_kernels.ops checks them
// on the host first unless told not to.
//
// Compiled a second time with ALAST_EMULATION (alast_kernels/_cuda_emulation.py) against the kernels built
// as host C++: then the wrappers take CPU tensors and are registered for CPU only.
#ifndef ALAST_EMULATION
#include <Python.h>  // first, as Python asks
#endif

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <string>

#ifndef ALAST_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "launchers.h"

namespace alast {
namespace {

// Where the kernels run: the tensors' CUDA device, or the host in the emulation build.
#ifdef ALAST_EMULATION
constexpr const char* kDeviceKind = "CPU";
bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
cudaStream_t current_stream() { return nullptr; }
#else
constexpr const char* kDeviceKind = "CUDA";
bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
#endif

constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

Dtype float_dtype(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, "alast::", op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_layout(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "alast::", op, ": ", name, " must be a ", dim, "-D tensor, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "alast::", op, ": ", name, " must be contiguous, got strides ", t.strides(),
              " for shape ", t.sizes());
}

void check_index(const char* op, const at::Tensor& idx, const at::Tensor& x) {
  check_layout(op, "idx", idx, 2);
  TORCH_CHECK(idx.scalar_type() == at::kLong, "alast::", op, ": idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.size(0) == x.size(0), "alast::", op, ": idx must have batch size ", x.size(0), " like x, got ",
              idx.size(0));
  TORCH_CHECK(idx.size(1) <= kMaxInt32, "alast::", op, ": idx may hold at most ", kMaxInt32, " indices per row");
}

// Last check of every op: all tensors on one device of the kernels' kind (the message names the first that is not).
void check_device(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  const at::Tensor& first = *tensors.begin()->second;
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(on_kernel_device(*t), "alast::", op, ": ", name, " must be a ", kDeviceKind, " tensor, got one on ",
                t->device());
    TORCH_CHECK(t->device() == first.device(), "alast::", op, ": ", name, " must be on ", first.device(),
                " like ", tensors.begin()->first, ", got ", t->device());
  }
}

void check_launch(const char* op, cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, "alast::", op, ": kernel launch failed: ", cudaGetErrorString(status));
}

at::Tensor select_tokens(const at::Tensor& scores, int64_t keep, int64_t num_prefix) {
  check_layout("select_tokens", "scores", scores, 2);
  const Dtype dtype = float_dtype("select_tokens", "scores", scores);
  const int64_t n = scores.size(1);
  TORCH_CHECK(n <= kMaxInt32, "alast::select_tokens: scores may have at most ", kMaxInt32, " columns, got ", n);
  TORCH_CHECK(num_prefix >= 0 && num_prefix < n, "alast::select_tokens: num_prefix must be in [0, ", n,
              ") for scores of shape ", scores.sizes(), ", got ", num_prefix);
  TORCH_CHECK(keep >= 1 && keep <= n - num_prefix, "alast::select_tokens: keep must be in [1, ", n - num_prefix,
              "] (", n, " tokens less num_prefix=", num_prefix, "), got ", keep);
  check_device("select_tokens", {{"scores", &scores}});

  const DeviceGuard guard(scores.device());
  at::Tensor out = at::empty({scores.size(0), num_prefix + keep}, scores.options().dtype(at::kLong));
  check_launch("select_tokens",
               launch_select_tokens(scores.data_ptr(), dtype, scores.size(0), n, keep, num_prefix,
                                    out.data_ptr<int64_t>(), current_stream()));
  return out;
}

at::Tensor gather_tokens(const at::Tensor& x, const at::Tensor& idx) {
  check_layout("gather_tokens", "x", x, 3);
  float_dtype("gather_tokens", "x", x);
  check_index("gather_tokens", idx, x);
  check_device("gather_tokens", {{"x", &x}, {"idx", &idx}});

  const DeviceGuard guard(x.device());
  const int64_t B = x.size(0), N = x.size(1), K = idx.size(1), D = x.size(2);
  at::Tensor out = at::empty({B, K, D}, x.options());
  check_launch("gather_tokens", launch_gather_rows(x.data_ptr(), idx.data_ptr<int64_t>(), out.data_ptr(), B, N,
                                                   K, D * int64_t(x.element_size()),
                                                   current_stream()));
  return out;
}

// out (B, N, D) = base (or zeros) + src (B, K, D) added at the rows idx names.
at::Tensor scatter_rows(const char* op, const at::Tensor* base, const at::Tensor& src, const at::Tensor& idx,
                        int64_t N, bool unique) {
  const DeviceGuard guard(src.device());
  const int64_t B = src.size(0), K = src.size(1), D = src.size(2);
  const cudaStream_t stream = current_stream();
  at::Tensor head = at::empty({B, N}, idx.options().dtype(at::kInt));
  at::Tensor next = at::empty({B, K}, idx.options().dtype(at::kInt));
  at::Tensor out = at::empty({B, N, D}, src.options());
  check_launch(op, launch_index_links(idx.data_ptr<int64_t>(), B, N, K, unique, head.data_ptr<int32_t>(),
                                      next.data_ptr<int32_t>(), stream));
  check_launch(op, launch_scatter_rows(base ? base->data_ptr() : nullptr, src.data_ptr(),
                                       head.data_ptr<int32_t>(), next.data_ptr<int32_t>(), out.data_ptr(),
                                       float_dtype(op, "src", src), B, N, K, D, stream));
  return out;
}

at::Tensor gather_tokens_backward(const at::Tensor& grad_out, const at::Tensor& idx, int64_t num_tokens) {
  check_layout("gather_tokens_backward", "grad_out", grad_out, 3);
  float_dtype("gather_tokens_backward", "grad_out", grad_out);
  check_index("gather_tokens_backward", idx, grad_out);
  TORCH_CHECK(idx.size(1) == grad_out.size(1), "alast::gather_tokens_backward: idx must have ", grad_out.size(1),
              " columns like grad_out's dim 1, got ", idx.size(1));
  TORCH_CHECK(num_tokens >= 0, "alast::gather_tokens_backward: num_tokens must be >= 0, got ", num_tokens);
  check_device("gather_tokens_backward", {{"grad_out", &grad_out}, {"idx", &idx}});
  return scatter_rows("gather_tokens_backward", nullptr, grad_out, idx, num_tokens, /*unique=*/false);
}

at::Tensor scatter_tokens(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& delta) {
  check_layout("scatter_tokens", "x", x, 3);
  float_dtype("scatter_tokens", "x", x);
  check_index("scatter_tokens", idx, x);
  check_layout("scatter_tokens", "delta", delta, 3);
  TORCH_CHECK(delta.scalar_type() == x.scalar_type(), "alast::scatter_tokens: delta must have x's dtype ",
              x.scalar_type(), ", got ", delta.scalar_type());
  TORCH_CHECK(delta.size(0) == x.size(0) && delta.size(1) == idx.size(1) && delta.size(2) == x.size(2),
              "alast::scatter_tokens: delta must have shape [", x.size(0), ", ", idx.size(1), ", ", x.size(2),
              "], got ", delta.sizes());
  TORCH_CHECK(idx.size(1) <= x.size(1), "alast::scatter_tokens: idx must have at most ", x.size(1),
              " (unique) indices per row, got ", idx.size(1));
  check_device("scatter_tokens", {{"x", &x}, {"idx", &idx}, {"delta", &delta}});
  return scatter_rows("scatter_tokens", &x, delta, idx, x.size(1), /*unique=*/true);
}

at::Tensor cls_scores(const at::Tensor& x, const at::Tensor& u, double eps) {
  check_layout("cls_scores", "x", x, 3);
  const Dtype dtype = float_dtype("cls_scores", "x", x);
  check_layout("cls_scores", "u", u, 3);
  TORCH_CHECK(u.scalar_type() == at::kFloat, "alast::cls_scores: u must be float32, got ", u.scalar_type());
  TORCH_CHECK(u.size(0) == x.size(0) && u.size(2) == x.size(2) && u.size(1) >= 1,
              "alast::cls_scores: u must have shape [", x.size(0), ", H, ", x.size(2), "] with H >= 1, got ",
              u.sizes());
  TORCH_CHECK(x.size(1) >= 1 && x.size(2) >= 1, "alast::cls_scores: x must have at least one token and channel, "
              "got shape ", x.sizes());
  TORCH_CHECK(eps >= 0.0, "alast::cls_scores: eps must be >= 0, got ", eps);
  check_device("cls_scores", {{"x", &x}, {"u", &u}});

  const DeviceGuard guard(x.device());
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), H = u.size(1);
  at::Tensor logits = at::empty({B, H, N}, u.options());
  at::Tensor out = at::empty({B, N}, u.options());
  check_launch("cls_scores", launch_cls_scores(x.data_ptr(), u.data_ptr<float>(), logits.data_ptr<float>(),
                                               out.data_ptr<float>(), dtype, B, N, D, H, float(eps),
                                               current_stream()));
  return out;
}

}  // namespace
}  // namespace alast

TORCH_LIBRARY(alast, m) {
  m.def("select_tokens(Tensor scores, int keep, int num_prefix) -> Tensor");
  m.def("gather_tokens(Tensor x, Tensor idx) -> Tensor");
  m.def("gather_tokens_backward(Tensor grad_out, Tensor idx, SymInt num_tokens) -> Tensor");
  m.def("scatter_tokens(Tensor x, Tensor idx, Tensor delta) -> Tensor");
  m.def("cls_scores(Tensor x, Tensor u, float eps) -> Tensor");
}

#define ALAST_REGISTER(m)                                              \
  m.impl("select_tokens", &alast::select_tokens);                      \
  m.impl("gather_tokens", &alast::gather_tokens);                      \
  m.impl("gather_tokens_backward", &alast::gather_tokens_backward);    \
  m.impl("scatter_tokens", &alast::scatter_tokens);                    \
  m.impl("cls_scores", &alast::cls_scores);

// CPU: the emulated kernels; or, in the CUDA build, the same wrappers so that every argument check runs
// and the device check explains the failure.
TORCH_LIBRARY_IMPL(alast, CPU, m) { ALAST_REGISTER(m) }
#ifndef ALAST_EMULATION
TORCH_LIBRARY_IMPL(alast, CUDA, m) { ALAST_REGISTER(m) }
#endif

// Outputs without a gradient (indices; scores that docs/ops.md defines as constants): autograd passes them
// through. gather/scatter get their backward from alast_kernels.backends.cuda's autograd.Functions.
TORCH_LIBRARY_IMPL(alast, Autograd, m) {
  m.impl("select_tokens", torch::CppFunction::makeFallthrough());
  m.impl("cls_scores", torch::CppFunction::makeFallthrough());
}

#ifndef ALAST_EMULATION
// `import alast_kernels._C` loads this library, whose static initialisers above register the ops.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "alast_kernels CUDA ops (see torch.ops.alast)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
#endif
