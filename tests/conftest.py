import pytest

from mtkernels import _C

ISAS = [isa for isa in ("baseline", "avx2", "avx512") if _C.isa_supported(isa)]


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs a test once per kernel variant this CPU supports (csrc/ is compiled per ISA)."""
    before = _C.isa()
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(before)
