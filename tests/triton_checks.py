"""How the tests check Triton kernels without a GPU: numerics under Triton's interpreter
(in a subprocess, since TRITON_INTERPRET must be set before triton is imported) and PTX
from ahead-of-time compilation for real GPU architectures."""

import os
import subprocess
import sys


def run_under_interpreter(test_module: str, function: str, *args) -> None:
    """Call ``test_module.function(*args)`` in a fresh interpreter with TRITON_INTERPRET=1."""
    code = f"import {test_module} as m; m.{function}(*{args!r})"
    result = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), capture_output=True,
                            text=True, env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def compile_for(kernel, signature: dict, constexprs: dict, capability: int):
    """``kernel`` compiled for sm_<capability> (PTX and cubin); raises if Triton cannot compile it."""
    import triton
    from triton.backends.compiler import GPUTarget

    return triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs),
                          target=GPUTarget("cuda", capability, 32))


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """Per-thread registers (REG), spill bytes (LOCAL) and static shared memory (SHARED) of the
    one kernel in ``cubin``, as ``cuobjdump --dump-resource-usage`` (shipped with Triton) reads them."""
    import re
    import tempfile
    from pathlib import Path

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    line = next(line for line in out.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(REG|LOCAL|SHARED):(\d+)", line)}
