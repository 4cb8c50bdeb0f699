# titans::compiled: the float and double instantiations of titans' heavy templates (memory model,
# kernel, backward, layer, attention, blocks, model and, with nlohmann-json, save_model /
# load_model), compiled once in a static library. A program that links titans::compiled instead
# of titans::titans gets TITANS_EXTERN_FLOAT and TITANS_EXTERN_DOUBLE, under which every header
# declares those instantiations `extern template`, so its own translation units no longer compile
# them.
# Header-only use (titans::titans) is unchanged.
#
# The library is compiled from source inside the project that uses it: through add_subdirectory /
# FetchContent from titans' src/, and through find_package(titans) from the copy of src/ that is
# installed beside this file. It must be compiled with the same architecture flags as the program
# (Eigen's alignment depends on them): set them in CMAKE_CXX_FLAGS, or on titans::compiled too.
#
#   titans_add_compiled_library(<target> SOURCE_DIR <dir> [EXCLUDE_FROM_ALL] [SCALARS <types>...]
#                               [PRIVATE_LINK <targets>...] [PUBLIC_LINK <targets>...])
#     defines the static library <target> and the alias titans::compiled. The sources are
#     compiled once per scalar type, with TITANS_SCALAR=<type> (object libraries <target>_<type>),
#     as one unity translation unit per type: the six instantiation files share most of Eigen's
#     kernels, which separate files would each compile again, so one unit takes about half the
#     CPU time of six (README, "Faster builds: titans::compiled"). With the cache variable TITANS_COMPILED_UNITY=OFF
#     each file is its own unit: more CPU in all, but they build in parallel (faster on a machine
#     with many more cores than scalar types). PRIVATE_LINK targets (build settings) are linked privately
#     into each; PUBLIC_LINK targets (a GEMM backend, titans::openblas) also reach its users.
#     SCALARS is `float double` (the default) or one of them; without it the cache
#     variable TITANS_COMPILED_SCALARS, when set, gives the list (so `-DTITANS_COMPILED_SCALARS=float`
#     halves the library's compile for a program that uses only float). Linking the target defines
#     TITANS_EXTERN_FLOAT / TITANS_EXTERN_DOUBLE for the types it holds; the other type's templates
#     stay header-only in the program.

include_guard(GLOBAL)

function(titans_add_compiled_library target)
  cmake_parse_arguments(PARSE_ARGV 1 arg "EXCLUDE_FROM_ALL" "SOURCE_DIR" "PRIVATE_LINK;PUBLIC_LINK;SCALARS")
  if(NOT arg_SCALARS)
    if(DEFINED TITANS_COMPILED_SCALARS AND NOT TITANS_COMPILED_SCALARS STREQUAL "")
      set(arg_SCALARS ${TITANS_COMPILED_SCALARS})
    else()
      set(arg_SCALARS float double)
    endif()
  endif()
  list(REMOVE_DUPLICATES arg_SCALARS)
  set(extern_defs)
  foreach(scalar IN LISTS arg_SCALARS)
    if(NOT scalar MATCHES "^(float|double)$")
      message(FATAL_ERROR "titans_add_compiled_library: SCALARS (or TITANS_COMPILED_SCALARS) holds "
                          "'${scalar}'; the instantiations exist for float and double only")
    endif()
    string(TOUPPER "${scalar}" upper)
    list(APPEND extern_defs TITANS_EXTERN_${upper})
  endforeach()
  set(sources
    "${arg_SOURCE_DIR}/instantiate_memory.cpp"
    "${arg_SOURCE_DIR}/instantiate_layer.cpp"
    "${arg_SOURCE_DIR}/instantiate_attention.cpp"
    "${arg_SOURCE_DIR}/instantiate_blocks.cpp"
    "${arg_SOURCE_DIR}/instantiate_model.cpp")
  set(deps titans::titans ${arg_PUBLIC_LINK})
  if(TARGET nlohmann_json::nlohmann_json)
    list(APPEND sources "${arg_SOURCE_DIR}/instantiate_model_checkpoint.cpp")
    list(APPEND deps nlohmann_json::nlohmann_json)
  endif()
  set(exclude)
  if(arg_EXCLUDE_FROM_ALL)
    set(exclude EXCLUDE_FROM_ALL)
  endif()
  set(objects)
  foreach(scalar IN LISTS arg_SCALARS)
    add_library(${target}_${scalar} OBJECT ${exclude} ${sources})
    target_link_libraries(${target}_${scalar} PUBLIC ${deps} PRIVATE ${arg_PRIVATE_LINK})
    target_compile_definitions(${target}_${scalar} PUBLIC ${extern_defs} PRIVATE TITANS_SCALAR=${scalar})
    set_target_properties(${target}_${scalar} PROPERTIES POSITION_INDEPENDENT_CODE ON)
    if(NOT DEFINED TITANS_COMPILED_UNITY OR TITANS_COMPILED_UNITY)
      # BATCH_SIZE 0: every source of the type in one unit
      set_target_properties(${target}_${scalar} PROPERTIES UNITY_BUILD ON UNITY_BUILD_BATCH_SIZE 0)
    endif()
    list(APPEND objects $<TARGET_OBJECTS:${target}_${scalar}>)
  endforeach()
  add_library(${target} STATIC ${exclude} ${objects})
  add_library(titans::compiled ALIAS ${target})
  target_link_libraries(${target} PUBLIC ${deps} PRIVATE ${arg_PRIVATE_LINK})
  target_compile_definitions(${target} PUBLIC ${extern_defs})
endfunction()
