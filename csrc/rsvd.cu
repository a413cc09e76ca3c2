// CUDA kernel of the op lowrank_kernels::rsvd: randomized truncated SVD (Halko, Martinsson & Tropp
// 2011, Alg. 4.4 + 5.1) on cuBLAS and cuSOLVER. The schema, the PyTorch kernel (CPU and fallback)
// and the fake kernel live in lowrank_kernels/linalg.py; this file only registers the CUDA kernel.
//
// Per matrix, on W (M x N, M >= N: A or A^T, whichever makes the sketch thinner), w = k + p:
//   Omega ~ N(0,1)^{N x w} seeded; Q = qr(W Omega); niter x { Q = qr(W qr(W^T Q)) };
//   B^T = W^T Q = Q2 R (QR); R = Ur S VTr (gesvd, w x w); U = Q VTr^T[:, :k], V = Q2 Ur[:, :k].
// A (b, m, n) batch runs every product as one strided-batched gemm and the factorizations per
// element (cuSOLVER has no batched QR for these sizes); devInfo is read once, at the end.

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tril.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

namespace lowrank_kernels {
namespace {

// The Gaussian sketch of one element: `omega` is a contiguous (w, N) tensor, i.e. the column-major
// N x w test matrix. It is filled exactly as linalg.py's gaussian_test_matrix does on this device,
// torch.randn((w, N), generator=torch.Generator(device).manual_seed(seed)), so the compiled and the
// PyTorch kernel draw the same matrix for a seed. (torch.Generator() and manual_seed() are
// createCUDAGenerator and set_current_seed; a negative seed wraps to uint64 in both.)
void gaussian_sketch(at::Tensor omega, int64_t seed) {
  at::Generator gen = at::cuda::detail::createCUDAGenerator(omega.device().index());
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_current_seed(static_cast<uint64_t>(seed));
  }
  omega.normal_(0.0, 1.0, gen);
}

// cuSOLVER's devInfo of every call stays on the device, one slot per routine and batch element,
// and is read once at the end: one host sync per rsvd call instead of one per factorization.
class DevInfo {
 public:
  DevInfo(int64_t batch, int64_t slots, const at::TensorOptions& opts)
      : batch_(batch), info_(at::zeros({slots, batch}, opts.dtype(at::kInt))) {}

  // Device pointer for the next routine's devInfo; batch element e writes at offset e.
  int* next(const char* routine) {
    TORCH_INTERNAL_ASSERT(static_cast<int64_t>(names_.size()) < info_.size(0));
    int* p = info_.data_ptr<int>() + static_cast<int64_t>(names_.size()) * batch_;
    names_.push_back(routine);
    return p;
  }

  void check() const {
    const at::Tensor host = info_.cpu();
    const int* h = host.data_ptr<int>();
    for (size_t s = 0; s < names_.size(); ++s) {
      for (int64_t e = 0; e < batch_; ++e) {
        const int v = h[static_cast<int64_t>(s) * batch_ + e];
        TORCH_CHECK(v >= 0, "rsvd (CUDA): ", names_[s], " rejected its argument ", -v,
                    " for batch element ", e, "; this is a bug in lowrank_kernels");
        TORCH_CHECK(v == 0, "rsvd (CUDA): ", names_[s], " did not converge for batch element ",
                    e, " (devInfo = ", v, "); the input probably contains NaN or Inf");
      }
    }
  }

