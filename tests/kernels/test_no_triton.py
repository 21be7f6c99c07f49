"""peftfast.kernels where Triton cannot be imported (macOS, Windows: triton is a Linux-only dependency).

The Triton halves (``<op>_triton.py``) are then never imported; every op runs its reference and an
explicit ``backend="triton"`` says why it cannot. Run in a fresh interpreter with ``import triton``
made to fail, since this process has Triton loaded already.
"""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # `import triton` now raises ImportError
    sys.modules["triton.language"] = None
    import torch
    import peftfast
    import peftfast.kernels as k
    from peftfast.kernels import dispatch

    assert dispatch.triton_module("lora_triton") is None
    loaded = sorted(m for m in sys.modules if m.startswith("peftfast.kernels.") and m.endswith("_triton"))
    assert not loaded, loaded
    torch.manual_seed(0)
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    a, b = torch.randn(2, 8), torch.randn(5, 2)
    y = k.lora_linear(x, w, a, b, 2.0)
    assert torch.allclose(y, k.lora_linear_reference(x, w, a, b, 2.0))
    k.dora_linear(x, w, a, b, 2.0, torch.ones(5))
    k.ia3_linear(x, w, torch.ones(5, 1), feedforward=False)
    q, kk, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    k.prefix_attention(q, kk, v, torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    try:
        k.lora_linear(x, w, a, b, 2.0, backend="triton")
    except RuntimeError as e:
        print("refused:", e)
    else:
        raise AssertionError("backend='triton' ran without Triton")
    print("ok")
""")


def test_import_and_reference_paths_work_without_triton():
    env = {key: val for key, val in os.environ.items() if key not in ("TRITON_INTERPRET", "PEFTFAST_BACKEND")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=os.path.join(ROOT, "tests"), env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
    assert "refused: backend='triton' needs CUDA tensors" in out.stdout
