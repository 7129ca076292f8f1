"""What a user installs is what the tests run: a non-editable install (as from a wheel) into a fresh virtual
environment finds its recipes and built-in corpus from any directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOT_SHIPPED = shutil.ignore_patterns(".git", ".venv*", "runs", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".cache")


def fresh_venv(where: Path) -> Path:
    """A new virtual environment that sees this one's packages (torch, transformers, pip, setuptools ...) as a plain
    path after its own, so that nothing is downloaded and this environment's llmlab (editable, through a .pth hook
    that a plain path does not run) stays invisible; returns its interpreter."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site) / "test-env-packages.pth").write_text("\n".join(ours) + "\n", encoding="utf-8")
    return python


def test_a_non_editable_install_runs_a_recipe_by_name_from_any_directory(tmp_path, llmlab_cache):
    src = tmp_path / "clone"
    shutil.copytree(REPO, src, ignore=NOT_SHIPPED)        # pip builds inside the source folder: never in the repo's
    python = fresh_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}      # LLMLAB_CACHE: the fixture's cache
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    str(src)], check=True, env=env, cwd=tmp_path)
    shutil.rmtree(src)                                    # the installed package needs nothing of its source
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.check_output([python, "-c", "import llmlab; print(llmlab.__file__)"], text=True, env=env,
                                    cwd=elsewhere).strip()
    assert where.startswith(str(tmp_path / "venv")), where
    run = subprocess.run([tmp_path / "venv" / "bin" / "llmlab", "pretrain", "--config", "shakespeare-char",
                          "--set", "train.max_steps=2", "--set", "train.eval_batches=1", "--set", "train.log_every=1",
                          "--set", "train.checkpoint_every=2", "--set", "model.n_layer=1", "--out", "runs/sh"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (elsewhere / "runs" / "sh" / "model" / "config.json").is_file()
    assert "tinyshakespeare" in (elsewhere / "runs" / "sh" / "run.yaml").read_text(encoding="utf-8")