 private:
  int64_t batch_;
  at::Tensor info_;
  std::vector<const char*> names_;
};

// Handles and the one workspace shared by every cuSOLVER call (they run one after another on the
// current stream, so reuse is safe).
struct Ctx {
  cublasHandle_t blas;
  cusolverDnHandle_t solver;
  int64_t batch;
  float* work;
  int lwork;
};

// C_e = op(A_e) op(B_e) for every batch element e; column-major, as cuBLAS sees it.
void gemm(const Ctx& c, cublasOperation_t ta, cublasOperation_t tb, int64_t rows, int64_t cols,
          int64_t inner, const float* a, int64_t lda, int64_t stride_a, const float* b,
          int64_t ldb, int64_t stride_b, float* out, int64_t ldc, int64_t stride_c) {
  const float one = 1.0f, zero = 0.0f;
  TORCH_CUDABLAS_CHECK(cublasSgemmStridedBatched(
      c.blas, ta, tb, static_cast<int>(rows), static_cast<int>(cols), static_cast<int>(inner),
      &one, a, static_cast<int>(lda), stride_a, b, static_cast<int>(ldb), stride_b, &zero, out,
      static_cast<int>(ldc), stride_c, static_cast<int>(c.batch)));
}

// Householder QR of each column-major rows x cols matrix (ld = rows) in `a`, in place (R on and
// above the diagonal, reflectors below); reflector scalars go to tau (cols per element).
void geqrf(const Ctx& c, float* a, int64_t rows, int64_t cols, float* tau, DevInfo& info) {
  int* dinfo = info.next("cusolverDnSgeqrf");
  for (int64_t e = 0; e < c.batch; ++e) {
    TORCH_CUSOLVER_CHECK(cusolverDnSgeqrf(c.solver, static_cast<int>(rows),
                                          static_cast<int>(cols), a + e * rows * cols,
                                          static_cast<int>(rows), tau + e * cols, c.work, c.lwork,
                                          dinfo + e));
  }
}

// Overwrites each geqrf result in `a` with its explicit orthonormal factor Q (rows x cols).
void orgqr(const Ctx& c, float* a, int64_t rows, int64_t cols, const float* tau, DevInfo& info) {
  int* dinfo = info.next("cusolverDnSorgqr");
  for (int64_t e = 0; e < c.batch; ++e) {
    TORCH_CUSOLVER_CHECK(cusolverDnSorgqr(c.solver, static_cast<int>(rows),
                                          static_cast<int>(cols), static_cast<int>(cols),
                                          a + e * rows * cols, static_cast<int>(rows),
                                          tau + e * cols, c.work, c.lwork, dinfo + e));
  }
}

// Pins the handle modes the contract needs and restores the caller's afterwards:
// - cuBLAS in true fp32 whatever torch's allow_tf32 flag (TF32's 10-bit mantissa would blur the
//   trailing directions of the basis);
// - cuSOLVER in deterministic mode (geqrf and gesvd may otherwise reduce in any order), because
//   replicas must compute bit-identical bases from identical gradients.
class HandleModes {
 public:
  HandleModes(cublasHandle_t blas, cusolverDnHandle_t solver) : blas_(blas), solver_(solver) {
    TORCH_CUDABLAS_CHECK(cublasGetMathMode(blas_, &math_));
    TORCH_CUDABLAS_CHECK(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH));
#if CUSOLVER_VERSION >= 11500  // the mode exists from CUDA 12.2; older cuSOLVER is deterministic
    TORCH_CUSOLVER_CHECK(cusolverDnGetDeterministicMode(solver_, &determinism_));
    TORCH_CUSOLVER_CHECK(cusolverDnSetDeterministicMode(solver_, CUSOLVER_DETERMINISTIC_RESULTS));
#endif
  }
  ~HandleModes() {  // best effort: a destructor must not throw
    cublasSetMathMode(blas_, math_);
#if CUSOLVER_VERSION >= 11500
    cusolverDnSetDeterministicMode(solver_, determinism_);
#endif
  }
  HandleModes(const HandleModes&) = delete;
  HandleModes& operator=(const HandleModes&) = delete;

 private:
  cublasHandle_t blas_;
  cusolverDnHandle_t solver_;
  cublasMath_t math_;
#if CUSOLVER_VERSION >= 11500
  cusolverDeterministicMode_t determinism_;
#endif
};

