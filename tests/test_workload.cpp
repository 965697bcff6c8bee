// The built-in workload: its contract (shapes, metadata, determinism, errors) and the structure
// that makes it a stand-in for a video DiT's attention (clustered keys, peaky but not one-hot
// rows, heads that attend by content or by position).
#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "svgear/error.hpp"
#include "svgear/workload.hpp"
#include "workload/video_scene.hpp"

using namespace svgear;

namespace {

WorkloadShape odd_shape() {
  WorkloadShape shape;
  shape.frames = 3;
  shape.height = 5;
  shape.width = 7;
  shape.heads = 3;
  shape.head_dim = 10;  // not divisible by 6 or 8: exercises the RoPE split and the tails
  shape.batch = 2;
  shape.seed = 7;
  return shape;
}

// Rows of one (batch, head) slice of a [B, H, S, D] tensor.
struct Slice {
  const HostTensor* tensor;
  std::int64_t base, dim;
  float at(std::int64_t token, std::int64_t d) const { return tensor->at(base + token * dim + d); }
};

Slice slice(const HostTensor& t, const WorkloadShape& shape, int b, int h) {
  const std::int64_t dim = shape.head_dim;
  return {&t, ((std::int64_t(b) * shape.heads + h) * shape.tokens()) * dim, dim};
}

double cosine(const Slice& s, std::int64_t a, std::int64_t b) {
  double ab = 0, aa = 0, bb = 0;
  for (std::int64_t d = 0; d < s.dim; ++d) {
    ab += double(s.at(a, d)) * s.at(b, d);
    aa += double(s.at(a, d)) * s.at(a, d);
    bb += double(s.at(b, d)) * s.at(b, d);
  }
  return ab / std::sqrt(aa * bb);
}

// Softmax row of query `i` over all keys, in double.
std::vector<double> attention_row(const Slice& q, const Slice& k, std::int64_t tokens,
                                  std::int64_t i, double* max_minus_mean = nullptr) {
  std::vector<double> row(std::size_t(tokens), 0.0);
  double max = -1e300, mean = 0;
  for (std::int64_t j = 0; j < tokens; ++j) {
    double dot = 0;
    for (std::int64_t d = 0; d < q.dim; ++d) dot += double(q.at(i, d)) * k.at(j, d);
    row[std::size_t(j)] = dot / std::sqrt(double(q.dim));
    max = std::max(max, row[std::size_t(j)]);
    mean += row[std::size_t(j)] / double(tokens);
  }
  if (max_minus_mean) *max_minus_mean = max - mean;
  double total = 0;
  for (double& p : row) total += (p = std::exp(p - max));
  for (double& p : row) p /= total;
  return row;
}

// Fixed, spread-out query rows.
std::vector<std::int64_t> sample_rows(std::int64_t tokens, int count) {
  std::vector<std::int64_t> rows;
  for (int r = 0; r < count; ++r) rows.push_back((r * 7919 + 13) % tokens);
  return rows;
}

}  // namespace

TEST(Workload, TensorsHaveTheDocumentedShapeAndMetadata) {
  for (const WorkloadShape& shape : {WorkloadShape{}, odd_shape()}) {
    const SafetensorsFile file = generate_video_workload(shape);
    ASSERT_EQ(file.tensors.size(), 3u);
    const std::vector<std::int64_t> expected{shape.batch, shape.heads, shape.tokens(),
                                             shape.head_dim};
    for (const char* name : {"q", "k", "v"}) {
      ASSERT_TRUE(file.tensors.count(name)) << name;
      const HostTensor& t = file.tensors.at(name);
      EXPECT_EQ(t.dtype, DType::f32) << name;
      EXPECT_EQ(t.shape, expected) << name;
      EXPECT_EQ(t.bytes.size(), std::size_t(t.numel()) * 4) << name;
    }
    ASSERT_EQ(file.metadata.size(), 3u);
    EXPECT_EQ(file.metadata.at("frames"), std::to_string(shape.frames));
    EXPECT_EQ(file.metadata.at("height"), std::to_string(shape.height));
    EXPECT_EQ(file.metadata.at("width"), std::to_string(shape.width));
  }
}

TEST(Workload, SameSeedGivesIdenticalBytesAndOtherSeedsDiffer) {
  WorkloadShape shape = odd_shape();
  const SafetensorsFile first = generate_video_workload(shape);
  const SafetensorsFile again = generate_video_workload(shape);
  for (const char* name : {"q", "k", "v"}) {
    EXPECT_EQ(first.tensors.at(name).bytes, again.tensors.at(name).bytes) << name;
  }
  shape.seed += 1;
  const SafetensorsFile other = generate_video_workload(shape);
  for (const char* name : {"q", "k", "v"}) {
    EXPECT_NE(first.tensors.at(name).bytes, other.tensors.at(name).bytes) << name;
  }
}

