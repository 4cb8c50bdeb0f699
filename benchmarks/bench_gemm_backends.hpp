// SPDX-License-Identifier: Apache-2.0
//
// \file bench_gemm_backends.hpp
// \brief Other GEMM libraries as yardsticks beside Eigen, each optional: OpenBLAS through its
// CBLAS interface (cblas_sgemm / cblas_dgemm) when TITANS_BENCH_HAVE_OPENBLAS is defined, BLIS
// through its native typed API (bli_sgemm / bli_dgemm) when TITANS_BENCH_HAVE_BLIS is defined.
// benchmarks/CMakeLists.txt finds the libraries and defines the macros.
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

#include <titans/memory_model.hpp>

#ifdef TITANS_BENCH_HAVE_OPENBLAS
#include <cblas.h>
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

/// "Eigen, OpenBLAS (cblas_?gemm), BLIS (bli_?gemm)": the GEMM backends compiled in.
inline std::string gemm_backends() {
  std::string s = "Eigen";
#ifdef TITANS_BENCH_HAVE_OPENBLAS
  s += ", OpenBLAS (cblas_?gemm)";
#endif
#ifdef TITANS_BENCH_HAVE_BLIS
  s += ", BLIS (native bli_?gemm)";
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
