# Driver for the consumer tests, run with `cmake -P`.
#
#   MODE=install   -DBINARY_DIR=<titans build> -DPREFIX=<dir> [-DCONFIG=<cfg>]
#                  Empties PREFIX, then runs `cmake --install BINARY_DIR --prefix PREFIX`.
#   MODE=consumer  -DSOURCE_DIR=<project> -DBINARY_DIR=<dir> -DGENERATOR=<name>
#                  [-DCONFIG=<cfg>] [-DCACHE_ARGS=<a|b|c>] [-DEXPECT_FAILURE=<regex>]
#                  Configures SOURCE_DIR from scratch into BINARY_DIR with GENERATOR and the
#                  |-separated cache arguments, builds it, then runs its `consumer` program;
#                  with EXPECT_FAILURE, only checks that the configure fails saying that.

cmake_minimum_required(VERSION 3.20)

function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "consumer test: ${what} failed (${rc}): ${cmd}")
  endif()
endfunction()

foreach(var MODE BINARY_DIR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "consumer test: -D${var}=... is required")
  endif()
endforeach()

set(config_args)
if(DEFINED CONFIG AND NOT CONFIG STREQUAL "")
  set(config_args --config "${CONFIG}")
endif()

if(MODE STREQUAL "install")
  if(NOT DEFINED PREFIX OR PREFIX STREQUAL "")
    message(FATAL_ERROR "consumer test: -DPREFIX=... is required")
  endif()
  file(REMOVE_RECURSE "${PREFIX}")
  run_step("install" "${CMAKE_COMMAND}" --install "${BINARY_DIR}" ${config_args} --prefix "${PREFIX}")
  if(NOT EXISTS "${PREFIX}/include/titans/titans.hpp")
    message(FATAL_ERROR "consumer test: ${PREFIX}/include/titans/titans.hpp was not installed")
  endif()
  file(GLOB_RECURSE config_file "${PREFIX}/*/titansConfig.cmake")
  if(NOT config_file)
    message(FATAL_ERROR "consumer test: no titansConfig.cmake under ${PREFIX}")
  endif()
  return()
endif()

if(NOT MODE STREQUAL "consumer")
  message(FATAL_ERROR "consumer test: unknown MODE '${MODE}' (expected install or consumer)")
endif()
foreach(var SOURCE_DIR GENERATOR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "consumer test: -D${var}=... is required")
  endif()
endforeach()

set(cache_args)
if(DEFINED CACHE_ARGS AND NOT CACHE_ARGS STREQUAL "")
  string(REPLACE "|" ";" cache_args "${CACHE_ARGS}")
endif()

# Always start from an empty build directory so a stale cache cannot hide a packaging bug.
file(REMOVE_RECURSE "${BINARY_DIR}")

# EXPECT_FAILURE=<regex>: the configure must fail, and its output must match the regex (a
# find_package that names what is missing).
if(DEFINED EXPECT_FAILURE AND NOT EXPECT_FAILURE STREQUAL "")
  execute_process(COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}" ${cache_args}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(rc EQUAL 0)
    message(FATAL_ERROR "consumer test: the configure succeeded, expected it to fail with: ${EXPECT_FAILURE}")
  endif()
  string(REGEX REPLACE "[ \t\r\n]+" " " flat "${out}${err}")  # CMake wraps its messages
  if(NOT flat MATCHES "${EXPECT_FAILURE}")
    message(FATAL_ERROR "consumer test: the configure failed without naming '${EXPECT_FAILURE}':\n${out}${err}")
  endif()
  message(STATUS "consumer test: the configure failed as expected, naming '${EXPECT_FAILURE}'")
  return()
endif()
run_step("configure" "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}" ${cache_args})
run_step("build" "${CMAKE_COMMAND}" --build "${BINARY_DIR}" ${config_args})

set(exe_name "consumer")
if(CMAKE_HOST_WIN32)
  set(exe_name "consumer.exe")
endif()
set(candidates "${BINARY_DIR}/${exe_name}")
if(DEFINED CONFIG AND NOT CONFIG STREQUAL "")
  list(APPEND candidates "${BINARY_DIR}/${CONFIG}/${exe_name}")
endif()
set(exe "")
foreach(candidate IN LISTS candidates)
  if(EXISTS "${candidate}")
    set(exe "${candidate}")
    break()
  endif()
endforeach()
if(exe STREQUAL "")
  message(FATAL_ERROR "consumer test: the consumer program was not built (looked for: ${candidates})")
endif()
run_step("run" "${exe}")
message(STATUS "consumer test: ${SOURCE_DIR} configured, built and ran successfully")