// The argument checks and the input preparation of the CUDA kernel, device-independent so that they
// are testable without a GPU (registered as lowrank_kernels::_rsvd_prepare below). The checks and
// messages are linalg.py's _check_args, with the same Python exception types. Returns A as fp32
// (every input dtype is converted once) and row-major contiguous, as the kernel reads it with lda = n:
// .to() keeps a strided fp32 input's strides, so .contiguous() is what copies it; a contiguous fp32 A
// is returned as is (the kernel only reads it).
at::Tensor check_and_prepare(const at::Tensor& A, int64_t k, int64_t oversample, int64_t niter,
                             int64_t seed, const std::optional<at::Tensor>& seeds) {
  TORCH_CHECK_VALUE(A.dim() == 2 || A.dim() == 3,
                    "rsvd expects a 2-D matrix or a 3-D batch of matrices, got shape ", A.sizes());
  TORCH_CHECK_TYPE(A.is_floating_point(), "rsvd expects a real floating-point tensor, got ",
                   A.scalar_type());
  const int64_t m = A.size(-2), n = A.size(-1);
  TORCH_CHECK_VALUE(1 <= k && k <= std::min(m, n), "rsvd: k=", k, " must be in [1, min(m, n)=",
                    std::min(m, n), "] for a ", m, "x", n, " matrix");
  TORCH_CHECK_VALUE(oversample >= 0, "rsvd: oversample=", oversample, " must be in [0, ", INT64_MAX,
                    "]");
  TORCH_CHECK_VALUE(niter >= 0, "rsvd: niter=", niter, " must be in [0, ", INT64_MAX, "]");
  if (seeds.has_value()) {
    const at::Tensor& s = *seeds;
    TORCH_CHECK_VALUE(A.dim() == 3, "rsvd: per-element seeds are for a (b, m, n) batch; a single "
                      "matrix takes seed=int");
    TORCH_CHECK_VALUE(seed == 0, "rsvd: give either seed (the same for every element) or seeds (one "
                      "per element)");
    TORCH_CHECK_TYPE(s.scalar_type() == at::kLong && s.device().is_cpu() && s.dim() == 1,
                     "rsvd: seeds must be a 1-D int64 CPU tensor, got ", s.scalar_type(),
                     " of shape ", s.sizes(), " on ", s.device());
    TORCH_CHECK_VALUE(s.size(0) == A.size(0), "rsvd: ", s.size(0), " seeds for a batch of ",
                      A.size(0), " matrices");
  }
  return A.to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cuda(const at::Tensor& A, int64_t k,
                                                         int64_t oversample, int64_t niter,
                                                         int64_t seed,
                                                         const std::optional<at::Tensor>& seeds) {
  const at::Tensor A32 = check_and_prepare(A, k, oversample, niter, seed, seeds);
  const int64_t m = A.size(-2), n = A.size(-1);
  TORCH_CHECK(A.is_cuda(), "rsvd (CUDA): expected a CUDA tensor, got device ", A.device());
  TORCH_CHECK(std::max(m, n) <= INT_MAX, "rsvd (CUDA): cuSOLVER's orgqr takes 32-bit sizes, got ",
              m, "x", n);

  const c10::cuda::CUDAGuard guard(A.device());
  const bool batched = A.dim() == 3;
  const int64_t batch = batched ? A.size(0) : 1;
  const auto opts = A.options().dtype(at::kFloat);
  auto with_batch = [&](std::initializer_list<int64_t> dims) {
    std::vector<int64_t> sizes;
    if (batched) sizes.push_back(batch);
    sizes.insert(sizes.end(), dims);
    return sizes;
  };
  at::Tensor U = at::empty(with_batch({m, k}), opts);
  at::Tensor S = at::empty(with_batch({k}), opts);
  at::Tensor V = at::empty(with_batch({n, k}), opts);
  if (batch == 0) return {U, S, V};

  // Row-major A (m x n) is column-major A^T (n x m, ld n). The working matrix W is A when m >= n,
  // stored as W^T, and A^T when m < n, stored as W: the gemm transpose flags read it either way.
  const bool transposed = m < n;
  const int64_t M = transposed ? n : m;
  const int64_t N = transposed ? m : n;
  const int64_t w = std::min(k + oversample, N);
  const cublasOperation_t op_W = transposed ? CUBLAS_OP_N : CUBLAS_OP_T;
  const cublasOperation_t op_Wt = transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  const float* a = A32.const_data_ptr<float>();
  const int64_t lda = n;
  const int64_t stride_a = m * n;

  // Column-major per-element buffers. tall_M: Y = W X, then its Q. tall_N: Omega, then
  // Z = W^T Q, then B^T and its Q factor Q2.
  at::Tensor tall_M = at::empty({batch, w, M}, opts);
  at::Tensor tall_N = at::empty({batch, w, N}, opts);
  at::Tensor tau = at::empty({batch, w}, opts);
  at::Tensor Ur = at::empty({batch, w, w}, opts);
  at::Tensor VTr = at::empty({batch, w, w}, opts);
  at::Tensor Sw = at::empty({batch, w}, opts);
  float* y = tall_M.data_ptr<float>();
  float* z = tall_N.data_ptr<float>();
  float* t = tau.data_ptr<float>();

  Ctx c{at::cuda::getCurrentCUDABlasHandle(), at::cuda::getCurrentCUDASolverDnHandle(), batch,
        nullptr, 0};
  const HandleModes modes(c.blas, c.solver);

  // One workspace, sized for the largest of the factorizations below.
  const int Mi = static_cast<int>(M), Ni = static_cast<int>(N), wi = static_cast<int>(w);
  int lwork = 1, l = 0;
  TORCH_CUSOLVER_CHECK(cusolverDnSgeqrf_bufferSize(c.solver, Mi, wi, y, Mi, &l));
  lwork = std::max(lwork, l);
  TORCH_CUSOLVER_CHECK(cusolverDnSgeqrf_bufferSize(c.solver, Ni, wi, z, Ni, &l));
  lwork = std::max(lwork, l);
  TORCH_CUSOLVER_CHECK(cusolverDnSorgqr_bufferSize(c.solver, Mi, wi, wi, y, Mi, t, &l));
  lwork = std::max(lwork, l);
  TORCH_CUSOLVER_CHECK(cusolverDnSorgqr_bufferSize(c.solver, Ni, wi, wi, z, Ni, t, &l));
  lwork = std::max(lwork, l);
  TORCH_CUSOLVER_CHECK(cusolverDnSgesvd_bufferSize(c.solver, wi, wi, &l));
  lwork = std::max(lwork, l);
  at::Tensor work = at::empty({lwork}, opts);
  c.work = work.data_ptr<float>();
  c.lwork = lwork;

  // Per element: 1 + 2 * niter QRs of two calls each, one more QR for B^T, one gesvd.
  DevInfo info(batch, 5 + 4 * niter, opts);

  {
    const at::Tensor host_seeds = seeds.has_value() ? seeds->contiguous() : at::Tensor();
    const int64_t* per_element = host_seeds.defined() ? host_seeds.const_data_ptr<int64_t>() : nullptr;
    for (int64_t e = 0; e < batch; ++e) {
      gaussian_sketch(tall_N.select(0, e), per_element ? per_element[e] : seed);
    }
  }
  gemm(c, op_W, CUBLAS_OP_N, M, w, N, a, lda, stride_a, z, N, N * w, y, M, M * w);  // Y = W Omega
  geqrf(c, y, M, w, t, info);
  orgqr(c, y, M, w, t, info);
  for (int64_t it = 0; it < niter; ++it) {  // power iterations, re-orthonormalised each half
    gemm(c, op_Wt, CUBLAS_OP_N, N, w, M, a, lda, stride_a, y, M, M * w, z, N, N * w);  // W^T Q
    geqrf(c, z, N, w, t, info);
    orgqr(c, z, N, w, t, info);
    gemm(c, op_W, CUBLAS_OP_N, M, w, N, a, lda, stride_a, z, N, N * w, y, M, M * w);  // W Z
    geqrf(c, y, M, w, t, info);
    orgqr(c, y, M, w, t, info);
  }

  // B = Q^T W (w x N), factored through B^T = Q2 R so that gesvd only sees the w x w triangle
  // (gesvd's bidiagonalisation is bandwidth-bound: it should not run on the tall B^T).
  gemm(c, op_Wt, CUBLAS_OP_N, N, w, M, a, lda, stride_a, y, M, M * w, z, N, N * w);  // B^T
  geqrf(c, z, N, w, t, info);
  // R is the upper triangle of the top w rows. Read as a row-major (w, N) tensor, each element is
  // the transpose of that column-major factor, so tril of its first w columns is R, column-major.
  at::Tensor R = at::tril(tall_N.narrow(2, 0, w)).contiguous();
  orgqr(c, z, N, w, t, info);  // z now holds Q2

  float* r = R.data_ptr<float>();
  float* ur = Ur.data_ptr<float>();
  float* vtr = VTr.data_ptr<float>();
  float* sw = Sw.data_ptr<float>();
  int* dinfo = info.next("cusolverDnSgesvd");
  for (int64_t e = 0; e < batch; ++e) {  // R = Ur diag(S) VTr
    TORCH_CUSOLVER_CHECK(cusolverDnSgesvd(c.solver, 'A', 'A', wi, wi, r + e * w * w, wi,
                                          sw + e * w, ur + e * w * w, wi, vtr + e * w * w, wi,
                                          c.work, c.lwork, /*rwork=*/nullptr, dinfo + e));
  }

  // B = VTr^T S (Q2 Ur)^T, so U_W = Q VTr[:k, :]^T and V_W = Q2 Ur[:, :k]. Each is computed
  // transposed (k x rows, column-major), which is the row-major rows x k output: written in place.
  float* out_M = (transposed ? V : U).data_ptr<float>();
  float* out_N = (transposed ? U : V).data_ptr<float>();
  gemm(c, CUBLAS_OP_N, CUBLAS_OP_T, k, M, w, vtr, w, w * w, y, M, M * w, out_M, k, M * k);
  gemm(c, CUBLAS_OP_T, CUBLAS_OP_T, k, N, w, ur, w, w * w, z, N, N * w, out_N, k, N * k);
  S.view({batch, k}).copy_(Sw.narrow(1, 0, k));

  info.check();
  return {U, S, V};
}

}  // namespace
}  // namespace lowrank_kernels

TORCH_LIBRARY_IMPL(lowrank_kernels, CUDA, m) { m.impl("rsvd", &lowrank_kernels::rsvd_cuda); }

// The CUDA kernel's argument checks and input preparation on any device, for tests without a GPU
// (tests/test_cuda_ext.py). Not part of the public API.
TORCH_LIBRARY_FRAGMENT(lowrank_kernels, m) {
  m.def("_rsvd_prepare(Tensor A, int k, int oversample, int niter, int seed, Tensor? seeds) -> Tensor",
        &lowrank_kernels::check_and_prepare);
}
