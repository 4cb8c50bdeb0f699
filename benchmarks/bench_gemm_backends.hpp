// SPDX-License-Identifier: Apache-2.0
//
// \file bench_gemm_backends.hpp
// \brief Other GEMM libraries as yardsticks beside Eigen, each optional: OpenBLAS through its
// CBLAS interface (cblas_sgemm / cblas_dgemm) when TITANS_BENCH_HAVE_OPENBLAS is defined, BLIS
// through its native typed API (bli_sgemm / bli_dgemm) when TITANS_BENCH_HAVE_BLIS is defined,
// libxsmm (libxsmm_sgemm / libxsmm_dgemm: its own run-time generated kernels for the small
// products, OpenBLAS's sgemm_ for the others) when TITANS_BENCH_HAVE_LIBXSMM is defined, which
// needs OpenBLAS as well. benchmarks/CMakeLists.txt finds the libraries and defines the macros.
//
// Both in one program. Debian's libblis (0.9) exports the whole BLAS and CBLAS interface too
// (sgemm_, cblas_sgemm, xerbla_, ...: 306 names in common with libopenblas), without symbol
// versions. Shared libraries with the same names link without any error, and the dynamic linker
// then binds every such name — in the program and inside both libraries — to the library loaded
// first. So:
//   - BLIS is called only through bli_?gemm, names that only BLIS defines;
//   - libopenblas comes before libblis on the link line, so cblas_?gemm (and, with
//     EIGEN_USE_BLAS, Eigen's sgemm_) bind to OpenBLAS;
//   - `provider_of` reports which library each name resolved to at run time; the OpenBLAS rows
//     refuse to run if cblas_sgemm is not OpenBLAS's, and the run's context shows it.
// OpenBLAS's cblas.h is included before blis.h: both guard their CBLAS declarations with
// CBLAS_H, so BLIS's copy is skipped. BLIS_DISABLE_BLAS_DEFS keeps blis.h from declaring the
// Fortran BLAS names that Eigen's EIGEN_USE_BLAS declares differently.
//
// Every GEMM here runs on one thread: each functor's `use_one_thread` is called at the start of
// every benchmark that uses it (openblas_set_num_threads(1), bli_thread_set_num_threads(1)).
#pragma once

#include <titans/memory/model.hpp>

#ifdef TITANS_BENCH_HAVE_OPENBLAS
#include <cblas.h>
#endif

#ifdef TITANS_BENCH_HAVE_LIBXSMM
#include <libxsmm.h>
#endif

#ifdef TITANS_BENCH_HAVE_BLIS
#ifndef BLIS_DISABLE_BLAS_DEFS
#define BLIS_DISABLE_BLAS_DEFS
#endif
#include <blis.h>
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#define TITANS_BENCH_HAVE_DLADDR 1
#endif

#include <benchmark/benchmark.h>

#include <initializer_list>
#include <string>

