// A small parameter set shared by both ODR translation units (defined once, identically).
#pragma once

#include <titans/titans.hpp>

#include <string>

namespace odr {

struct Params {
  using scalar_type = double;
  titans::Matrix<double> w = titans::Matrix<double>::Constant(2, 3, 1.5);  // (2, 3)

  template <class F>
  void for_each(F&& f) {
    f(std::string("w"), w);
  }
  template <class F>
  void for_each(F&& f) const {
    f(std::string("w"), w);
  }
};

}  // namespace odr
