import pytest
import torch

from mtkernels import _C


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA device (bench/gpu_check.sh runs them on one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

ISAS = ("baseline", "avx2", "avx512", "avx512bf16")


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs a test once per kernel variant (csrc/ is compiled per ISA); a variant this CPU
    or build cannot run is skipped, saying so."""
    if not _C.isa_supported(request.param):
        pytest.skip(f"ISA variant {request.param!r} is not supported by this CPU or build "
                    f"(cpu_features: {_C.cpu_features()})")
    before = _C.isa()
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(before)


@pytest.fixture(autouse=True, scope="session")
def private_tuning_cache(tmp_path_factory):
    """Tests tune into a cache of their own, never the user's ~/.cache/mtkernels."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MTKERNELS_CACHE_DIR", str(tmp_path_factory.mktemp("mtkernels-cache")))
    yield
    mp.undo()
