# titans_dev: an internal INTERFACE target that carries the build settings of titans' own
# tests, benchmarks and examples (warnings as errors, -march=native, OpenMP, OpenBLAS,
# sanitizers). It is neither installed nor exported; titans::titans never sees these flags.

include_guard(GLOBAL)
include(CheckCXXCompilerFlag)

add_library(titans_dev INTERFACE)

if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(titans_dev INTERFACE -Wall -Wextra -Werror)
elseif(MSVC)
  target_compile_options(titans_dev INTERFACE /W4 /WX /bigobj)
endif()

if(TITANS_NATIVE)
  check_cxx_compiler_flag(-march=native TITANS_HAVE_MARCH_NATIVE)
  if(TITANS_HAVE_MARCH_NATIVE)
    target_compile_options(titans_dev INTERFACE -march=native)
  else()
    message(STATUS "titans: the compiler does not accept -march=native; TITANS_NATIVE has no effect")
  endif()
endif()

# Eigen's headers come in as system includes (imported target), so their warnings are already
# silenced. GCC 12 still reports -W(maybe-)uninitialized from its *own* AVX-512 intrinsic headers
# (the deliberate `__m512d __Y = __Y;` in _mm512_undefined_*, GCC bug 105593) once Eigen's
# AVX-512 kernels are inlined into our code. No include flag can hide that, so for GCC < 13 with
# AVX-512 enabled (e.g. -march=native on an AVX-512 machine) those two warnings are turned off;
# every other configuration keeps them, as errors.
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
  include(CheckCXXSourceCompiles)
  set(CMAKE_REQUIRED_QUIET ON)
  set(_titans_avx512_var TITANS_TARGET_HAS_AVX512F)
  if(TITANS_NATIVE AND TITANS_HAVE_MARCH_NATIVE)
    set(CMAKE_REQUIRED_FLAGS "-march=native")
    set(_titans_avx512_var TITANS_NATIVE_HAS_AVX512F)
  endif()
  check_cxx_source_compiles("
#ifndef __AVX512F__
#error AVX-512F is not enabled
#endif
int main() { return 0; }" ${_titans_avx512_var})
  unset(CMAKE_REQUIRED_FLAGS)
  unset(CMAKE_REQUIRED_QUIET)
  if(${_titans_avx512_var})
    message(STATUS "titans: GCC ${CMAKE_CXX_COMPILER_VERSION} with AVX-512: "
                   "-Wno-uninitialized -Wno-maybe-uninitialized (GCC bug 105593)")
    target_compile_options(titans_dev INTERFACE -Wno-uninitialized -Wno-maybe-uninitialized)
  endif()
  unset(_titans_avx512_var)
endif()

if(TITANS_OPENMP)
  find_package(OpenMP COMPONENTS CXX)
  if(OpenMP_CXX_FOUND)
    target_link_libraries(titans_dev INTERFACE OpenMP::OpenMP_CXX)
  else()
    message(STATUS "titans: OpenMP not found; Eigen will run single-threaded")
  endif()
endif()

if(TITANS_USE_BLAS)
  set(BLA_VENDOR OpenBLAS)
  find_package(BLAS)
  if(NOT BLAS_FOUND)
    message(FATAL_ERROR
      "titans: TITANS_USE_BLAS=ON but OpenBLAS was not found "
      "(on Debian/Ubuntu: apt-get install libopenblas-dev), or configure with -DTITANS_USE_BLAS=OFF")
  endif()
  target_compile_definitions(titans_dev INTERFACE EIGEN_USE_BLAS)
  target_link_libraries(titans_dev INTERFACE BLAS::BLAS)
endif()

# The GEMM backend (cmake/TitansGemm.cmake): titans_dev carries it to every program of the
# project and to titans::compiled, so all of them use the same one.
if(NOT TITANS_GEMM STREQUAL "eigen")
  include("${CMAKE_CURRENT_LIST_DIR}/TitansGemm.cmake")
  if(NOT TITANS_GEMM MATCHES "^(openblas|blis|libxsmm)$")
    message(FATAL_ERROR "titans: TITANS_GEMM is '${TITANS_GEMM}', expected eigen, openblas, blis or libxsmm")
  endif()
  titans_gemm_backend(${TITANS_GEMM} _titans_gemm_found)
  if(NOT _titans_gemm_found)
    message(FATAL_ERROR "titans: TITANS_GEMM=${TITANS_GEMM} but it was not found (see the message above), "
                        "or configure with -DTITANS_GEMM=eigen")
  endif()
  target_link_libraries(titans_dev INTERFACE titans::${TITANS_GEMM})
  if(TITANS_USE_BLAS)
    message(FATAL_ERROR "titans: TITANS_USE_BLAS (Eigen's EIGEN_USE_BLAS) and TITANS_GEMM=${TITANS_GEMM} "
                        "would link two BLAS libraries; choose one")
  endif()
endif()

if(TITANS_SANITIZE)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(FATAL_ERROR "titans: TITANS_SANITIZE needs GCC or Clang")
  endif()
  set(_titans_san_flags -fsanitize=${TITANS_SANITIZERS} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  target_compile_options(titans_dev INTERFACE ${_titans_san_flags})
  target_link_options(titans_dev INTERFACE ${_titans_san_flags})
  unset(_titans_san_flags)
endif()
