// The built-in video-like workload. It reproduces what makes a video DiT's self-attention
// friendly to clustering-based sparse attention, so every method can be exercised without a
// model:
//  * Tokens are pieces of a few things: background regions (sky, tree line, two ground areas,
//    panning slowly with the camera) and 4-6 moving objects that bounce off the frame edges and
//    occlude each other. Tokens of one thing share a class embedding, so Q and K form clusters
//    (what k-means finds); texture attached to the thing, a little per-frame noise and smooth
//    "lighting" give each cluster a realistic spread (what the centroid compensation must
//    absorb).
//  * Each head projects the features with its own W_q, W_k, W_v. W_k is correlated with W_q,
//    as in trained attention where q.k is large for similar content; otherwise random
//    projections would attend to arbitrary classes.
//  * 3D RoPE over (t, y, x), laid out as Wan does. Positional strength per head is a fixed
//    vector p added to q and k before the rotation: R(m)p . R(n)p = sum over pairs of
//    |p_pair|^2 cos(theta_pair (n - m)), a kernel peaked at zero displacement along the axes
//    where p has energy, while the content term keeps its meaning. This is how trained DiTs get
//    local heads with fixed RoPE frequencies; scaling positions instead would be a different
//    RoPE per head. p's energy per axis selects the head's role (see WorkloadHeadRole); its
//    norm the strength (a trace for semantic heads, dominant for positional ones).
//  * Logits q.k/sqrt(D) are rescaled per head to a standard deviation of 1.5-1.9 (semantic)
//    or 2.2-2.7 (positional): a per-head temperature which, for thousands of keys, puts the
//    row maximum some 5-10 units above the mean: peaky rows, not one-hot.
//
// Everything is a pure function of (shape, seed), computed with our own PRNG, normals and
// elementary functions built only from + - * / sqrt floor frexp ldexp (all exactly specified
// by IEEE 754 and C++), so the bytes are the same on every platform: std::*_distribution and
// libm's sin/log/exp are not specified to the last bit; contraction into fused multiply-add
// is switched off below.
#include "svgear/workload.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "svgear/error.hpp"
#include "video_scene.hpp"

