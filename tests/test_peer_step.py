"""tools/peer_step.py: torch and timm stay optional; without them it stops in one line."""
import os
import subprocess
import sys

from conftest import repo_path


def test_without_torch_it_names_what_to_install(tmp_path):
  (tmp_path / "torch").mkdir()  # an unimportable torch, whether or not one is installed
  (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
  env = {**os.environ, "PYTHONPATH": str(tmp_path)}
  result = subprocess.run([sys.executable, repo_path("tools", "peer_step.py")], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode != 0 and len(lines) == 1, result.stderr
  assert "PyTorch is not installed" in lines[0] and "pip install torch" in lines[0]
  assert "timm --no-deps" in lines[0]


def test_unknown_configuration_is_one_line():
  result = subprocess.run([sys.executable, repo_path("tools", "peer_step.py"),
                           "--only", "r18"], capture_output=True, text=True,
                          timeout=120, check=False)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode != 0 and len(lines) == 1 and "r18" in lines[0], result.stderr
