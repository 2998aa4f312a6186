"""The JAX LPIPS equals the lpips package (torch) with the same weights."""

import importlib.util

import numpy as np
import pytest

from mae_jax import errors
from mae_jax.evaluators import lpips

from benchmarks import torch_cpu

torch = pytest.importorskip("torch", reason="torch is a test-only reference (pip install -e '.[dev]')")


def _import_lpips_package():
  """Imports `lpips` (and so torchvision, whose PyPI wheels carry CUDA-only ops that a CPU torch
  cannot load: see benchmarks/torch_cpu.py)."""
  if importlib.util.find_spec("lpips") is None:
    pytest.skip("the lpips package is a test-only reference (pip install -e '.[dev]')", allow_module_level=True)
  return torch_cpu.tolerant_import("lpips")


lpips_torch = _import_lpips_package()


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_the_lpips_package(net, tmp_path):
  torch.manual_seed(0)
  # Random backbone (nothing downloaded); the linear heads ship inside the lpips wheel.
  model = lpips_torch.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
  path = tmp_path / f"lpips_{net}.npz"
  np.savez(path, **lpips.weights_from_torch(model, net))
  weights = lpips.load_weights(str(path), net)
  rng = np.random.default_rng(0)
  a = rng.random((3, 64, 64, 3), dtype=np.float32)
  b = np.clip(a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), 0, 1)
  with torch.no_grad():
    want = model(torch.from_numpy(a).permute(0, 3, 1, 2) * 2 - 1,
                 torch.from_numpy(b).permute(0, 3, 1, 2) * 2 - 1).numpy().reshape(-1)
  got = np.asarray(lpips.lpips(weights, a, b, net))
  assert want.min() > 0
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lpips.lpips(weights, a, a, net)), 0.0, atol=1e-7)


def test_missing_weights_file_names_it(tmp_path):
  with pytest.raises(errors.LPIPSWeightsError, match="nowhere.npz"):
    lpips.load_weights(str(tmp_path / "nowhere.npz"), "alex")
  bad = tmp_path / "bad.npz"
  np.savez(bad, x=np.zeros(1))
  with pytest.raises(errors.LPIPSWeightsError, match="not an LPIPS alex weights file"):
    lpips.load_weights(str(bad), "alex")
