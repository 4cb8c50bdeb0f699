// ODR check, translation unit A: instantiates titans templates that b.cpp instantiates too.
#include <titans/titans.hpp>

#include "params.hpp"

// Returns the sum of zeros_like(params) plus the parameter count: 0 + 6.
double odr_a() {
  const odr::Params p;
  const odr::Params g = titans::zeros_like(p);
  titans::detail::check_shape("odr_a", "g.w", g.w, 2, 3);
  return g.w.sum() + static_cast<double>(titans::parameter_count(p));
}
