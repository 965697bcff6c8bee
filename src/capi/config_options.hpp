// Method options by name, as text: how the C API (and through it Python's keyword arguments)
// sets a MethodConfig without a struct whose layout would become part of the ABI.
#pragma once

#include <string>
#include <string_view>

#include "svgear/config.hpp"

namespace svgear::capi {

// Applies one option, e.g. ("density", "0.2"). Throws svgear::Error naming the accepted keys for
// an unknown key, and the expected form for a value that does not parse. Range checks happen in
// svgear::validate when the config is used, so every path reports them the same way.
void set_option(MethodConfig& config, std::string_view key, std::string_view value);

// Every option and its current value, as one JSON object.
std::string describe(const MethodConfig& config);

}  // namespace svgear::capi