TEST(Workload, ReferenceBytesAreStable) {
  // FNV-1a of the bytes of a small workload: catches any change of the generator's output, on
  // this platform or another (the generator uses no libm and no std distributions). Update it
  // deliberately when the generator changes on purpose.
  WorkloadShape shape = odd_shape();
  const SafetensorsFile file = generate_video_workload(shape);
  std::uint64_t hash = 1469598103934665603ULL;
  for (const auto& [name, tensor] : file.tensors) {
    for (unsigned char byte : tensor.bytes) hash = (hash ^ byte) * 1099511628211ULL;
  }
  EXPECT_EQ(hash, 0xc8f3e1a72ae41f96ULL);
}

TEST(Workload, BatchElementsAndHeadsAreIndependentStreams) {
  WorkloadShape shape = odd_shape();
  const SafetensorsFile two = generate_video_workload(shape);
  WorkloadShape smaller = shape;
  smaller.batch = 1;
  smaller.heads = 2;
  const SafetensorsFile one = generate_video_workload(smaller);
  // Batch element 0, heads 0-1 do not depend on how many elements or heads were asked for.
  const std::int64_t per_head = shape.tokens() * shape.head_dim;
  for (const char* name : {"q", "k", "v"}) {
    const HostTensor& big = two.tensors.at(name);
    const HostTensor& small = one.tensors.at(name);
    for (std::int64_t i = 0; i < 2 * per_head; ++i) {
      ASSERT_EQ(big.at(i), small.at(i)) << name << " element " << i;
    }
  }
  // ...and batch element 1 is another video, not a copy.
  const HostTensor& k = two.tensors.at("k");
  std::int64_t equal = 0;
  for (std::int64_t i = 0; i < per_head; ++i) {
    equal += k.at(i) == k.at(std::int64_t(shape.heads) * per_head + i);
  }
  EXPECT_LT(equal, per_head / 100);
}

TEST(Workload, ValuesAreFiniteAndNotDegenerate) {
  WorkloadShape tiny;
  tiny.frames = tiny.height = tiny.width = 1;
  tiny.heads = 1;
  tiny.head_dim = 2;
  WorkloadShape wide;
  wide.frames = 2;
  wide.height = 3;
  wide.width = 40;
  wide.head_dim = 128;
  wide.heads = 5;
  for (const WorkloadShape& shape : {WorkloadShape{}, odd_shape(), tiny, wide}) {
    const SafetensorsFile file = generate_video_workload(shape);
    for (const char* name : {"q", "k", "v"}) {
      const HostTensor& t = file.tensors.at(name);
      double sum2 = 0;
      for (std::int64_t i = 0; i < t.numel(); ++i) {
        ASSERT_TRUE(std::isfinite(t.at(i))) << name << " element " << i;
        sum2 += double(t.at(i)) * t.at(i);
      }
      const double rms = std::sqrt(sum2 / double(t.numel()));
      EXPECT_GT(rms, 0.1) << name;
      EXPECT_LT(rms, 10.0) << name;
    }
  }
}

TEST(Workload, InvalidShapesThrowNamingTheField) {
  const auto expect_error = [](WorkloadShape shape, const std::string& needle) {
    try {
      generate_video_workload(shape);
      ADD_FAILURE() << "no error for a shape that should mention '" << needle << "'";
    } catch (const Error& error) {
      EXPECT_NE(std::string(error.what()).find(needle), std::string::npos) << error.what();
    }
  };
  const std::vector<std::pair<std::string, std::function<void(WorkloadShape&, int)>>> fields{
      {"frames", [](WorkloadShape& s, int v) { s.frames = v; }},
      {"height", [](WorkloadShape& s, int v) { s.height = v; }},
      {"width", [](WorkloadShape& s, int v) { s.width = v; }},
      {"heads", [](WorkloadShape& s, int v) { s.heads = v; }},
      {"head_dim", [](WorkloadShape& s, int v) { s.head_dim = v; }},
      {"batch", [](WorkloadShape& s, int v) { s.batch = v; }},
  };
  for (const auto& [name, set] : fields) {
    for (int bad : {0, -1, INT_MIN}) {
      WorkloadShape shape;
      set(shape, bad);
      expect_error(shape, name + " = " + std::to_string(bad));
    }
  }
  WorkloadShape odd_dim;
  odd_dim.head_dim = 63;
  expect_error(odd_dim, "even");

  WorkloadShape huge;
  huge.frames = huge.height = huge.width = INT_MAX;  // the product overflows 64 bits
  expect_error(huge, "too large");
  WorkloadShape just_over;  // 2^31 + 2^25 elements per tensor
  just_over.frames = 1025;
  just_over.height = just_over.width = 256;
  just_over.heads = 8;
  just_over.head_dim = 128;
  expect_error(just_over, "too large");

  EXPECT_THROW(video_workload_classes(WorkloadShape{}, 1), Error);  // batch index out of range
}

