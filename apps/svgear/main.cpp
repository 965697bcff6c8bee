// svgear: sparse attention for video diffusion transformers, from the command line.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>

#include "commands.hpp"
#include "svgear/error.hpp"

int main(int argc, char** argv) {
  CLI::App app{
      "svgear: training-free sparse attention for video diffusion transformers (SVG-EAR, SVG2).\n"
      "Start with `svgear demo`, which needs no model and no GPU."};
  app.require_subcommand(1);
  svgear::cli::add_demo_command(app);
  svgear::cli::add_gen_command(app);
  svgear::cli::add_eval_command(app);
  // CLI11 reports a mistyped command only as "a subcommand is required": name it instead.
  bool known_command = false;
  for (const CLI::App* command : app.get_subcommands([](CLI::App*) { return true; })) {
    known_command = known_command || (argc > 1 && command->get_name() == argv[1]);
  }
  if (argc > 1 && argv[1][0] != '-' && !known_command) {
    std::fprintf(stderr, "svgear: error: unknown command '%s': choose demo, gen or eval (see --help)\n", argv[1]);
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "svgear: error: %s (see --help)\n", e.what());
    return 2;
  } catch (const svgear::Error& e) {
    std::fprintf(stderr, "svgear: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "svgear: internal error: %s\n", e.what());
    return 1;
  }
  return 0;
}
