// Lloyd-Max quantizers for the coordinate law of a rotated unit vector, in sqrt(d) units.
// docs/codebooks.md describes the laws, the iteration and its stopping rule.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <numbers>
#include <string>
#include <vector>

#include "core/codebook.h"
#include "core/error.h"

namespace tqkv::core {
namespace {

// Stop when one plain Lloyd step moves no centroid by this much (sqrt(d) units). Rounding
// noise in the Lloyd map is ~1e-15, so the bound is reachable at every level count.
constexpr double kTolerance = 1e-13;
// Newton reaches the tolerance in a handful of steps; this only guards against a bug turning
// the solve into plain Lloyd, which would need ~1e5 steps at 8 bits.
constexpr int kMaxIterations = 20000;
// Past 10 bits the Gaussian cells get so narrow that differencing erf leaves ~2e-13 of noise in
// the Lloyd map, above the tolerance; 10 bits converges for every law.
constexpr uint32_t kMaxBits = 10;

// 16-point Gauss-Legendre on pieces at most half a unit wide: the integrands are Gaussian-like
// with unit scale, so each piece is exact to rounding (checked against 24 points on 1/8 pieces).
constexpr int kGaussPoints = 16;
constexpr double kPieceWidth = 0.5;
// Integration stops here even where the support is wider: the density has dropped below
// exp(-0.49 * 16^2) ~ 1e-55 of its peak, far under double rounding of any cell's mass.
constexpr double kTailCut = 16.0;

struct GaussLegendre {
  std::array<double, kGaussPoints> node{};
  std::array<double, kGaussPoints> weight{};
};

// Nodes and weights on [-1, 1] by Newton's method on the Legendre polynomial; computing them
// keeps the generator self-contained and costs microseconds.
GaussLegendre make_gauss_legendre() {
  GaussLegendre gl;
  constexpr int n = kGaussPoints;
  for (int i = 0; i < n / 2; ++i) {
    double x = std::cos(std::numbers::pi * (i + 0.75) / (n + 0.5));
    double derivative = 0;
    for (int it = 0; it < 100; ++it) {
      double p_prev = 1, p = x;
      for (int k = 2; k <= n; ++k) {
        const double p_next = ((2 * k - 1) * x * p - (k - 1) * p_prev) / k;
        p_prev = p;
        p = p_next;
      }
      derivative = n * (x * p - p_prev) / (x * x - 1);
      const double dx = p / derivative;
      x -= dx;
      if (std::fabs(dx) < 1e-16) break;
    }
    const double w = 2 / ((1 - x * x) * derivative * derivative);
    gl.node[static_cast<size_t>(i)] = -x;
    gl.node[static_cast<size_t>(n - 1 - i)] = x;
    gl.weight[static_cast<size_t>(i)] = w;
    gl.weight[static_cast<size_t>(n - 1 - i)] = w;
  }
  return gl;
}

// Unnormalized coordinate density. Normalization constants cancel in centroids and in the
// Newton step; codebook_mse divides by the integral computed with the same rule.
struct Law {
  uint32_t d = 0;        // 0 = N(0,1)
  double exponent = 0;   // (d - 3) / 2
  double support = 0;    // sqrt(d), or infinity
  double upper = 0;      // integration limit, min(support, kTailCut)

