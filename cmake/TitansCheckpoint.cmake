# Checkpoint I/O (include/titans/checkpoint.hpp) and its fuzz test.
#
# This file has two modes.
#
# 1. include(cmake/TitansCheckpoint.cmake) from the top-level CMakeLists.txt, anywhere after the
#    titans target and find_package(Eigen3) (e.g. after add_subdirectory(tests)):
#      - finds nlohmann_json (optional). When found, defines the INTERFACE target
#        titans_checkpoint / titans::checkpoint = titans::titans + nlohmann_json::nlohmann_json,
#        adds it to the titansTargets export set when TITANS_INSTALL is on, links it into
#        test_checkpoint if that target exists, and sets TITANS_HAVE_CHECKPOINT to ON.
#      - when titans is the top-level project, tests are on, TITANS_FUZZ is on and a clang++ that
#        can link -fsanitize=fuzzer is found, registers the ctest tests `fuzz.checkpoint` and
#        `fuzz.model` (label `fuzz`): each compiles fuzz/fuzz_<name>.cpp with that clang++ (the
#        main build may use another compiler) and runs it for TITANS_FUZZ_SECONDS on a fresh copy
#        of its seed corpus (fuzz/corpus, fuzz/corpus_model).
#
# 2. cmake -DCLANGXX=... -DSOURCE_DIR=... -DINCLUDE_DIRS=a|b -DWORK_DIR=... -DSECONDS=...
#          [-DNAME=checkpoint|model] [-DCORPUS=fuzz/corpus] [-DOPT=-O1] [-DRSS_LIMIT_MB=2048]
#          -P cmake/TitansCheckpoint.cmake
#    is what those tests run: build the fuzzer, run it, fail on any finding.

