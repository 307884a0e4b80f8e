"""The native extension spatialcore._C: compiled with CMake + nvcc here, run on a GPU machine."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _cmake() -> str | None:
    return shutil.which("cmake", path=str(BIN)) or shutil.which("cmake")


needs_toolchain = pytest.mark.skipif(
    shutil.which("nvcc") is None or _cmake() is None,
    reason="nvcc or cmake not found: the native extension cannot be compiled on this machine",
)


@pytest.fixture(scope="module")
def built_lib(tmp_path_factory):
    build = tmp_path_factory.mktemp("cmake-build")
    out = tmp_path_factory.mktemp("lib")
    cmake = _cmake()
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={shutil.which('ninja', path=str(BIN))}"] \
        if shutil.which("ninja", path=str(BIN)) else []
    cfg = subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), *gen, f"-DPython3_EXECUTABLE={sys.executable}",
                          f"-DSPATIALCORE_LIB_DIR={out}"], capture_output=True, text=True, timeout=600)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    jobs = str(max(1, os.cpu_count() or 1))
    # nvcc on torch's headers takes minutes on 2 cores (12 on a loaded one): a generous limit
    bld = subprocess.run([cmake, "--build", str(build), "-j", jobs], capture_output=True, text=True, timeout=2400)
    assert bld.returncode == 0, bld.stdout[-5000:] + bld.stderr[-3000:]
    lib = out / "_C.so"
    assert lib.is_file()
    return lib


@pytest.mark.nvcc
@needs_toolchain
def test_cmake_builds_and_registers_the_op(built_lib):
    code = (
        "import torch\n"
        "from spatialcore.kernels import native\n"
        "assert native.load() is None, native.load()\n"
        "print(torch.ops.spatialcore.group_advantages.default._schema)\n"
        "r = torch.randn(2, 5)\n"
        "try:\n"
        "    torch.ops.spatialcore.group_advantages(r, 1, True, False, 0, 1e-4, 0.0, False, False, 0.0)\n"
        "except NotImplementedError as e:\n"
        "    print('cpu refused')\n"
        "if torch.cuda.is_available():\n"
        "    from spatialcore.kernels import group_advantages\n"
        "    r = torch.randn(7, 24, device='cuda')\n"
        "    a = group_advantages(r, top_k=6, backend='cuda')\n"
        "    b = group_advantages(r, top_k=6, backend='torch')\n"
        "    torch.testing.assert_close(a.advantages, b.advantages, rtol=1e-5, atol=1e-5)\n"
        "    print('cuda ok')\n"
    )
    env = {**os.environ, "SPATIALCORE_NATIVE_LIB": str(built_lib)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "spatialcore::group_advantages(Tensor rewards" in proc.stdout
    if torch.cuda.is_available():
        assert "cuda ok" in proc.stdout
    else:
        assert "cpu refused" in proc.stdout


def test_missing_library_gives_a_clear_error(monkeypatch, tmp_path):
    from spatialcore.kernels import group_advantages, native

    monkeypatch.setenv("SPATIALCORE_NATIVE_LIB", str(tmp_path / "nope.so"))
    native.load.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="make cuda"):
            group_advantages(torch.randn(2, 4), backend="cuda")
    finally:
        native.load.cache_clear()
