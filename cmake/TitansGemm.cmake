# GEMM backends of titans (include/titans/detail/gemm.hpp; README, "GEMM backends").
#
#   titans_gemm_backend(<backend> <found_var>)
#     <backend> is openblas, blis or libxsmm. Looks for the library and its header and, when
#     both are found, defines the INTERFACE target titans::<backend>: titans::titans with the
#     library linked and
#       - openblas, blis: TITANS_GEMM_CBLAS (the library's large products call cblas_sgemm /
#         cblas_dgemm);
#       - libxsmm: TITANS_GEMM_LIBXSMM (they call libxsmm_sgemm / libxsmm_dgemm, which run the
#         small ones in libxsmm's JIT-generated kernels and hand the others to the BLAS sgemm_ /
#         dgemm_ linked with it: OpenBLAS, which is therefore required too).
#     Only those products change: no other Eigen product of the program does, unlike
#     EIGEN_USE_BLAS. Sets <found_var> to TRUE or FALSE; the message names the Debian package
#     when a library is missing.
#
# Used by the project (the option TITANS_GEMM) and by the installed package (the components
# `openblas`, `blis` and `libxsmm` of find_package(titans)). Every translation unit of a program must see
# the same backend: link titans::<backend> (and build titans::compiled with it) everywhere.
include_guard(GLOBAL)

function(titans_gemm_backend backend found_var)
  set(${found_var} FALSE PARENT_SCOPE)
  if(TARGET titans::${backend})
    set(${found_var} TRUE PARENT_SCOPE)
    return()
  endif()
  if(backend STREQUAL "openblas")
    set(package libopenblas-dev)
    # OpenBLAS's own cblas.h sits beside openblas_config.h (Debian: one directory per threading).
    find_path(TITANS_OPENBLAS_INCLUDE_DIR NAMES openblas_config.h
              PATH_SUFFIXES openblas-pthread openblas-openmp openblas-serial openblas)
    find_library(TITANS_OPENBLAS_LIBRARY NAMES openblas)
    set(include_dir "${TITANS_OPENBLAS_INCLUDE_DIR}")
    set(library "${TITANS_OPENBLAS_LIBRARY}")
  elseif(backend STREQUAL "blis")
    set(package libblis-dev)
    # BLIS's cblas.h sits beside blis.h; the cblas.h on the default path may be another library's.
    find_path(TITANS_BLIS_INCLUDE_DIR NAMES blis.h PATH_SUFFIXES blis-openmp blis-pthread blis-serial blis)
    find_library(TITANS_BLIS_LIBRARY NAMES blis)
    set(include_dir "${TITANS_BLIS_INCLUDE_DIR}")
    set(library "${TITANS_BLIS_LIBRARY}")
  elseif(backend STREQUAL "libxsmm")
    # Debian ships libxsmm as static, position-independent archives; its sgemm_ fallback for
    # the products too large for its kernels binds to OpenBLAS, linked after it.
    find_path(TITANS_LIBXSMM_INCLUDE_DIR NAMES libxsmm.h)
    find_library(TITANS_LIBXSMM_LIBRARY NAMES xsmm)
    find_library(TITANS_OPENBLAS_LIBRARY NAMES openblas)
    if(NOT TITANS_LIBXSMM_INCLUDE_DIR OR NOT TITANS_LIBXSMM_LIBRARY OR NOT TITANS_OPENBLAS_LIBRARY)
      message(STATUS "titans: the libxsmm GEMM backend needs libxsmm and OpenBLAS "
                     "(on Debian/Ubuntu: apt-get install libxsmm-dev libopenblas-dev)")
      return()
    endif()
    find_package(Threads REQUIRED)
    add_library(titans::libxsmm INTERFACE IMPORTED GLOBAL)
    target_include_directories(titans::libxsmm SYSTEM INTERFACE "${TITANS_LIBXSMM_INCLUDE_DIR}")
    target_compile_definitions(titans::libxsmm INTERFACE TITANS_GEMM_LIBXSMM)
    target_link_libraries(titans::libxsmm INTERFACE titans::titans "${TITANS_LIBXSMM_LIBRARY}"
                          "${TITANS_OPENBLAS_LIBRARY}" Threads::Threads ${CMAKE_DL_LIBS} m)
    set(${found_var} TRUE PARENT_SCOPE)
    return()
  else()
    message(FATAL_ERROR "titans_gemm_backend: backend '${backend}', expected openblas, blis or libxsmm")
  endif()
  if(NOT include_dir OR NOT library OR NOT EXISTS "${include_dir}/cblas.h")
    message(STATUS "titans: the ${backend} GEMM backend needs ${backend} and its cblas.h "
                   "(on Debian/Ubuntu: apt-get install ${package})")
    return()
  endif()
  add_library(titans::${backend} INTERFACE IMPORTED GLOBAL)
  target_include_directories(titans::${backend} SYSTEM INTERFACE "${include_dir}")
  target_compile_definitions(titans::${backend} INTERFACE TITANS_GEMM_CBLAS "TITANS_GEMM_CBLAS_NAME=\"${backend}\"")
  target_link_libraries(titans::${backend} INTERFACE titans::titans "${library}")
  set(${found_var} TRUE PARENT_SCOPE)
endfunction()
