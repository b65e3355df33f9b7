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


def compile_ptx(kernel, signature: dict, constexprs: dict, capability: int) -> str:
    """PTX of ``kernel`` compiled for sm_<capability>; raises if Triton cannot compile it."""
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs),
                              target=GPUTarget("cuda", capability, 32))
    return compiled.asm["ptx"]
