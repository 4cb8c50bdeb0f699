#!/usr/bin/env bash
# titans quick start.
#
#   scripts/quickstart.sh demo [args...]   build the demo (release preset) and run it with args
#   scripts/quickstart.sh test             build everything and run the tests: the release preset
#                                          (all labels, default compiler), then the asan preset
#                                          (unit tests): asan-clang, the same built with
#                                          clang++, when installed (its sanitized tests run in
#                                          half GCC's time)
#
# Checks the Debian packages it needs first. As root it installs what is missing with apt-get;
# otherwise it prints the apt-get command to run and stops.
#
# Environment: TITANS_JOBS (default 2) parallel build/test jobs; CMAKE_GENERATOR to force a
# generator (default: Ninja if installed, else Unix Makefiles).
set -euo pipefail

DEMO_TARGET=niah
JOBS="${TITANS_JOBS:-2}"

# The demo needs a compiler, CMake and Eigen; the tests also GoogleTest and Google Benchmark.
REQUIRED_PACKAGES=(cmake g++ libeigen3-dev)
TEST_PACKAGES=(libgtest-dev libbenchmark-dev)
# Optional: OpenBLAS (TITANS_USE_BLAS), nlohmann-json (checkpoints), clang + libFuzzer (fuzz test,
# and the sanitizer build, which needs clang's OpenMP runtime), PyTorch (the twin's tests).
EXTRA_TEST_PACKAGES=(libopenblas-dev nlohmann-json3-dev clang libclang-rt-dev libomp-dev python3-torch python3-numpy)

cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() {
  printf '\n==== %s ====\n' "$*"
}

usage() {
  cat <<USAGE
usage: scripts/quickstart.sh demo [args...]   build and run the demo program
       scripts/quickstart.sh test             build and run all tests (release, then asan)
USAGE
}

is_root() {
  [ "$(id -u)" -eq 0 ]
}

# True if the Debian package is installed.
have_package() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# Lists the missing packages among the arguments (tools found on PATH count as present).
missing_packages() {
  local pkg
  for pkg in "$@"; do
    case "$pkg" in
      cmake) command -v cmake >/dev/null 2>&1 && continue ;;
      g++) command -v g++ >/dev/null 2>&1 && continue ;;
      make) command -v make >/dev/null 2>&1 && continue ;;
    esac
    have_package "$pkg" || printf '%s\n' "$pkg"
  done
}

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "$@"
}

# ensure_packages <mode>: installs (root) or reports (non-root) what the mode needs.
ensure_packages() {
  local mode="$1"
  section "Checking packages"
  if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "dpkg-query not found: not a Debian-based system, skipping the package check."
    echo "Needed: CMake >= 3.21, a C++17 compiler, Eigen 3.4, GoogleTest, Google Benchmark, make or ninja."
    return 0
  fi

  local wanted=("${REQUIRED_PACKAGES[@]}")
  if [ "$mode" = test ]; then
    wanted+=("${TEST_PACKAGES[@]}")
  fi
  if ! command -v ninja >/dev/null 2>&1; then
    wanted+=(make)
  fi
  local missing extras
  mapfile -t missing < <(missing_packages "${wanted[@]}")
  extras=()
  if [ "$mode" = test ]; then
    mapfile -t extras < <(missing_packages "${EXTRA_TEST_PACKAGES[@]}")
  fi

  if [ "${#missing[@]}" -eq 0 ] && [ "${#extras[@]}" -eq 0 ]; then
    echo "All required packages are installed."
    return 0
  fi

  if is_root; then
    local all=("${missing[@]}" "${extras[@]}")
    echo "Installing: ${all[*]}"
    apt_install "${all[@]}"
    return 0
  fi

  if [ "${#missing[@]}" -gt 0 ]; then
    local all=("${missing[@]}" "${extras[@]}")
    echo "Missing packages: ${missing[*]}" >&2
    echo "Install them with:" >&2
    echo "  sudo apt-get install -y --no-install-recommends ${all[*]}" >&2
    exit 1
  fi
  echo "Optional packages not installed (some features and tests will be skipped): ${extras[*]}"
  echo "  sudo apt-get install -y --no-install-recommends ${extras[*]}"
}

check_cmake_version() {
  local version major minor
  version="$(cmake --version | head -n1 | awk '{print $3}')"
  major="${version%%.*}"
  minor="${version#*.}"
  minor="${minor%%.*}"
  if [ "$major" -lt 3 ] || { [ "$major" -eq 3 ] && [ "$minor" -lt 21 ]; }; then
    echo "CMake $version is too old: the presets need CMake >= 3.21." >&2
    exit 1
  fi
}

