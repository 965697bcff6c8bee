"""Real Q/K/V captured from the trained quality model (tests/data/quality/, written by
`python3 -m svgear.quality.capture`): at equal density, SVG-EAR's error is below SVG2's, through
the CLI (`svgear eval --json`), at densities 0.1, 0.2 and 0.3: in the mean over the files, and on
most files.

With the default probe (each query cluster's mean query) EAR is below SVG2 on all 18 (file,
density) pairs of the committed captures (2026-12-06); the test asks for the mean and a majority,
so a retrained model's captures may lose a few. With the former default, 4 sampled probe queries
per query cluster (of ~36 queries at these 1152 tokens), it lost on the current model's layer 4
at step 20 at densities 0.2 and 0.3 (rel. L2 0.140 vs 0.109, 0.111 vs 0.050), where the samples
miss errors that the mean query finds (0.034, 0.017). docs/QUALITY.md lists every file's errors, docs/ALGORITHMS.md compares the probe's rows.

SVGEAR_QUALITY_QKV_DIR overrides the folder, SVGEAR_BIN the binary (default build/bin/svgear).
"""

import glob
import json
import os
import subprocess

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DATA = os.environ.get("SVGEAR_QUALITY_QKV_DIR", os.path.join(ROOT, "tests", "data", "quality"))
CLI = os.environ.get("SVGEAR_BIN", os.path.join(ROOT, "build", "bin", "svgear"))
DENSITIES = (0.1, 0.2, 0.3)
FILES = sorted(glob.glob(os.path.join(DATA, "*.safetensors")))


def run_eval(path, method, density):
    result = subprocess.run([CLI, "eval", "--input", path, "--method", method, "--density", str(density), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, "%s %s: %s" % (os.path.basename(path), method, result.stderr.strip())
    report = json.loads(result.stdout)
    assert density <= report["density"] < density + 0.1, report
    return report["rel_l2"]


@pytest.mark.skipif(not FILES, reason="no captured Q/K/V in %s (write them with `python3 -m svgear.quality.capture "
                                      "--out tests/data/quality` from the trained model, see docs/QUALITY.md)" % DATA)
@pytest.mark.skipif(not os.access(CLI, os.X_OK), reason="svgear CLI not built at %s (scripts/build)" % CLI)
@pytest.mark.parametrize("density", DENSITIES)
def test_ear_beats_svg2_at_equal_density_on_captured_qkv(density):
    errors = {os.path.basename(f): (run_eval(f, "ear", density), run_eval(f, "svg2", density)) for f in FILES}
    table = "; ".join("%s EAR %.4f SVG2 %.4f" % (name, e, s) for name, (e, s) in errors.items())
    mean_ear = sum(e for e, _ in errors.values()) / len(errors)
    mean_svg2 = sum(s for _, s in errors.values()) / len(errors)
    assert mean_ear < mean_svg2, "density %g: mean rel_l2 EAR %.4f vs SVG2 %.4f (%s)" % (density, mean_ear, mean_svg2, table)
    wins = sum(e < s for e, s in errors.values())
    assert 2 * wins > len(errors), "density %g: EAR below SVG2 on only %d of %d files (%s)" % (
        density, wins, len(errors), table)
