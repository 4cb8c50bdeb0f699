// ODR check, translation unit B: the same templates as a.cpp, used differently.
#include <titans/titans.hpp>

#include "params.hpp"

// Returns 1 if check_shape throws ShapeError on a wrong shape and the sum of a titans matrix.
double odr_b() {
  const titans::Matrix<double> x = titans::Matrix<double>::Ones(2, 3);  // (2, 3)
  double threw = 0.0;
  try {
    titans::detail::check_shape("odr_b", "x", x, 3, 2);
  } catch (const titans::ShapeError&) {
    threw = 1.0;
  }
  odr::Params p;
  titans::set_zero(p);
  return threw + x.sum() + p.w.sum();  // 1 + 6 + 0
}