  double density(double x) const {
    if (d == 0) return std::exp(-0.5 * x * x);
    const double t = x * x / d;
    if (t >= 1) return 0;
    // log1p keeps the exponent's relative accuracy near x = 0, where n * log would amplify it.
    return std::exp(exponent * std::log1p(-t));
  }
};

Law make_law(uint32_t head_dim) {
  Law law;
  law.d = head_dim;
  if (head_dim == 0) {
    law.support = std::numeric_limits<double>::infinity();
  } else {
    law.exponent = (static_cast<double>(head_dim) - 3) / 2;
    law.support = std::sqrt(static_cast<double>(head_dim));
  }
  law.upper = std::min(law.support, kTailCut);
  return law;
}

void check_head_dim(uint32_t head_dim) {
  // d = 3 is the uniform law; below it the density is unbounded at the ends.
  if (head_dim != 0 && head_dim < 3)
    invalid("head_dim: " + std::to_string(head_dim) +
            " is not supported; allowed: 0 (Gaussian limit) or >= 3");
}

// Calls visit(x, w * density(x)) for the quadrature nodes of [a, b].
template <class Visit>
void integrate(const Law& law, const GaussLegendre& gl, double a, double b, Visit&& visit) {
  if (!(b > a)) return;
  const double pieces = std::max(1.0, std::ceil((b - a) / kPieceWidth));
  const double h = (b - a) / pieces;
  const int count = static_cast<int>(pieces);
  for (int p = 0; p < count; ++p) {
    const double mid = a + (p + 0.5) * h;
    for (size_t i = 0; i < gl.node.size(); ++i) {
      const double x = mid + 0.5 * h * gl.node[i];
      visit(x, 0.5 * h * gl.weight[i] * law.density(x));
    }
  }
}

// The solver works on the m = levels/2 positive centroids: the law is symmetric, so the
// optimum is, and solving on one half makes the result symmetric by construction. Cell k is
// [b_{k-1}, b_k] with b_{-1} = 0 (the midpoint of -c_0 and c_0) and b_{m-1} = the support end.
struct Evaluation {
  std::vector<double> target;  // Lloyd map: conditional mean of each cell
  std::vector<double> mass;    // cell masses (unnormalized)
  std::vector<double> first;   // cell first moments (unnormalized)
  std::vector<double> edge;    // density at b_k, k < m - 1
  double change = 0;           // max |target - c|; infinity when a cell is empty
};

double upper_edge(const std::vector<double>& c, size_t k, const Law& law) {
  return k + 1 < c.size() ? 0.5 * (c[k] + c[k + 1]) : law.support;
}

// Gaussian cell moments in closed form (kernel exp(-x^2/2), 0 <= a < b <= inf).
void gaussian_cell(double a, double b, double& mass, double& first) {
  const double s = std::numbers::sqrt2;
  const double root_half_pi = std::sqrt(0.5 * std::numbers::pi);
  // Differencing erfc on the right of 1 (and erf left of it) keeps the cancellation below
  // ~1/(cell width) ulps, since neither term is much larger than the cell's mass there.
  if (a >= 1) {
    const double tail_b = std::isinf(b) ? 0.0 : std::erfc(b / s);
    mass = root_half_pi * (std::erfc(a / s) - tail_b);
  } else {
    const double cdf_b = std::isinf(b) ? 1.0 : std::erf(b / s);
    mass = root_half_pi * (cdf_b - std::erf(a / s));
  }
  // exp(-a^2/2) - exp(-b^2/2) without cancellation for narrow cells.
  const double ea = std::exp(-0.5 * a * a);
  first = std::isinf(b) ? ea : -ea * std::expm1(-0.5 * (b - a) * (b + a));
}

Evaluation evaluate(const std::vector<double>& c, const Law& law, const GaussLegendre& gl) {
  const size_t m = c.size();
  Evaluation e;
  e.target.resize(m);
  e.mass.resize(m);
  e.first.resize(m);
  e.edge.resize(m > 0 ? m - 1 : 0);
  double lower = 0;
  for (size_t k = 0; k < m; ++k) {
    const double upper = upper_edge(c, k, law);
    if (law.d == 0) {
      gaussian_cell(lower, upper, e.mass[k], e.first[k]);
    } else {
      double mass = 0, first = 0;
      integrate(law, gl, std::min(lower, law.upper), std::min(upper, law.upper),
                [&](double x, double w) {
                  mass += w;
                  first += w * x;
                });
      e.mass[k] = mass;
      e.first[k] = first;
    }
    if (k + 1 < m) e.edge[k] = law.density(upper);
    lower = upper;
  }
  for (size_t k = 0; k < m; ++k) {
    if (!(e.mass[k] > 0)) {
      e.change = std::numeric_limits<double>::infinity();
      return e;
    }
    e.target[k] = e.first[k] / e.mass[k];
    e.change = std::max(e.change, std::fabs(e.target[k] - c[k]));
  }
  return e;
}

// Newton step for the stationarity conditions G_k = c_k P_k - M1_k = 0 (half the gradient of
// the distortion). Moving c_k moves its two edges by half as much, and the edge terms of the
// derivative give a symmetric tridiagonal Jacobian:
//   dG_k/dc_k     = P_k - f(b_k) (c_{k+1} - c_k)/4 - f(b_{k-1}) (c_k - c_{k-1})/4
//   dG_k/dc_{k+1} = -f(b_k) (c_{k+1} - c_k)/4
// (b_{-1} = 0 does not move). Plain Lloyd contracts its slowest mode by only ~1 - 1/L^2 per
// step; Newton converges quadratically. Returns false if the Jacobian is not positive definite.
bool newton_step(const std::vector<double>& c, const Evaluation& e, std::vector<double>& step) {
  const size_t m = c.size();
  std::vector<double> diag(m), off(m > 0 ? m - 1 : 0), rhs(m);
  for (size_t k = 0; k < m; ++k) {
    diag[k] = e.mass[k];
    rhs[k] = e.first[k] - c[k] * e.mass[k];
  }
  for (size_t k = 0; k + 1 < m; ++k) {
    const double coupling = 0.25 * e.edge[k] * (c[k + 1] - c[k]);
    diag[k] -= coupling;
    diag[k + 1] -= coupling;
    off[k] = -coupling;
  }
  // Thomas algorithm; positive pivots are what a local minimum guarantees.
  for (size_t k = 0; k < m; ++k) {
    if (k > 0) {
      const double factor = off[k - 1] / diag[k - 1];
      diag[k] -= factor * off[k - 1];
      rhs[k] -= factor * rhs[k - 1];
    }
    if (!(diag[k] > 0) || !std::isfinite(diag[k])) return false;
  }
  step.assign(m, 0);
  for (size_t k = m; k-- > 0;) {
    const double next = k + 1 < m ? off[k] * step[k + 1] : 0.0;
    step[k] = (rhs[k] - next) / diag[k];
  }
  return true;
}

bool admissible(const std::vector<double>& c, const Law& law) {
  if (c.empty() || !(c.front() > 0) || !(c.back() < law.support)) return false;
  for (size_t k = 0; k + 1 < c.size(); ++k)
    if (!(c[k] < c[k + 1])) return false;
  return true;
}

// Upper-tail quantile of N(0,1) by bisection; only a starting point, so speed is irrelevant.
double normal_upper_quantile(double q) {
  double lo = 0, hi = 40;
  for (int it = 0; it < 80; ++it) {
    const double mid = 0.5 * (lo + hi);
    if (0.5 * std::erfc(mid / std::numbers::sqrt2) > q) lo = mid; else hi = mid;
  }
  return 0.5 * (lo + hi);
}

// Quantiles of the point density proportional to f^(1/3), the asymptotically optimal one
// (Panter-Dite), taken for the Gaussian where f^(1/3) is N(0, 3): within a few percent of the
// optimum at every level count, so Newton starts inside its basin.
std::vector<double> initial_centroids(size_t m, const Law& law) {
  const double levels = 2.0 * static_cast<double>(m);
  std::vector<double> c(m);
  for (size_t k = 0; k < m; ++k)
    c[k] = std::sqrt(3.0) * normal_upper_quantile((static_cast<double>(m - k) - 0.5) / levels);
  // Tiny d only: the Gaussian guess can pass the support.
  const double limit = 0.9 * law.support;
  if (c.back() > limit) {
    const double shrink = limit / c.back();
    for (double& v : c) v *= shrink;
  }
  return c;
}

}  // namespace

LloydMaxResult lloyd_max(uint32_t bits, uint32_t head_dim) {
  if (bits < 1 || bits > kMaxBits)
    invalid("bits: " + std::to_string(bits) + " is not supported; allowed: 1 to " +
            std::to_string(kMaxBits));
  check_head_dim(head_dim);
  const Law law = make_law(head_dim);
  const GaussLegendre gl = make_gauss_legendre();
  const size_t m = size_t{1} << (bits - 1);

  std::vector<double> c = initial_centroids(m, law);
  Evaluation current = evaluate(c, law, gl);
  std::vector<double> step, candidate(m);
  int iterations = 0;
  for (;;) {
    ++iterations;
    // The stopping step is a plain Lloyd step, so the result is a Lloyd fixed point to within
    // the tolerance whatever accelerated the approach.
    if (current.change < kTolerance) {
      c = current.target;
      break;
    }
    if (iterations > kMaxIterations || !std::isfinite(current.change))
      fail(TQKV_ERROR_INTERNAL, "lloyd_max: no convergence for bits " + std::to_string(bits) +
                                    ", head_dim " + std::to_string(head_dim));
    bool moved = false;
    if (newton_step(c, current, step)) {
      // Backtrack on the Lloyd residual, so a step taken far from the optimum cannot undo progress.
      for (double lambda = 1; lambda >= 1.0 / 64 && !moved; lambda *= 0.5) {
        for (size_t k = 0; k < m; ++k) candidate[k] = c[k] + lambda * step[k];
        if (!admissible(candidate, law)) continue;
        Evaluation trial = evaluate(candidate, law, gl);
        if (trial.change < current.change) {
          c = candidate;
          current = std::move(trial);
          moved = true;
        }
      }
    }
    if (!moved) {
      c = current.target;
      current = evaluate(c, law, gl);
    }
  }

  LloydMaxResult result;
  result.iterations = iterations;
  result.centroids.resize(2 * m);
  for (size_t k = 0; k < m; ++k) {
    result.centroids[m + k] = c[k];
    result.centroids[m - 1 - k] = -c[k];
  }
  result.boundaries.resize(2 * m - 1);
  for (size_t k = 0; k + 1 < 2 * m; ++k)
    result.boundaries[k] = 0.5 * (result.centroids[k] + result.centroids[k + 1]);
  result.mse = codebook_mse(result.centroids, head_dim);
  return result;
}

double codebook_mse(const std::vector<double>& centroids, uint32_t head_dim) {
  check_head_dim(head_dim);
  if (centroids.empty()) invalid("centroids: empty; need at least one level");
  for (size_t k = 0; k < centroids.size(); ++k) {
    if (!std::isfinite(centroids[k])) invalid("centroids: value " + std::to_string(k) + " is not finite");
    if (k > 0 && !(centroids[k - 1] <= centroids[k]))
      invalid("centroids: not ascending at index " + std::to_string(k));
  }
  const Law law = make_law(head_dim);
  const GaussLegendre gl = make_gauss_legendre();
  double total = 0;
  integrate(law, gl, -law.upper, law.upper, [&](double, double w) { total += w; });
  // Integrating (x - c)^2 directly, rather than combining moments, avoids losing digits to
  // cancellation when cells are narrow (8 bits: the error is ~1e-4 of the second moment).
  double error = 0;
  double lower = -law.upper;
  for (size_t k = 0; k < centroids.size(); ++k) {
    const double upper =
        k + 1 < centroids.size() ? std::clamp(0.5 * (centroids[k] + centroids[k + 1]), -law.upper, law.upper)
                                 : law.upper;
    const double ck = centroids[k];
    integrate(law, gl, lower, upper, [&](double x, double w) { error += w * (x - ck) * (x - ck); });
    lower = std::max(lower, upper);
  }
  return error / total;
}

}  // namespace tqkv::core
