// Consumer check (fetchcontent): the embedded titans headers compile and link through
// titans::titans, and a few public functions give the expected values.
#include <titans/titans.hpp>

#include <iostream>
#include <string>

namespace {

// A minimal parameter set (see titans/parameters.hpp).
struct Params {
  using scalar_type = double;
  titans::Matrix<double> w = titans::Matrix<double>::Constant(3, 4, 0.5);  // (3, 4)
  titans::Matrix<double> b = titans::Matrix<double>::Ones(3, 1);           // (3, 1)

  template <class F>
  void for_each(F&& f) {
    f(std::string("w"), w);
    f(std::string("b"), b);
  }
  template <class F>
  void for_each(F&& f) const {
    f(std::string("w"), w);
    f(std::string("b"), b);
  }
};

}  // namespace

int main() {
  const Params p;
  const Params g = titans::zeros_like(p);
  titans::check_same_layout("consumer", p, g);
  const bool ok = titans::parameter_count(p) == 15 && p.w.sum() == 6.0 && g.w.sum() == 0.0 &&
                  g.b.sum() == 0.0 && titans::parameter_names(p).size() == 2;
  if (!ok) {
    std::cerr << "titans consumer (fetchcontent): unexpected values\n";
    return 1;
  }
  std::cout << "titans consumer (fetchcontent): ok\n";
  return 0;
}
