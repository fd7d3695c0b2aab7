"""Builds and runs the Catch2 tests of csrc/core (tests/cpp) with CMake/CTest.
Skipped where CMake or Catch2 v2 (Debian: `apt-get install catch2`) is missing."""
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CATCH_HEADERS = ["/usr/include/catch2/catch.hpp", "/usr/local/include/catch2/catch.hpp"]


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="cmake/ctest not found")
@pytest.mark.skipif(not any(os.path.exists(h) for h in CATCH_HEADERS), reason="Catch2 v2 headers not installed")
def test_catch2_core(tmp_path):
    build = tmp_path / "build"
    def run(*cmd):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
        return r.stdout

    run("cmake", "-S", os.path.join(HERE, "cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release")
    run("cmake", "--build", str(build), "-j", str(os.cpu_count() or 2))
    out = run("ctest", "--test-dir", str(build), "--output-on-failure")
    assert "100% tests passed" in out