if(CMAKE_SCRIPT_MODE_FILE AND CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  # ------------------------------------------------------------------------------------------
  # Script mode: build and run the checkpoint fuzzer.
  # ------------------------------------------------------------------------------------------
  foreach(var IN ITEMS CLANGXX SOURCE_DIR WORK_DIR SECONDS)
    if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
      message(FATAL_ERROR "TitansCheckpoint.cmake: -D${var}=... is required in script mode")
    endif()
  endforeach()
  if(NOT DEFINED RSS_LIMIT_MB)
    set(RSS_LIMIT_MB 2048)
  endif()
  if(NOT DEFINED NAME)
    set(NAME checkpoint)
  endif()
  if(NOT DEFINED CORPUS)
    set(CORPUS fuzz/corpus)
  endif()

  if(NOT DEFINED OPT)
    set(OPT -O1)
  endif()
  set(flags -std=c++17 -g ${OPT} -fno-omit-frame-pointer
            -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
            "-I${SOURCE_DIR}/include")
  string(REPLACE "|" ";" include_dirs "${INCLUDE_DIRS}")
  list(REMOVE_DUPLICATES include_dirs)
  foreach(dir IN LISTS include_dirs)
    # The default system directories must stay last in clang's search order (libstdc++ relies on
    # #include_next into them), so they are never passed explicitly.
    if(NOT dir STREQUAL "" AND NOT dir MATCHES "^/usr(/local)?/include/?$")
      list(APPEND flags -isystem "${dir}")
    endif()
  endforeach()

  set(binary "${WORK_DIR}/fuzz_${NAME}")
  set(corpus "${WORK_DIR}/corpus")
  set(artifacts "${WORK_DIR}/artifacts")
  set(log "${WORK_DIR}/fuzz.log")
  file(REMOVE_RECURSE "${corpus}" "${artifacts}")
  file(MAKE_DIRECTORY "${WORK_DIR}" "${artifacts}")
  # The fuzzer adds the inputs it finds to its corpus; work on a copy so the seeds stay as committed.
  file(COPY "${SOURCE_DIR}/${CORPUS}/" DESTINATION "${corpus}")

  message(STATUS "Compiling the ${NAME} fuzzer with ${CLANGXX}")
  execute_process(
    COMMAND "${CLANGXX}" ${flags} "${SOURCE_DIR}/fuzz/fuzz_${NAME}.cpp" -o "${binary}"
    RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "Compiling fuzz/fuzz_${NAME}.cpp with ${CLANGXX} failed (${rc})")
  endif()

  message(STATUS "Fuzzing titans ${NAME} loading for ${SECONDS} s (log: ${log})")
  execute_process(
    COMMAND "${binary}" -max_total_time=${SECONDS} -rss_limit_mb=${RSS_LIMIT_MB} -timeout=30
            "-artifact_prefix=${artifacts}/" -print_final_stats=1 "${corpus}"
    WORKING_DIRECTORY "${WORK_DIR}"
    OUTPUT_FILE "${log}"
    ERROR_FILE "${log}"
    RESULT_VARIABLE rc)
  file(GLOB findings "${artifacts}/*")
  if(NOT rc EQUAL 0 OR findings)
    file(READ "${log}" tail)  # a string, not a list: the log holds brackets and semicolons
    string(LENGTH "${tail}" n)
    if(n GREATER 8000)
      math(EXPR first "${n} - 8000")
      string(SUBSTRING "${tail}" ${first} -1 tail)
    endif()
    message("${tail}")
    message(FATAL_ERROR
      "The ${NAME} fuzzer failed (exit ${rc}). Reproducer(s): ${findings}\n"
      "Rerun one with: ${binary} <file>   (full log: ${log})")
  endif()
  file(STRINGS "${log}" stats REGEX "^(Done|stat::number_of_executed_units)")
  message(STATUS "No findings. ${stats}")
  return()
endif()

# --------------------------------------------------------------------------------------------
# Include mode.
# --------------------------------------------------------------------------------------------
include_guard(GLOBAL)

set(TITANS_HAVE_CHECKPOINT OFF)
find_package(nlohmann_json 3 CONFIG QUIET)
if(NOT nlohmann_json_FOUND)
  message(STATUS "titans: nlohmann_json not found; titans::checkpoint (checkpoint.hpp) is not available")
  return()
endif()
set(TITANS_HAVE_CHECKPOINT ON)

add_library(titans_checkpoint INTERFACE)
add_library(titans::checkpoint ALIAS titans_checkpoint)
set_target_properties(titans_checkpoint PROPERTIES EXPORT_NAME checkpoint)
target_link_libraries(titans_checkpoint INTERFACE titans nlohmann_json::nlohmann_json)
if(TITANS_INSTALL)
  install(TARGETS titans_checkpoint EXPORT titansTargets)
endif()

# The unit test of checkpoint.hpp gets the dependency explicitly. Deferred to the end of titans'
# directory so that this file may be included before or after add_subdirectory(tests).
function(_titans_checkpoint_link_test)
  if(TARGET test_checkpoint)
    target_link_libraries(test_checkpoint PRIVATE titans_checkpoint)
  endif()
endfunction()
cmake_language(DEFER DIRECTORY "${PROJECT_SOURCE_DIR}" CALL _titans_checkpoint_link_test)

# --- fuzz test (top level only) ------------------------------------------------------------
option(TITANS_FUZZ "Register the checkpoint fuzz test (needs clang++ with libFuzzer)" ON)
set(TITANS_FUZZ_SECONDS 10 CACHE STRING "How long each fuzz test (fuzz.checkpoint, fuzz.model) fuzzes, in seconds")

if(NOT (PROJECT_IS_TOP_LEVEL AND TITANS_BUILD_TESTS AND TITANS_FUZZ))
  return()
endif()

find_program(TITANS_CLANGXX NAMES clang++-14 clang++ DOC "clang++ used to build the libFuzzer targets")
if(NOT TITANS_CLANGXX)
  message(STATUS "titans: clang++ not found; the fuzz.checkpoint test is not registered")
  return()
endif()

# Probe once per compiler that it can link a fuzzer (the libFuzzer runtime is a separate package
# on some distributions).
if(NOT DEFINED CACHE{TITANS_CLANGXX_FUZZER_WORKS} OR NOT "${_TITANS_CLANGXX_PROBED}" STREQUAL "${TITANS_CLANGXX}")
  set(probe_dir "${PROJECT_BINARY_DIR}/CMakeFiles/titans_fuzz_probe")
  file(MAKE_DIRECTORY "${probe_dir}")
  file(WRITE "${probe_dir}/probe.cpp"
    "#include <cstddef>\n#include <cstdint>\n"
    "extern \"C\" int LLVMFuzzerTestOneInput(const std::uint8_t*, std::size_t) { return 0; }\n")
  execute_process(
    COMMAND "${TITANS_CLANGXX}" -fsanitize=fuzzer,address,undefined "${probe_dir}/probe.cpp" -o "${probe_dir}/probe"
    RESULT_VARIABLE probe_rc OUTPUT_QUIET ERROR_QUIET)
  if(probe_rc EQUAL 0)
    set(works ON)
  else()
    set(works OFF)
  endif()
  set(TITANS_CLANGXX_FUZZER_WORKS ${works} CACHE INTERNAL "clang++ can link -fsanitize=fuzzer")
  set(_TITANS_CLANGXX_PROBED "${TITANS_CLANGXX}" CACHE INTERNAL "")
endif()
if(NOT TITANS_CLANGXX_FUZZER_WORKS)
  message(STATUS "titans: ${TITANS_CLANGXX} cannot link -fsanitize=fuzzer (libFuzzer runtime missing?); "
                 "the fuzz.checkpoint test is not registered")
  return()
endif()

get_filename_component(_titans_checkpoint_root "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)
set(_titans_fuzz_includes
  "$<TARGET_PROPERTY:Eigen3::Eigen,INTERFACE_INCLUDE_DIRECTORIES>"
  "$<TARGET_PROPERTY:nlohmann_json::nlohmann_json,INTERFACE_INCLUDE_DIRECTORIES>")
math(EXPR _titans_fuzz_timeout "${TITANS_FUZZ_SECONDS} + 600")
foreach(_titans_fuzz IN ITEMS "checkpoint|fuzz/corpus" "model|fuzz/corpus_model")
  string(REPLACE "|" ";" _titans_fuzz "${_titans_fuzz}")
  list(GET _titans_fuzz 0 _name)
  list(GET _titans_fuzz 1 _corpus)
  add_test(NAME fuzz.${_name}
    COMMAND "${CMAKE_COMMAND}"
      "-DCLANGXX=${TITANS_CLANGXX}"
      "-DSOURCE_DIR=${_titans_checkpoint_root}"
      "-DINCLUDE_DIRS=$<JOIN:${_titans_fuzz_includes},|>"
      "-DWORK_DIR=${PROJECT_BINARY_DIR}/fuzz/${_name}"
      "-DSECONDS=${TITANS_FUZZ_SECONDS}"
      "-DNAME=${_name}"
      "-DCORPUS=${_corpus}"
      # A 10-second smoke run: -O0 compiles in half the time of -O1 (fuzz/CMakeLists.txt keeps
      # -O1 for long sessions).
      -DOPT=-O0
      -DRSS_LIMIT_MB=2048
      -P "${CMAKE_CURRENT_LIST_FILE}")
  set_tests_properties(fuzz.${_name} PROPERTIES LABELS fuzz TIMEOUT ${_titans_fuzz_timeout} COST 40)
endforeach()
unset(_name)
unset(_corpus)
unset(_titans_fuzz)
unset(_titans_fuzz_timeout)
unset(_titans_fuzz_includes)
unset(_titans_checkpoint_root)