// No fused multiply-add: it rounds once where the source rounds twice, so results would depend
// on the target (FMA hardware, -march) and the compiler's contraction default. (An explicit
// -ffp-contract=fast or -ffast-math still overrides this.)
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace svgear {
namespace {

// ---------------------------------------------------------------------------------------------
// Platform-independent elementary functions (double precision, errors of a few ulp).

constexpr double kPi = 3.14159265358979323846;
constexpr double kLn2Hi = 6.93147180369123816490e-01;  // fdlibm split: k * kLn2Hi is exact
constexpr double kLn2Lo = 1.90821492927058770002e-10;
constexpr double kInvLn2 = 1.44269504088896338700e+00;
constexpr double kPio2Hi = 1.57079632673412561417e+00;  // fdlibm pio2_1: 33 bits
constexpr double kPio2Lo = 6.07710050650619224932e-11;
constexpr double kTwoOverPi = 6.36619772367581382433e-01;
constexpr double kSqrtHalf = 7.07106781186547524401e-01;

// 1/n for n < 22, rounded once at compile time: series coefficients without run-time division.
constexpr std::array<double, 22> kInverse = [] {
  std::array<double, 22> inverse{};
  for (std::size_t n = 1; n < inverse.size(); ++n) inverse[n] = 1.0 / double(n);
  return inverse;
}();

double det_exp(double x) {
  const double k = std::floor(x * kInvLn2 + 0.5);
  const double r = (x - k * kLn2Hi) - k * kLn2Lo;  // |r| <= ln2 / 2
  double sum = 1.0;  // Taylor to r^14 / 14!: below 1e-17
  for (std::size_t i = kInverse.size(); i-- > 1;) sum = 1.0 + sum * r * kInverse[i];
  return std::ldexp(sum, int(k));
}

double det_log(double x) {  // x > 0
  int exponent = 0;
  double m = std::frexp(x, &exponent);
  if (m < kSqrtHalf) {
    m *= 2.0;
    --exponent;
  }
  // log m = 2 atanh(s) = 2 (s + s^3/3 + ...), |s| <= 0.172: 11 terms reach 1e-17.
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  double sum = kInverse[21];
  for (int k = 19; k >= 1; k -= 2) sum = sum * s2 + kInverse[std::size_t(k)];
  return exponent * kLn2Hi + (2.0 * s * sum + exponent * kLn2Lo);
}

struct SinCos {
  double sin;
  double cos;
};

SinCos det_sincos(double angle) {
  const double k = std::floor(angle * kTwoOverPi + 0.5);
  const double r = (angle - k * kPio2Hi) - k * kPio2Lo;  // |r| <= pi / 4
  const double r2 = r * r;
  // Taylor series in Horner form: sin's n-th factor is 1/((2n)(2n+1)), cos's 1/((2n-1)(2n)).
  double sn = 1.0;
  for (std::size_t n = 8; n >= 1; --n) sn = 1.0 - sn * r2 * kInverse[2 * n] * kInverse[2 * n + 1];
  double cs = 1.0;
  for (std::size_t n = 9; n >= 1; --n) cs = 1.0 - cs * r2 * kInverse[2 * n - 1] * kInverse[2 * n];
  sn *= r;
  switch (((std::int64_t(k) % 4) + 4) % 4) {
    case 0: return {sn, cs};
    case 1: return {cs, -sn};
    case 2: return {-sn, -cs};
    default: return {-cs, sn};
  }
}

// ---------------------------------------------------------------------------------------------
// Random numbers: xoshiro256** seeded through splitmix64 from a key that names the stream
// (what is drawn, for which batch element / head / texture cell), so each stream is independent
// of the order in which the others are consumed.

std::uint64_t mix64(std::uint64_t z) {  // splitmix64's finalizer
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

enum class Stream : std::uint64_t {
  head_params = 1,
  head_weights,
  scene,
  class_embedding,
  texture,
  frame_noise,
  lighting,
};

template <typename... Parts>
std::uint64_t stream_key(std::uint64_t seed, Stream stream, Parts... parts) {
  std::uint64_t key = mix64(seed ^ mix64(std::uint64_t(stream)));
  ((key = mix64(key ^ mix64(std::uint64_t(std::int64_t(parts))))), ...);
  return key;
}

class Rng {
 public:
  explicit Rng(std::uint64_t key) {
    for (std::uint64_t& word : state_) {
      key += 0x9e3779b97f4a7c15ULL;
      word = mix64(key);
    }
  }

  std::uint64_t next() {  // xoshiro256**
    const std::uint64_t result = rotl(state_[1] * 5, 7) * 9;
    const std::uint64_t t = state_[1] << 17;
    state_[2] ^= state_[0];
    state_[3] ^= state_[1];
    state_[1] ^= state_[2];
    state_[0] ^= state_[3];
    state_[2] ^= t;
    state_[3] = rotl(state_[3], 45);
    return result;
  }

  double uniform() { return double(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  double sign() { return (next() >> 63) ? 1.0 : -1.0; }

  double normal() {  // Box-Muller; the second value of each pair is kept for the next call
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = double((next() >> 11) + 1) * 0x1.0p-53;  // (0, 1]: log is finite
    const double radius = std::sqrt(-2.0 * det_log(u1));
    const SinCos sc = det_sincos(2.0 * kPi * uniform());
    spare_ = radius * sc.sin;
    has_spare_ = true;
    return radius * sc.cos;
  }

  void fill_normal(float* out, std::size_t count, double scale) {
    for (std::size_t i = 0; i < count; ++i) out[i] = float(scale * normal());
  }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  std::array<std::uint64_t, 4> state_{};
  double spare_ = 0.0;
  bool has_spare_ = false;
};

// ---------------------------------------------------------------------------------------------
// Shape validation.

constexpr std::int64_t kMaxElements = std::int64_t(1) << 31;  // per tensor

void require_positive(const char* field, int value) {
  if (value < 1) {
    throw Error(std::string("workload shape: ") + field + " = " + std::to_string(value) +
                "; it must be at least 1");
  }
}

void validate_shape(const WorkloadShape& shape) {
  require_positive("frames", shape.frames);
  require_positive("height", shape.height);
  require_positive("width", shape.width);
  require_positive("heads", shape.heads);
  require_positive("head_dim", shape.head_dim);
  require_positive("batch", shape.batch);
  if (shape.head_dim % 2 != 0) {
    throw Error("workload shape: head_dim = " + std::to_string(shape.head_dim) +
                "; it must be even (RoPE rotates pairs of dimensions), e.g. 64 or 128");
  }
  // Each factor is below 2^31 and the running product is checked before it passes 2^31, so no
  // intermediate can overflow.
  std::int64_t elements = 1;
  for (int factor :
       {shape.batch, shape.heads, shape.frames, shape.height, shape.width, shape.head_dim}) {
    elements *= factor;
    if (elements > kMaxElements) {
      throw Error("workload shape: batch x heads x frames x height x width x head_dim exceeds " +
                  std::to_string(kMaxElements) +
                  " elements per tensor, too large for the built-in generator; use a smaller "
                  "grid, fewer frames or heads, or load real tensors from a file");
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The scene: background regions and moving objects on the token grid.

struct MovingObject {
  bool round = true;
  double x0 = 0, y0 = 0;              // centre at frame 0, in tokens
  double vx = 0, vy = 0;              // tokens per frame
  double half_w = 1, half_h = 1;      // radii (ellipse) or half extents (rectangle)
};

// Position on [lo, hi] of a point moving freely from `start` and bouncing off both ends.
double bounce(double start, double travelled, double lo, double hi) {
  const double span = hi - lo;
  if (span <= 0.0) return 0.5 * (lo + hi);
  double u = start - lo + travelled;
  u -= 2.0 * span * std::floor(u / (2.0 * span));
  return lo + (u > span ? 2.0 * span - u : u);
}

struct Scene {
  double pan = 0;  // camera pan in tokens per frame: the background slides, objects don't
  double sky_level = 0, sky_wave = 0, sky_freq = 0, sky_phase = 0;
  double tree_level = 0, tree_wave = 0, tree_freq = 0, tree_phase = 0;
  double split_top = 0, split_bottom = 0;  // ground split line, as fractions of the width
  std::vector<MovingObject> objects;
};

Scene draw_scene(const WorkloadShape& shape, int batch_index) {
  Rng rng(stream_key(shape.seed, Stream::scene, batch_index));
  Scene scene;
  scene.pan = rng.uniform(-0.02, 0.02) * shape.width;
  scene.sky_level = rng.uniform(0.2, 0.35);
  scene.sky_wave = rng.uniform(0.03, 0.08);
  scene.sky_freq = rng.uniform(0.7, 1.8);
  scene.sky_phase = rng.uniform(0.0, 2.0 * kPi);
  scene.tree_level = scene.sky_level + rng.uniform(0.15, 0.25);
  scene.tree_wave = rng.uniform(0.02, 0.06);
  scene.tree_freq = rng.uniform(1.5, 3.5);
  scene.tree_phase = rng.uniform(0.0, 2.0 * kPi);
  scene.split_top = rng.uniform(0.35, 0.65);
  scene.split_bottom = scene.split_top + rng.uniform(-0.3, 0.3);

  const double extent = std::min(shape.width, shape.height);
  const int count = 4 + int(rng.next() % 3);
  for (int i = 0; i < count; ++i) {
    MovingObject object;
    object.round = (rng.next() >> 63) != 0;
    const double size = rng.uniform(0.08, 0.22) * extent;
    const double aspect = rng.uniform(0.6, 1.6);
    object.half_w = std::max(0.6, size * aspect);
    object.half_h = std::max(0.6, size / aspect);
    object.x0 = rng.uniform(0.0, shape.width);
    object.y0 = rng.uniform(0.25, 1.0) * shape.height;  // mostly below the sky
    // One draw per statement: the evaluation order of a * b's operands is unspecified.
    const double x_sign = rng.sign();
    object.vx = x_sign * rng.uniform(0.01, 0.05) * shape.width;
    const double y_sign = rng.sign();
    object.vy = y_sign * rng.uniform(0.0, 0.025) * shape.height;
    scene.objects.push_back(object);
  }
  return scene;
}

// A token's class and the texture cell it shows: cells move with the thing they belong to
// (world coordinates for the background, object coordinates for an object), so a texture
// detail persists across frames.
struct TokenLabel {
  int cls = 0;
  std::int64_t cell_u = 0, cell_v = 0;
};

class SceneRaster {
 public:
  SceneRaster(const WorkloadShape& shape, const Scene& scene) : shape_(shape), scene_(scene) {
    // Object centres per frame, evaluated once.
    centres_.resize(std::size_t(shape.frames) * scene.objects.size());
    for (int f = 0; f < shape.frames; ++f) {
      for (std::size_t i = 0; i < scene.objects.size(); ++i) {
        const MovingObject& o = scene.objects[i];
        const double cx = bounce(o.x0, o.vx * f, o.half_w, shape.width - o.half_w);
        const double cy = bounce(o.y0, o.vy * f, o.half_h, shape.height - o.half_h);
        centres_[std::size_t(f) * scene.objects.size() + i] = {cx, cy};
      }
    }
  }

  TokenLabel label(int f, int y, int x) const {
    const double px = x + 0.5, py = y + 0.5;
    for (std::size_t i = scene_.objects.size(); i-- > 0;) {  // the last drawn is on top
      const MovingObject& o = scene_.objects[i];
      const auto& c = centres_[std::size_t(f) * scene_.objects.size() + i];
      const double dx = (px - c[0]) / o.half_w, dy = (py - c[1]) / o.half_h;
      const bool inside = o.round ? dx * dx + dy * dy <= 1.0
                                  : std::fabs(dx) <= 1.0 && std::fabs(dy) <= 1.0;
      if (inside) {
        return {kWorkloadBackgroundClasses + int(i), std::int64_t(std::floor(px - c[0])),
                std::int64_t(std::floor(py - c[1]))};
      }
    }
    const double wx = px + scene_.pan * f;  // world column under this pixel
    const double u = wx / shape_.width, v = py / shape_.height;
    const double sky =
        scene_.sky_level + scene_.sky_wave * det_sincos(2 * kPi * scene_.sky_freq * u +
                                                        scene_.sky_phase).sin;
    const double trees =
        scene_.tree_level + scene_.tree_wave * det_sincos(2 * kPi * scene_.tree_freq * u +
                                                          scene_.tree_phase).sin;
    int cls;
    if (v < sky) {
      cls = 0;
    } else if (v < trees) {
      cls = 1;
    } else {
      const double split = scene_.split_top + (scene_.split_bottom - scene_.split_top) * v;
      cls = u < split ? 2 : 3;
    }
    return {cls, std::int64_t(std::floor(wx)), y};
  }

 private:
  const WorkloadShape& shape_;
  const Scene& scene_;
  std::vector<std::array<double, 2>> centres_;
};

std::vector<TokenLabel> label_tokens(const WorkloadShape& shape, const Scene& scene) {
  const SceneRaster raster(shape, scene);
  std::vector<TokenLabel> labels;
  labels.reserve(std::size_t(shape.tokens()));
  for (int f = 0; f < shape.frames; ++f) {
    for (int y = 0; y < shape.height; ++y) {
      for (int x = 0; x < shape.width; ++x) labels.push_back(raster.label(f, y, x));
    }
  }
  return labels;
}

// ---------------------------------------------------------------------------------------------
// Token features: x = class embedding + texture + per-frame noise + lighting, in R^M.

int feature_dim(const WorkloadShape& shape) { return 2 * shape.head_dim; }

constexpr double kSharedClassFraction = 0.25;  // of |embedding|^2, common to the class's group
constexpr double kTextureScale = 0.45;         // relative to a class embedding's ~unit entries
constexpr double kFrameNoiseScale = 0.2;
constexpr double kLightingScale = 0.25;
constexpr int kLightingWaves = 3;

std::vector<float> token_features(const WorkloadShape& shape, int batch_index,
                                  const Scene& scene) {
  const std::size_t dim = std::size_t(feature_dim(shape));
  const std::size_t classes = kWorkloadBackgroundClasses + scene.objects.size();
  const std::vector<TokenLabel> labels = label_tokens(shape, scene);

  // Class embeddings, ~N(0, I): a group direction (background or object) plus their own.
  std::vector<float> embedding(classes * dim);
  {
    Rng rng(stream_key(shape.seed, Stream::class_embedding, batch_index));
    std::vector<float> group(2 * dim), own(dim);
    rng.fill_normal(group.data(), group.size(), 1.0);
    const double shared = std::sqrt(kSharedClassFraction);
    const double alone = std::sqrt(1.0 - kSharedClassFraction);
    for (std::size_t c = 0; c < classes; ++c) {
      rng.fill_normal(own.data(), dim, 1.0);
      const float* g = &group[(c < kWorkloadBackgroundClasses ? 0 : 1) * dim];
      for (std::size_t m = 0; m < dim; ++m) {
        embedding[c * dim + m] = float(shared * g[m] + alone * own[m]);
      }
    }
  }

  // Lighting: a few smooth waves over (t, y, x), each along its own feature direction.
  struct Wave {
    double ft, fy, fx, phase;
  };
  std::vector<Wave> waves(kLightingWaves);
  std::vector<float> wave_dirs(kLightingWaves * dim);
  {
    Rng rng(stream_key(shape.seed, Stream::lighting, batch_index));
    for (Wave& w : waves) {  // a braced list is evaluated left to right
      w = {rng.uniform(-0.5, 0.5), rng.uniform(-1.2, 1.2), rng.uniform(-1.2, 1.2),
           rng.uniform(0.0, 2.0 * kPi)};
    }
    rng.fill_normal(wave_dirs.data(), wave_dirs.size(),
                    kLightingScale / std::sqrt(double(kLightingWaves)));
  }

  Rng noise(stream_key(shape.seed, Stream::frame_noise, batch_index));
  std::vector<float> features(labels.size() * dim), texture(dim);
  std::size_t s = 0;
  for (int f = 0; f < shape.frames; ++f) {
    for (int y = 0; y < shape.height; ++y) {
      for (int x = 0; x < shape.width; ++x, ++s) {
        const TokenLabel& label = labels[s];
        Rng cell(stream_key(shape.seed, Stream::texture, batch_index, label.cls, label.cell_u,
                            label.cell_v));
        cell.fill_normal(texture.data(), dim, kTextureScale);
        std::array<double, kLightingWaves> light{};
        for (int k = 0; k < kLightingWaves; ++k) {
          const Wave& w = waves[std::size_t(k)];
          light[std::size_t(k)] =
              det_sincos(2 * kPi * (w.ft * f / shape.frames + w.fy * (y + 0.5) / shape.height +
                                    w.fx * (x + 0.5) / shape.width) +
                         w.phase)
                  .sin;
        }
        float* out = &features[s * dim];
        const float* e = &embedding[std::size_t(label.cls) * dim];
        for (std::size_t m = 0; m < dim; ++m) {
          double value = double(e[m]) + texture[m] + kFrameNoiseScale * noise.normal();
          for (int k = 0; k < kLightingWaves; ++k) {
            value += light[std::size_t(k)] * wave_dirs[std::size_t(k) * dim + m];
          }
          out[m] = float(value);
        }
      }
    }
  }
  return features;
}

// ---------------------------------------------------------------------------------------------
// Heads: projections, positional component, 3D RoPE, temperature.

constexpr double kRopeTheta = 10000.0;

// Wan's split of the D/2 rotation pairs: D/6 each to y and x, the rest to t, in that order
// along the head dimension (t, then y, then x).
struct RopeLayout {
  int t_pairs, y_pairs, x_pairs;
  int axis(int pair) const { return pair < t_pairs ? 0 : pair < t_pairs + y_pairs ? 1 : 2; }
  int axis_pairs(int axis) const { return axis == 0 ? t_pairs : axis == 1 ? y_pairs : x_pairs; }
  int index_in_axis(int pair) const {
    const int a = axis(pair);
    return pair - (a >= 1 ? t_pairs : 0) - (a == 2 ? y_pairs : 0);
  }
  // log of the angular frequency: theta^(-2i / dim_axis) with dim_axis = 2 * pairs of the axis.
  double log_frequency(int pair) const {
    return -double(index_in_axis(pair)) / axis_pairs(axis(pair)) * det_log(kRopeTheta);
  }
};

RopeLayout rope_layout(int head_dim) {
  const int pairs = head_dim / 2;
  const int spatial = head_dim / 6;
  return {pairs - 2 * spatial, spatial, spatial};
}

struct HeadParams {
  WorkloadHeadRole role = WorkloadHeadRole::semantic;
  double qk_correlation = 0.9;          // of W_k with W_q: how much q.k rewards similar content
  double content_scale = 1.0;           // of W_q and W_k: positional heads weigh content less
  double positional_norm = 0.0;         // |p| / sqrt(D)
  std::array<double, 3> axis_energy{};  // share of |p|^2 per axis (t, y, x)
  double logit_std = 2.0;               // target std of q.k/sqrt(D) over a row's keys
};

HeadParams draw_head_params(const WorkloadShape& shape, int head) {
  Rng rng(stream_key(shape.seed, Stream::head_params, head));
  HeadParams p;
  p.role = video_workload_head_role(head);
  p.qk_correlation = rng.uniform(0.8, 0.95);
  const double strength = rng.uniform(2.0, 2.6);
  const double temperature = rng.uniform(0.0, 1.0);
  switch (p.role) {
    case WorkloadHeadRole::semantic:
      p.positional_norm = 0.1 * strength;  // a trace of position, as no trained head has none
      p.axis_energy = {1.0 / 3, 1.0 / 3, 1.0 / 3};
      p.logit_std = 1.5 + 0.4 * temperature;
      return p;
    case WorkloadHeadRole::local: p.axis_energy = {1.0 / 3, 1.0 / 3, 1.0 / 3}; break;
    case WorkloadHeadRole::temporal: p.axis_energy = {0.0, 0.5, 0.5}; break;
    case WorkloadHeadRole::spatial: p.axis_energy = {0.8, 0.1, 0.1}; break;
  }
  p.content_scale = 0.7;
  p.positional_norm = strength;
  p.logit_std = 2.2 + 0.5 * temperature;  // positional heads are peakier
  return p;
}

// Energy of p per rotation pair: a log-normal band around a frequency whose period spans a few
// tokens (frames for t). Frequencies far above alias (cos(theta d) oscillates within the
// neighbourhood); far below are flat over the whole grid; only the band in between makes the
// kernel sum_pairs |p_pair|^2 cos(theta d) fall off with distance.
constexpr double kLocalFrequencyYX = 0.4;
constexpr double kLocalFrequencyT = 0.6;
constexpr double kLocalBandWidth = 1.0;  // in natural-log units of frequency

struct HeadWeights {
  std::vector<float> wq, wk, wv;  // [M][D]: the output dimension is innermost (vectorises)
  std::vector<float> bq, bk;      // [D]
  std::vector<float> positional;  // [D]: p, scaled by the head's strength
};

constexpr double kBiasScale = 0.3;

HeadWeights draw_head_weights(const WorkloadShape& shape, int head, const HeadParams& params) {
  const std::size_t d = std::size_t(shape.head_dim), m = std::size_t(feature_dim(shape));
  Rng rng(stream_key(shape.seed, Stream::head_weights, head));
  HeadWeights w;
  w.wq.resize(m * d);
  w.wk.resize(m * d);
  w.wv.resize(m * d);
  const double scale = 1.0 / std::sqrt(double(m));
  rng.fill_normal(w.wq.data(), w.wq.size(), params.content_scale * scale);
  rng.fill_normal(w.wk.data(), w.wk.size(), params.content_scale * scale);
  rng.fill_normal(w.wv.data(), w.wv.size(), scale);
  const double rho = params.qk_correlation, rest = std::sqrt(1.0 - rho * rho);
  for (std::size_t i = 0; i < w.wk.size(); ++i) {
    w.wk[i] = float(rho * w.wq[i] + rest * w.wk[i]);
  }
  w.bq.resize(d);
  w.bk.resize(d);
  rng.fill_normal(w.bq.data(), d, kBiasScale);
  rng.fill_normal(w.bk.data(), d, kBiasScale);

  const RopeLayout layout = rope_layout(shape.head_dim);
  const int pairs = shape.head_dim / 2;
  std::vector<double> energy(std::size_t(pairs), 0.0);
  std::array<double, 3> axis_total{};
  for (int pair = 0; pair < pairs; ++pair) {
    const int axis = layout.axis(pair);
    const double centre = det_log(axis == 0 ? kLocalFrequencyT : kLocalFrequencyYX);
    const double offset = (layout.log_frequency(pair) - centre) / kLocalBandWidth;
    energy[std::size_t(pair)] = det_exp(-0.5 * offset * offset);
    axis_total[std::size_t(axis)] += energy[std::size_t(pair)];
  }
  w.positional.assign(d, 0.0f);
  const double norm2 = params.positional_norm * params.positional_norm * double(d);
  for (int pair = 0; pair < pairs; ++pair) {
    const std::size_t axis = std::size_t(layout.axis(pair));
    const SinCos phase = det_sincos(rng.uniform(0.0, 2.0 * kPi));
    const double amplitude =
        std::sqrt(norm2 * params.axis_energy[axis] * energy[std::size_t(pair)] / axis_total[axis]);
    w.positional[2 * std::size_t(pair)] = float(amplitude * phase.cos);
    w.positional[2 * std::size_t(pair) + 1] = float(amplitude * phase.sin);
  }
  return w;
}

// cos/sin of position * frequency for every pair and every position along the pair's axis.
class RopeTable {
 public:
  explicit RopeTable(const WorkloadShape& shape) : pairs_(shape.head_dim / 2) {
    const RopeLayout layout = rope_layout(shape.head_dim);
    const std::array<int, 3> extent{shape.frames, shape.height, shape.width};
    for (int axis = 0; axis < 3; ++axis) {
      stride_[std::size_t(axis)] = std::size_t(extent[std::size_t(axis)]);
    }
    offset_.resize(std::size_t(pairs_));
    std::size_t total = 0;
    for (int pair = 0; pair < pairs_; ++pair) {
      offset_[std::size_t(pair)] = total;
      total += stride_[std::size_t(layout.axis(pair))];
    }
    table_.resize(total);
    axis_of_.resize(std::size_t(pairs_));
    for (int pair = 0; pair < pairs_; ++pair) {
      const int axis = layout.axis(pair);
      axis_of_[std::size_t(pair)] = axis;
      const double frequency = det_exp(layout.log_frequency(pair));
      for (std::size_t pos = 0; pos < stride_[std::size_t(axis)]; ++pos) {
        table_[offset_[std::size_t(pair)] + pos] = det_sincos(double(pos) * frequency);
      }
    }
  }

  // Rotates pairs (2j, 2j+1) of `vec` (the adjacent-pair convention of Wan's view_as_complex).
  void rotate(float* vec, int f, int y, int x) const {
    const std::array<std::size_t, 3> position{std::size_t(f), std::size_t(y), std::size_t(x)};
    for (int pair = 0; pair < pairs_; ++pair) {
      const SinCos& sc =
          table_[offset_[std::size_t(pair)] + position[std::size_t(axis_of_[std::size_t(pair)])]];
      const double re = vec[2 * pair], im = vec[2 * pair + 1];
      vec[2 * pair] = float(re * sc.cos - im * sc.sin);
      vec[2 * pair + 1] = float(re * sc.sin + im * sc.cos);
    }
  }

 private:
  int pairs_;
  std::array<std::size_t, 3> stride_{};
  std::vector<std::size_t> offset_;
  std::vector<int> axis_of_;
  std::vector<SinCos> table_;
};

// out[j] += sum_i x[i] w[i][j] for w of [m][d], summing over i in order for every j. The
// accumulators of kLanes outputs live in a local array (no aliasing), so this vectorises even
// at -O2 and gives the same bits either way.
void accumulate_projection(const float* x, std::size_t m, const float* w, std::size_t d,
                           float* out) {
  constexpr std::size_t kLanes = 8;
  std::size_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    std::array<float, kLanes> acc;
    for (std::size_t l = 0; l < kLanes; ++l) acc[l] = out[j + l];
    for (std::size_t i = 0; i < m; ++i) {
      const float xi = x[i];
      const float* row = &w[i * d + j];
      for (std::size_t l = 0; l < kLanes; ++l) acc[l] += xi * row[l];
    }
    for (std::size_t l = 0; l < kLanes; ++l) out[j + l] = acc[l];
  }
  for (; j < d; ++j) {
    float acc = out[j];
    for (std::size_t i = 0; i < m; ++i) acc += x[i] * w[i * d + j];
    out[j] = acc;
  }
}

// q, k, v of one (batch element, head), [S][D] each, before the temperature.
struct HeadTensors {
  std::vector<float> q, k, v;
};

HeadTensors project_head(const WorkloadShape& shape, const std::vector<float>& features,
                         const HeadWeights& w, const RopeTable& rope) {
  const std::size_t d = std::size_t(shape.head_dim), m = std::size_t(feature_dim(shape));
  const std::size_t tokens = std::size_t(shape.tokens());
  HeadTensors out;
  out.q.resize(tokens * d);
  out.k.resize(tokens * d);
  out.v.resize(tokens * d);
  std::size_t s = 0;
  for (int f = 0; f < shape.frames; ++f) {
    for (int y = 0; y < shape.height; ++y) {
      for (int x = 0; x < shape.width; ++x, ++s) {
        float* q = &out.q[s * d];
        float* k = &out.k[s * d];
        float* v = &out.v[s * d];
        for (std::size_t j = 0; j < d; ++j) {
          q[j] = w.bq[j] + w.positional[j];
          k[j] = w.bk[j] + w.positional[j];
          v[j] = 0.0f;
        }
        const float* xs = &features[s * m];
        accumulate_projection(xs, m, w.wq.data(), d, q);
        accumulate_projection(xs, m, w.wk.data(), d, k);
        accumulate_projection(xs, m, w.wv.data(), d, v);
        rope.rotate(q, f, y, x);
        rope.rotate(k, f, y, x);
      }
    }
  }
  return out;
}

// In a fixed order (kLanes interleaved partial sums, then summed in order), so it vectorises
// without -ffast-math and gives the same bits everywhere.
double dot_product(const float* a, const float* b, std::size_t n) {
  constexpr std::size_t kLanes = 8;
  std::array<float, kLanes> partial{};
  std::size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (std::size_t l = 0; l < kLanes; ++l) partial[l] += a[i + l] * b[i + l];
  }
  for (; i < n; ++i) partial[i % kLanes] += a[i] * b[i];
  double sum = 0.0;
  for (float p : partial) sum += p;
  return sum;
}

// Mean over a fixed sample of query rows of the standard deviation of q.k/sqrt(D) over keys.
double sampled_logit_std(const HeadTensors& t, std::size_t tokens, std::size_t d) {
  const std::size_t rows = std::min<std::size_t>(tokens, 64);
  const double inv_sqrt_d = 1.0 / std::sqrt(double(d));
  double total = 0.0;
  for (std::size_t r = 0; r < rows; ++r) {
    const float* q = &t.q[(r * tokens / rows + tokens / (2 * rows)) * d];
    double sum = 0.0, sum2 = 0.0;
    for (std::size_t key = 0; key < tokens; ++key) {
      const double logit = dot_product(q, &t.k[key * d], d) * inv_sqrt_d;
      sum += logit;
      sum2 += logit * logit;
    }
    const double mean = sum / tokens;
    total += std::sqrt(std::max(0.0, sum2 / tokens - mean * mean));
  }
  return total / rows;
}

}  // namespace

WorkloadHeadRole video_workload_head_role(int head) {
  switch (((head % 4) + 4) % 4) {
    case 0: return WorkloadHeadRole::semantic;
    case 1: return WorkloadHeadRole::local;
    case 2: return WorkloadHeadRole::temporal;
    default: return WorkloadHeadRole::spatial;
  }
}

int video_workload_class_count(const WorkloadShape& shape, int batch_index) {
  validate_shape(shape);
  return kWorkloadBackgroundClasses + int(draw_scene(shape, batch_index).objects.size());
}

std::vector<std::int32_t> video_workload_classes(const WorkloadShape& shape, int batch_index) {
  validate_shape(shape);
  if (batch_index < 0 || batch_index >= shape.batch) {
    throw Error("workload: batch index " + std::to_string(batch_index) + " is outside [0, " +
                std::to_string(shape.batch) + ")");
  }
  const Scene scene = draw_scene(shape, batch_index);
  std::vector<std::int32_t> classes;
  for (const TokenLabel& label : label_tokens(shape, scene)) classes.push_back(label.cls);
  return classes;
}

SafetensorsFile generate_video_workload(const WorkloadShape& shape) {
  validate_shape(shape);
  const std::int64_t batch = shape.batch, heads = shape.heads, tokens = shape.tokens(),
                     d = shape.head_dim;
  const std::vector<std::int64_t> dims{batch, heads, tokens, d};
  HostTensor q(DType::f32, dims), k(DType::f32, dims), v(DType::f32, dims);

  std::vector<std::vector<float>> features;
  for (int b = 0; b < shape.batch; ++b) {
    features.push_back(token_features(shape, b, draw_scene(shape, b)));
  }
  const RopeTable rope(shape);

  // Heads are independent pure functions of (shape, seed, h) writing disjoint slices, so they
  // run in parallel with the same bytes as a serial run (benchmark shapes have 12-40 heads).
#pragma omp parallel for schedule(dynamic, 1)
  for (int h = 0; h < shape.heads; ++h) {
    const HeadParams params = draw_head_params(shape, h);
    const HeadWeights weights = draw_head_weights(shape, h, params);
    // The temperature is a property of the head (the model), fixed from batch element 0.
    double qk_scale = 1.0;
    for (int b = 0; b < shape.batch; ++b) {
      HeadTensors t = project_head(shape, features[std::size_t(b)], weights, rope);
      if (b == 0) {
        const double std_now = sampled_logit_std(t, std::size_t(tokens), std::size_t(d));
        if (std_now > 1e-12) qk_scale = std::sqrt(params.logit_std / std_now);
      }
      const std::int64_t base = (std::int64_t(b) * heads + h) * tokens * d;
      for (std::int64_t i = 0; i < tokens * d; ++i) {
        q.set(base + i, float(t.q[std::size_t(i)] * qk_scale));
        k.set(base + i, float(t.k[std::size_t(i)] * qk_scale));
        v.set(base + i, t.v[std::size_t(i)]);
      }
    }
  }

  SafetensorsFile file;
  file.tensors.emplace("q", std::move(q));
  file.tensors.emplace("k", std::move(k));
  file.tensors.emplace("v", std::move(v));
  file.metadata["frames"] = std::to_string(shape.frames);
  file.metadata["height"] = std::to_string(shape.height);
  file.metadata["width"] = std::to_string(shape.width);
  return file;
}

}  // namespace svgear
