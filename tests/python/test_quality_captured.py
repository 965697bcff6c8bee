"""Real Q/K/V captured from the trained quality model (tests/data/quality/, written by
`python3 -m svgear.quality.capture`): at equal density, SVG-EAR's error is below SVG2's on every
file, through the CLI (`svgear eval --json`).

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
DENSITY = 0.2
FILES = sorted(glob.glob(os.path.join(DATA, "*.safetensors")))


def run_eval(path, method):
    result = subprocess.run([CLI, "eval", "--input", path, "--method", method, "--density", str(DENSITY), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, "%s %s: %s" % (os.path.basename(path), method, result.stderr.strip())
    return json.loads(result.stdout)


@pytest.mark.skipif(not FILES, reason="no captured Q/K/V in %s (write them with `python3 -m svgear.quality.capture "
                                      "--out tests/data/quality` from the trained model, see docs/QUALITY.md)" % DATA)
@pytest.mark.skipif(not os.access(CLI, os.X_OK), reason="svgear CLI not built at %s (scripts/build)" % CLI)
@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(f) for f in FILES])
def test_ear_beats_svg2_at_equal_density_on_captured_qkv(path):
    ear, svg2 = run_eval(path, "ear"), run_eval(path, "svg2")
    for report in (ear, svg2):
        assert DENSITY <= report["density"] < DENSITY + 0.1, report
    assert ear["rel_l2"] < svg2["rel_l2"], "%s: EAR rel_l2 %.4f (density %.3f) vs SVG2 %.4f (density %.3f)" % (
        os.path.basename(path), ear["rel_l2"], ear["density"], svg2["rel_l2"], svg2["density"])