# Picks the generator for a preset's build directory: the one it was configured with if it
# exists, else $CMAKE_GENERATOR, else Ninja when installed, else Unix Makefiles.
choose_generator() {
  local preset="$1" cache="build/$1/CMakeCache.txt" generator=""
  if [ -f "$cache" ]; then
    generator="$(sed -n 's/^CMAKE_GENERATOR:INTERNAL=//p' "$cache")"
  fi
  if [ -z "$generator" ]; then
    if [ -n "${CMAKE_GENERATOR:-}" ]; then
      generator="$CMAKE_GENERATOR"
    elif command -v ninja >/dev/null 2>&1; then
      generator=Ninja
    else
      generator="Unix Makefiles"
    fi
  fi
  export CMAKE_GENERATOR="$generator"
}

configure() {
  local preset="$1"
  shift
  choose_generator "$preset"
  section "Configure: preset $preset ($CMAKE_GENERATOR)"
  cmake --preset "$preset" "$@"
}

build() {
  local preset="$1"
  shift
  section "Build: preset $preset${*:+ ($*)}"
  cmake --build --preset "$preset" -j "$JOBS" "$@"
}

run_tests() {
  local preset="$1"
  section "Test: preset $preset"
  ctest --preset "$preset" -j "$JOBS" --output-on-failure
}

# slowest_tests <preset>: the ten longest tests of the last run (from ctest's cost data).
slowest_tests() {
  local cost="build/$1/Testing/Temporary/CTestCostData.txt"
  [ -f "$cost" ] || return 0
  echo "Slowest tests ($1):"
  # name count seconds per line (a name may hold spaces); awk reads everything, so no SIGPIPE
  sed '/^---/,$d' "$cost" | awk '{t = $NF; NF -= 2; printf "%s\t%s\n", t, $0}' | sort -t "$(printf '\t')" -k1 -g -r |
    awk -F '\t' 'NR <= 10 {printf "  %8.1f s  %s\n", $1, $2}'
}

# slowest_units <preset>: the ten longest compile steps of the last build (Ninja's log only).
slowest_units() {
  local log="build/$1/.ninja_log"
  [ -f "$log" ] || return 0
  echo "Slowest build steps ($1):"
  # start end mtime output hash per line, times in ms; the last entry of an output wins
  awk -F '\t' '!/^#/ {t[$4] = ($2 - $1) / 1000} END {for (o in t) printf "%s\t%s\n", t[o], o}' "$log" |
    sort -t "$(printf '\t')" -k1 -g -r | awk -F '\t' 'NR <= 10 {printf "  %8.1f s  %s\n", $1, $2}'
}

# timed <label> <command...>: runs the command and records how long it took.
PHASES=()
timed() {
  local label="$1" t0=$SECONDS
  shift
  "$@"
  PHASES+=("$(printf '%6d s  %s' $((SECONDS - t0)) "$label")")
}

cmd_demo() {
  ensure_packages demo
  check_cmake_version
  if [ ! -f "examples/$DEMO_TARGET.cpp" ]; then
    echo "examples/$DEMO_TARGET.cpp does not exist: no demo to build." >&2
    exit 1
  fi
  # The demo needs neither GoogleTest nor Google Benchmark: without them the tests and the
  # benchmarks are left out of the build (the test command turns them back on).
  local options=()
  if command -v dpkg-query >/dev/null 2>&1; then
    have_package libgtest-dev || options+=(-DTITANS_BUILD_TESTS=OFF)
    have_package libbenchmark-dev || options+=(-DTITANS_BUILD_BENCHMARKS=OFF)
  fi
  configure release "${options[@]}"
  build release --target "$DEMO_TARGET"
  section "Run: build/release/examples/$DEMO_TARGET${*:+ $*}"
  "build/release/examples/$DEMO_TARGET" "$@"
}

cmd_test() {
  local start=$SECONDS
  ensure_packages test
  check_cmake_version

  timed "configure + build, release" eval 'configure release -DTITANS_BUILD_TESTS=ON -DTITANS_BUILD_BENCHMARKS=ON && build release'
  timed "tests, release" run_tests release

  # The sanitizer half: with clang++ it builds a little faster and its tests run in half the
  # time of GCC's (README, "How long the tests take").
  local asan=asan
  if command -v clang++ >/dev/null 2>&1; then
    asan=asan-clang
  fi
  timed "configure + build, $asan" eval "configure $asan && build $asan"
  timed "tests, $asan (unit)" run_tests "$asan"

  section "Times"
  printf '%s\n' "${PHASES[@]}"
  slowest_units release
  slowest_units "$asan"
  slowest_tests release
  slowest_tests "$asan"
  section "All tests passed ($((SECONDS - start)) s)"
}

mode="${1:-}"
if [ $# -gt 0 ]; then
  shift
fi
case "$mode" in
  demo) cmd_demo "$@" ;;
  test)
    if [ $# -gt 0 ]; then
      usage >&2
      exit 2
    fi
    cmd_test
    ;;
  -h | --help | help) usage ;;
  *)
    usage >&2
    exit 2
    ;;
esac