namespace titans_bench {

using titans::Index;

/// The file of the shared object that defines the dynamic symbol `name` for this process
/// (dlsym(RTLD_DEFAULT) + dladdr), "not found" if no loaded object does, "unknown" where
/// that cannot be asked.
inline std::string provider_of(const char* name) {
#ifdef TITANS_BENCH_HAVE_DLADDR
  void* p = dlsym(RTLD_DEFAULT, name);
  Dl_info info{};
  if (p == nullptr || dladdr(p, &info) == 0 || info.dli_fname == nullptr) return "not found";
  return info.dli_fname;
#else
  (void)name;
  return "unknown";
#endif
}

#ifdef TITANS_BENCH_HAVE_OPENBLAS
/// C = α·op(A)·op(B) + β·C through OpenBLAS's cblas_?gemm, column-major.
struct OpenBlasGemm {
  static const char* name() { return "OpenBLAS"; }
  static void use_one_thread() { openblas_set_num_threads(1); }
  /// Empty if cblas_sgemm and cblas_dgemm are OpenBLAS's, otherwise why not.
  static std::string check_binding() {
    for (const char* sym : {"cblas_sgemm", "cblas_dgemm"}) {
      const std::string lib = provider_of(sym);
      if (lib != "unknown" && lib.find("openblas") == std::string::npos)
        return std::string(sym) + " resolves to " + lib + ", not OpenBLAS (link order)";
    }
    return {};
  }
  void report(benchmark::State&) const {}
  void operator()(bool ta, bool tb, Index m, Index n, Index k, float alpha, const float* a, Index lda, const float* b,
                  Index ldb, float beta, float* c, Index ldc) const {
    cblas_sgemm(CblasColMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, blasint(m), blasint(n),
                blasint(k), alpha, a, blasint(lda), b, blasint(ldb), beta, c, blasint(ldc));
  }
  void operator()(bool ta, bool tb, Index m, Index n, Index k, double alpha, const double* a, Index lda, const double* b,
                  Index ldb, double beta, double* c, Index ldc) const {
    cblas_dgemm(CblasColMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, blasint(m), blasint(n),
                blasint(k), alpha, a, blasint(lda), b, blasint(ldb), beta, c, blasint(ldc));
  }
};
#endif

#ifdef TITANS_BENCH_HAVE_BLIS
/// C = α·op(A)·op(B) + β·C through BLIS's typed API bli_?gemm, column-major (row stride 1,
/// column stride = leading dimension). BLIS 0.9 takes non-const pointers; it does not write
/// A, B, α or β.
struct BlisGemm {
  static const char* name() { return "BLIS"; }
  static void use_one_thread() { bli_thread_set_num_threads(1); }
  static std::string check_binding() { return {}; }  // bli_ names exist only in BLIS
  void report(benchmark::State&) const {}
  void operator()(bool ta, bool tb, Index m, Index n, Index k, float alpha, const float* a, Index lda, const float* b,
                  Index ldb, float beta, float* c, Index ldc) const {
    bli_sgemm(ta ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, tb ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, dim_t(m), dim_t(n),
              dim_t(k), &alpha, const_cast<float*>(a), 1, inc_t(lda), const_cast<float*>(b), 1, inc_t(ldb), &beta, c, 1,
              inc_t(ldc));
  }
  void operator()(bool ta, bool tb, Index m, Index n, Index k, double alpha, const double* a, Index lda, const double* b,
                  Index ldb, double beta, double* c, Index ldc) const {
    bli_dgemm(ta ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, tb ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, dim_t(m), dim_t(n),
              dim_t(k), &alpha, const_cast<double*>(a), 1, inc_t(lda), const_cast<double*>(b), 1, inc_t(ldb), &beta, c, 1,
              inc_t(ldc));
  }
};
#endif

#ifdef TITANS_BENCH_HAVE_LIBXSMM
/// C = α·op(A)·op(B) + β·C through libxsmm_?gemm, column-major: libxsmm runs a product in a
/// kernel it generates for this CPU when the product is small enough (LIBXSMM_SMM, m·n·k ≤ 64³
/// by default) and such a kernel exists for its transposes, else it calls the BLAS sgemm_ /
/// dgemm_ (here OpenBLAS's). The functor asks libxsmm the same two questions for every product
/// it issues and reports `own_kernels_pct`: the share of the flops that ran in libxsmm's kernels.
struct LibxsmmGemm {
  static const char* name() { return "libxsmm"; }
  static void use_one_thread() { openblas_set_num_threads(1); }  // its fallback's threads
  /// Empty if libxsmm's fallback sgemm_ / dgemm_ are OpenBLAS's, otherwise why not.
  static std::string check_binding() {
    for (const char* sym : {"sgemm_", "dgemm_"}) {
      const std::string lib = provider_of(sym);
      if (lib != "unknown" && lib.find("openblas") == std::string::npos)
        return std::string(sym) + " resolves to " + lib + ", not OpenBLAS (libxsmm's fallback)";
    }
    return {};
  }
  void report(benchmark::State& state) const {
    if (flops_ > 0) state.counters["own_kernels_pct"] = 100.0 * own_flops_ / flops_;
  }
  void operator()(bool ta, bool tb, Index m, Index n, Index k, float alpha, const float* a, Index lda, const float* b,
                  Index ldb, float beta, float* c, Index ldc) const {
    run<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  void operator()(bool ta, bool tb, Index m, Index n, Index k, double alpha, const double* a, Index lda, const double* b,
                  Index ldb, double beta, double* c, Index ldc) const {
    run<double>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }

 private:
  template <class S>
  void run(bool ta, bool tb, Index m, Index n, Index k, S alpha, const S* a, Index lda, const S* b, Index ldb, S beta,
           S* c, Index ldc) const {
    const char tra = ta ? 't' : 'n', trb = tb ? 't' : 'n';
    const libxsmm_blasint lm = libxsmm_blasint(m), ln = libxsmm_blasint(n), lk = libxsmm_blasint(k),
                          la = libxsmm_blasint(lda), lb = libxsmm_blasint(ldb), lc = libxsmm_blasint(ldc);
    const double flops = 2.0 * double(m) * double(n) * double(k);
    flops_ += flops;
    const int flags = LIBXSMM_GEMM_PFLAGS(&tra, &trb, LIBXSMM_FLAGS);  // as libxsmm_?gemm computes them
    bool own = LIBXSMM_SMM(lm, ln, lk, 2, sizeof(S));
    if constexpr (std::is_same_v<S, float>) {
      own = own && libxsmm_smmdispatch(lm, ln, lk, &la, &lb, &lc, &alpha, &beta, &flags, nullptr) != nullptr;
      libxsmm_sgemm(&tra, &trb, &lm, &ln, &lk, &alpha, a, &la, b, &lb, &beta, c, &lc);
    } else {
      own = own && libxsmm_dmmdispatch(lm, ln, lk, &la, &lb, &lc, &alpha, &beta, &flags, nullptr) != nullptr;
      libxsmm_dgemm(&tra, &trb, &lm, &ln, &lk, &alpha, a, &la, b, &lb, &beta, c, &lc);
    }
    if (own) own_flops_ += flops;
  }
  mutable double flops_ = 0, own_flops_ = 0;
};
#endif

/// "Eigen, OpenBLAS (cblas_?gemm), BLIS (bli_?gemm)": the GEMM backends compiled in.
inline std::string gemm_backends() {
  std::string s = "Eigen";
#ifdef TITANS_BENCH_HAVE_OPENBLAS
  s += ", OpenBLAS (cblas_?gemm)";
#endif
#ifdef TITANS_BENCH_HAVE_BLIS
  s += ", BLIS (native bli_?gemm)";
#endif
#ifdef TITANS_BENCH_HAVE_LIBXSMM
  s += ", libxsmm (libxsmm_?gemm, OpenBLAS for the larger products)";
#endif
  return s;
}

#ifdef TITANS_BENCH_HAVE_BLIS
/// BLIS's version, the sub-configuration it selected for this CPU and its threading model.
inline std::string blis_description() {
  std::string threading = bli_info_get_enable_openmp() ? "OpenMP" : bli_info_get_enable_pthreads() ? "pthreads" : "none";
  return std::string(bli_info_get_version_str()) + ", sub-configuration " + bli_arch_string(bli_arch_query_id()) +
         ", threading " + threading;
}
#endif

}  // namespace titans_bench