TEST(Workload, SceneHasBackgroundRegionsAndMovingObjects) {
  const WorkloadShape shape;
  for (int b = 0; b < 3; ++b) {
    WorkloadShape s = shape;
    s.batch = 3;
    const std::vector<std::int32_t> classes = video_workload_classes(s, b);
    const int count = video_workload_class_count(s, b);
    ASSERT_EQ(classes.size(), std::size_t(s.tokens()));
    EXPECT_GE(count, kWorkloadBackgroundClasses + 4);
    EXPECT_LE(count, kWorkloadBackgroundClasses + 6);
    std::vector<std::int64_t> tokens_of(std::size_t(count), 0);
    for (std::int32_t c : classes) {
      ASSERT_GE(c, 0);
      ASSERT_LT(c, count);
      ++tokens_of[std::size_t(c)];
    }
    for (int c = 0; c < kWorkloadBackgroundClasses; ++c) {
      EXPECT_GT(tokens_of[std::size_t(c)], 0) << "background region " << c;
    }
    // Objects move: the class map of the first and the last frame differ on some tokens.
    const std::int64_t per_frame = std::int64_t(s.height) * s.width;
    std::int64_t changed = 0;
    for (std::int64_t t = 0; t < per_frame; ++t) {
      changed += classes[std::size_t(t)] != classes[std::size_t((s.frames - 1) * per_frame + t)];
    }
    EXPECT_GT(changed, per_frame / 50) << "batch element " << b;
  }
}

// The property k-means exploits: on a semantic head, keys of one class (in one frame) point the
// same way, much more than keys of two random tokens do.
TEST(Workload, SemanticHeadKeysClusterByClass) {
  for (std::uint64_t seed : {0, 1, 2}) {
    WorkloadShape shape;
    shape.seed = seed;
    ASSERT_EQ(video_workload_head_role(0), WorkloadHeadRole::semantic);
    const SafetensorsFile file = generate_video_workload(shape);
    const Slice k = slice(file.tensors.at("k"), shape, 0, 0);
    const std::vector<std::int32_t> classes = video_workload_classes(shape, 0);
    const std::int64_t tokens = shape.tokens();
    const std::int64_t per_frame = std::int64_t(shape.height) * shape.width;

    double same = 0, random = 0;
    int same_pairs = 0, random_pairs = 0;
    std::uint64_t state = 12345;
    const auto next = [&] {
      state = state * 6364136223846793005ULL + 1442695040888963407ULL;
      return std::int64_t((state >> 33) % std::uint64_t(tokens));
    };
    for (int tries = 0; same_pairs < 2000 && tries < 1000000; ++tries) {
      const std::int64_t a = next(), b = next();
      if (random_pairs < 2000) {
        random += cosine(k, a, b);
        ++random_pairs;
      }
      // A partner of a's class in a's frame.
      const std::int64_t c = (a / per_frame) * per_frame + b % per_frame;
      if (c != a && classes[std::size_t(c)] == classes[std::size_t(a)]) {
        same += cosine(k, a, c);
        ++same_pairs;
      }
    }
    ASSERT_EQ(same_pairs, 2000) << "too few same-class pairs";
    same /= same_pairs;
    random /= random_pairs;
    RecordProperty("seed" + std::to_string(seed) + "_cos_same_class", std::to_string(same));
    RecordProperty("seed" + std::to_string(seed) + "_cos_random", std::to_string(random));
    EXPECT_GT(same, 0.55) << "seed " << seed;
    EXPECT_GT(same - random, 0.3) << "seed " << seed << ": same " << same << ", random "
                                  << random;
  }
}

