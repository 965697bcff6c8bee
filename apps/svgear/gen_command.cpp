#include <cstdio>
#include <memory>

#include "commands.hpp"
#include "method_options.hpp"
#include "svgear/safetensors.hpp"
#include "svgear/workload.hpp"

namespace svgear::cli {

namespace {
struct GenOptions {
  WorkloadShape shape;
  std::string out;
  std::string dtype = "F32";
};
}  // namespace

void add_gen_command(CLI::App& app) {
  auto options = std::make_shared<GenOptions>();
  CLI::App* gen = app.add_subcommand("gen", "Write the built-in video-like workload (q, k, v) as safetensors");
  gen->add_option("--out", options->out, "Output file")->required();
  add_workload_options(*gen, options->shape, "--seed");
  gen->add_option("--dtype", options->dtype, "Stored dtype: F32, F16 or BF16")->capture_default_str();
  gen->callback([options] {
    const DType dtype = parse_dtype(options->dtype);
    SafetensorsFile file = generate_video_workload(options->shape);
    if (dtype != DType::f32) {
      for (auto& [name, tensor] : file.tensors) {
        HostTensor converted(dtype, tensor.shape);
        for (std::int64_t i = 0; i < tensor.numel(); ++i) converted.set(i, tensor.at(i));
        tensor = std::move(converted);
      }
    }
    write_safetensors(options->out, file);
    const HostTensor& q = file.tensors.at("q");
    std::printf("wrote %s: q, k, v %s %s (frames %d x height %d x width %d)\n", options->out.c_str(),
                dtype_name(dtype).c_str(), shape_string(q.shape).c_str(), options->shape.frames,
                options->shape.height, options->shape.width);
  });
}

}  // namespace svgear::cli
