// The CLI's subcommands. Each registers its flags and a callback that calls the library;
// errors propagate as svgear::Error to main(), which maps them to exit code 2.
#pragma once

#include <CLI/CLI.hpp>

namespace svgear::cli {

void add_demo_command(CLI::App& app);
void add_gen_command(CLI::App& app);
void add_eval_command(CLI::App& app);

}  // namespace svgear::cli