// Rows are peaky (a tenth of the keys carries most of the mass, the maximum logit is a few
// units above the mean) but not one-hot: the sparsity real video attention has.
TEST(Workload, AttentionRowsArePeakyButNotOneHot) {
  const WorkloadShape shape;
  const SafetensorsFile file = generate_video_workload(shape);
  const std::int64_t tokens = shape.tokens();
  for (int h = 0; h < shape.heads; ++h) {
    const Slice q = slice(file.tensors.at("q"), shape, 0, h);
    const Slice k = slice(file.tensors.at("k"), shape, 0, h);
    double top1 = 0, top_tenth = 0, spread = 0;
    const std::vector<std::int64_t> rows = sample_rows(tokens, 16);
    for (std::int64_t i : rows) {
      double max_minus_mean = 0;
      std::vector<double> row = attention_row(q, k, tokens, i, &max_minus_mean);
      std::sort(row.begin(), row.end(), std::greater<double>());
      top1 += row[0];
      double mass = 0;
      for (std::int64_t j = 0; j < tokens / 10; ++j) mass += row[std::size_t(j)];
      top_tenth += mass;
      spread += max_minus_mean;
    }
    top1 /= double(rows.size());
    top_tenth /= double(rows.size());
    spread /= double(rows.size());
    const std::string head = "head" + std::to_string(h);
    RecordProperty(head + "_top10pct_mass", std::to_string(top_tenth));
    RecordProperty(head + "_top1_mass", std::to_string(top1));
    RecordProperty(head + "_max_minus_mean_logit", std::to_string(spread));
    EXPECT_GT(top_tenth, 0.5) << head;
    EXPECT_LT(top1, 0.9) << head;
    EXPECT_GT(spread, 3.0) << head;
    EXPECT_LT(spread, 12.0) << head;
  }
}

// Each role shows up in where the mass goes, far above what uniform attention would give.
TEST(Workload, HeadRolesShapeWhereAttentionGoes) {
  const WorkloadShape shape;  // heads 0-3: semantic, local, temporal, spatial
  const SafetensorsFile file = generate_video_workload(shape);
  const std::vector<std::int32_t> classes = video_workload_classes(shape, 0);
  const std::int64_t tokens = shape.tokens(), width = shape.width, height = shape.height;
  const auto frame = [&](std::int64_t s) { return s / (width * height); };
  const auto row_of = [&](std::int64_t s) { return (s / width) % height; };
  const auto col_of = [&](std::int64_t s) { return s % width; };

  struct Mass {
    double same_class = 0, same_frame = 0, window_5x5 = 0, column_3x3_all_frames = 0;
  };
  std::vector<Mass> mass(std::size_t(shape.heads));
  const std::vector<std::int64_t> rows = sample_rows(tokens, 16);
  for (int h = 0; h < shape.heads; ++h) {
    const Slice q = slice(file.tensors.at("q"), shape, 0, h);
    const Slice k = slice(file.tensors.at("k"), shape, 0, h);
    Mass& m = mass[std::size_t(h)];
    for (std::int64_t i : rows) {
      const std::vector<double> row = attention_row(q, k, tokens, i);
      for (std::int64_t j = 0; j < tokens; ++j) {
        const double p = row[std::size_t(j)] / double(rows.size());
        const bool near_y = std::abs(row_of(j) - row_of(i)) <= 1;
        const bool near_x = std::abs(col_of(j) - col_of(i)) <= 1;
        const bool same_frame = frame(j) == frame(i);
        if (classes[std::size_t(j)] == classes[std::size_t(i)]) m.same_class += p;
        if (same_frame) m.same_frame += p;
        if (same_frame && std::abs(row_of(j) - row_of(i)) <= 2 &&
            std::abs(col_of(j) - col_of(i)) <= 2) {
          m.window_5x5 += p;
        }
        if (near_y && near_x) m.column_3x3_all_frames += p;
      }
    }
  }
  // Uniform attention would give: same frame 1/8, 5x5 window 25/4608, 3x3 column 9/576.
  EXPECT_GT(mass[0].same_class, 0.6);       // semantic: its class, wherever it is
  EXPECT_LT(mass[0].window_5x5, 0.15);      // ...not just its neighbours
  EXPECT_GT(mass[1].window_5x5, 0.15);      // local: a 3D neighbourhood
  EXPECT_GT(mass[2].column_3x3_all_frames, 0.35);  // temporal: the same place, any frame
  EXPECT_LT(mass[2].same_frame, 0.3);
  EXPECT_GT(mass[3].same_frame, 0.45);      // spatial: its own frame
  for (int h = 0; h < shape.heads; ++h) {
    const Mass& m = mass[std::size_t(h)];
    const std::string head = "head" + std::to_string(h);
    RecordProperty(head + "_same_class", std::to_string(m.same_class));
    RecordProperty(head + "_same_frame", std::to_string(m.same_frame));
    RecordProperty(head + "_window_5x5", std::to_string(m.window_5x5));
    RecordProperty(head + "_column_3x3", std::to_string(m.column_3x3_all_frames));
  }
}
