// A few lines of test harness for the C++ tests: CHECK records failures, main() runs the registered cases.
#pragma once

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace xo_test {

struct Case {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<Case>& cases() {
  static std::vector<Case> all;
  return all;
}

inline int& failures() {
  static int n = 0;
  return n;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { cases().push_back({name, std::move(fn)}); }
};

// Runs every case, or with `only` those whose name contains it (`./test_kernels_emulated epilogue`).
inline int run_all(const char* only = nullptr) {
  int ran = 0;
  for (const auto& c : cases()) {
    if (only != nullptr && std::string(c.name).find(only) == std::string::npos) continue;
    ++ran;
    const int before = failures();
    try {
      c.fn();
    } catch (const std::exception& e) {
      std::printf("  unexpected exception: %s\n", e.what());
      ++failures();
    }
    std::printf("%s %s\n", failures() == before ? "PASS" : "FAIL", c.name);
  }
  std::printf("%d cases, %d failed checks\n", ran, failures());
  return failures() == 0 && ran > 0 ? 0 : 1;
}

}  // namespace xo_test

#define XO_CONCAT2(a, b) a##b
#define XO_CONCAT(a, b) XO_CONCAT2(a, b)
#define TEST_CASE(name)                                                                   \
  static void name();                                                                     \
  static xo_test::Register XO_CONCAT(register_, name)(#name, name);                       \
  static void name()

#define EXPECT(cond)                                                                       \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::printf("  %s:%d: EXPECT(%s) failed\n", __FILE__, __LINE__, #cond);              \
      ++xo_test::failures();                                                              \
    }                                                                                     \
  } while (0)

#define EXPECT_NEAR(a, b, tol)                                                             \
  do {                                                                                    \
    const double _a = (a), _b = (b);                                                      \
    if (!(std::abs(_a - _b) <= (tol))) {                                                  \
      std::printf("  %s:%d: %s = %.10g, %s = %.10g, differ by more than %g\n", __FILE__,  \
                  __LINE__, #a, _a, #b, _b, static_cast<double>(tol));                    \
      ++xo_test::failures();                                                              \
    }                                                                                     \
  } while (0)
