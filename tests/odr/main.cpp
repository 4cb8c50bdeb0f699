// ODR check: links a.cpp and b.cpp, which both include the whole library.
#include <iostream>

double odr_a();
double odr_b();

int main() {
  const double a = odr_a();
  const double b = odr_b();
  if (a != 6.0 || b != 7.0) {
    std::cerr << "odr: expected 6 and 7, got " << a << " and " << b << "\n";
    return 1;
  }
  std::cout << "odr: ok\n";
  return 0;
}
