// SPDX-License-Identifier: Apache-2.0
//
// \file detail/state_passes.hpp
// \brief The chunk's end as one register-blocked pass over the memory state (W_l, S_l)
// (docs/MATH.md §3.3), instead of an axpby and two GEMMs that stream W three times and S twice.
//
// The blocks are Eigen fixed-size vectors mapped onto the column-major storage, so the compiler
// sees every operation at its size and keeps the accumulators in registers; the rows and
// columns left over after the last full block go through the same arithmetic one at a time.
#pragma once

#include "../common.hpp"

namespace titans::detail {

/// The chunk's end for one layer (docs/MATH.md §3.2) in one pass over W and S:
///   W ← β W + c S − T Aᵀ,    S ← p S − U Aᵀ
/// with T, U (rows × n) and `at` = Aᵀ (n × cols). Each group of G columns of W and S is read
/// once and written once; the row blocks of T and U it meets come from the L1/L2 cache
/// (rows × n × 2 scalars in all). The accumulators, (W, S) × G columns × two packets of rows,
/// fill half of the SIMD registers (G = 4 with 32 registers, 2 with 16), so each load of T and
/// U and each broadcast of Aᵀ meets G or 2 FMAs.
template <class Scalar>
void update_state_pair(Matrix<Scalar>& w, Matrix<Scalar>& s, Scalar beta, Scalar c, Scalar p, const Matrix<Scalar>& t,
                       const Matrix<Scalar>& u, const Matrix<Scalar>& at) {
  constexpr int P = Eigen::internal::packet_traits<Scalar>::size;
  constexpr int R = 2 * P;  // rows per block
  constexpr int G = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 4 : 2;  // columns per group
  using Vec = Eigen::Matrix<Scalar, R, 1>;
  using In = Eigen::Map<const Vec>;
  using Out = Eigen::Map<Vec>;
  const Index rows = w.rows(), cols = w.cols(), n = t.cols();
  Scalar* pw = w.data();
  Scalar* ps = s.data();
  const Scalar* pt = t.data();
  const Scalar* pu = u.data();
  const Scalar* pa = at.data();
  const Index full_rows = rows - rows % R;
  Index j = 0;
  for (; j + G <= cols; j += G) {
    for (Index r = 0; r < full_rows; r += R) {
      Vec accw[G], accs[G];
      for (int g = 0; g < G; ++g) {
        const In wj(pw + (j + g) * rows + r), sj(ps + (j + g) * rows + r);
        accw[g] = beta * wj + c * sj;
        accs[g] = p * sj;
      }
      for (Index i = 0; i < n; ++i) {
        const In ti(pt + i * rows + r), ui(pu + i * rows + r);
        for (int g = 0; g < G; ++g) {
          const Scalar aji = pa[(j + g) * n + i];
          accw[g].noalias() -= aji * ti;
          accs[g].noalias() -= aji * ui;
        }
      }
      for (int g = 0; g < G; ++g) {
        Out(pw + (j + g) * rows + r) = accw[g];
        Out(ps + (j + g) * rows + r) = accs[g];
      }
    }
  }
  // The rows after the last full block, and the columns after the last full group: one at a time.
  auto one = [&](Index r, Index jj) {
    Scalar accw = beta * pw[jj * rows + r] + c * ps[jj * rows + r];
    Scalar accs = p * ps[jj * rows + r];
    for (Index i = 0; i < n; ++i) {
      accw -= pa[jj * n + i] * pt[i * rows + r];
      accs -= pa[jj * n + i] * pu[i * rows + r];
    }
    pw[jj * rows + r] = accw;
    ps[jj * rows + r] = accs;
  };
  for (Index jj = 0; jj < j; ++jj)
    for (Index r = full_rows; r < rows; ++r) one(r, jj);
  for (Index jj = j; jj < cols; ++jj)
    for (Index r = 0; r < rows; ++r) one(r, jj);
}

}  // namespace titans::detail
