"""The wheel: what it ships (the package, its data, configs/ as `ddpo_jax.configs`; not benchmarks/, experiments/,
tests/), and that configs load by name from an installed copy run outside the repository.

The installs go into fresh virtual environments that see this interpreter's dependencies but not its own ddpo_jax
(an editable install of some checkout, or this one through sys.path): a site-packages folder named as a plain path
line of a .pth file is added to sys.path without its own .pth files being run, so no editable finder comes along.
Offline: the wheel is built with --no-build-isolation (setuptools and wheel of the `test` extra).
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import pytest

from ddpo_jax import config_utils
from ddpo_jax import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOT_INSTALLED = ("benchmarks", "experiments", "tests")


def _run(command, cwd, timeout=120, **env):
  """`command`'s completed process; AssertionError with its output if it fails."""
  result = subprocess.run(
    command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **env)
  )
  assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
  return result


def _build_wheel(out: pathlib.Path) -> pathlib.Path:
  """Builds the wheel from the repository root, setuptools' build/ and egg-info in `out` (a stale build/lib in the
  checkout would otherwise ship files that the current configuration no longer names)."""
  build_config = out / "build.cfg"
  build_config.write_text(f"[build]\nbuild_base = {out / 'build'}\n[egg_info]\negg_base = {out}\n")
  command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."]
  _run(command, ROOT, DIST_EXTRA_CONFIG=str(build_config))
  (wheel,) = out.glob("ddpo_jax-*.whl")
  return wheel


def _make_venv(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """A virtual environment without pip that sees this interpreter's site-packages: (its python, its site-packages)."""
  _run([sys.executable, "-m", "venv", "--without-pip", str(folder)], folder.parent)
  python = folder / "bin" / "python"
  site_packages = pathlib.Path(
    _run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], folder).stdout.strip()
  )
  dependency_dirs = [
    p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)
  ]
  (site_packages / "deps.pth").write_text("".join(p + "\n" for p in dependency_dirs))
  return python, site_packages


# Run by the venv's python from an empty folder: the facts the tests check, as JSON.
PROBE = textwrap.dedent(
  """
  import importlib.util, json, os, sys
  import ddpo_jax
  from ddpo_jax import config_utils, main, models, prompts

  configs = {}
  for spec in ("configs/compress.py:tiny", "configs/toy_alignment.py:tiny"):
    config = config_utils.get_config(spec)
    name = "ddpo_config_" + spec.split("/")[1].split(".")[0]
    configs[spec] = {"file": sys.modules[name].__file__, "model": config.model.name}
  argv = main.resolve_config_argument(["main", "--config=configs/compress.py:tiny", "--config.seed=1"])
  argv_spaced = main.resolve_config_argument(["main", "--config", "configs/compress.py:tiny"])
  configs_spec = importlib.util.find_spec("ddpo_jax.configs")
  print(json.dumps({
    "ddpo_jax": ddpo_jax.__file__,
    "configs_package": configs_spec and configs_spec.origin,
    "configs": configs,
    "argv": argv,
    "argv_spaced": argv_spaced,
    "toy_model_problem": models.check_model_folder("toy-world"),
    "animals": len(prompts.load_list("common_animals.txt")),
    "importable": {name: importlib.util.find_spec(name) is not None for name in %r},
  }))
  """
  % (NOT_INSTALLED,)
)


def _probe(python: pathlib.Path, cwd: pathlib.Path) -> dict:
  # -I: no PYTHONPATH, no user site-packages, no current folder on sys.path (deps.pth names the dependencies).
  return json.loads(_run([str(python), "-I", "-c", PROBE], cwd).stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  return _build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def installed_wheel(wheel, tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
  """(python, site-packages) of a venv with the wheel installed."""
  python, site_packages = _make_venv(tmp_path_factory.mktemp("venvs") / "wheel")
  _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site_packages), str(wheel)], ROOT)
  return python, site_packages


def test_wheel_ships_the_package_its_data_and_the_configs_only(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"ddpo_jax"}  # no NOT_INSTALLED
  # Every file of the package folder (modules and data), and configs/*.py as ddpo_jax/configs/.
  expected = {
    path.relative_to(ROOT).as_posix()
    for path in (ROOT / "ddpo_jax").rglob("*")
    if path.is_file() and "__pycache__" not in path.parts and not path.name.startswith(".")
  }
  expected |= {f"ddpo_jax/configs/{path.name}" for path in (ROOT / "configs").glob("*.py")}
  assert "ddpo_jax/configs/compress.py" in expected and "ddpo_jax/toy/model/model_index.json" in expected
  assert sorted(expected - names) == []


def test_installed_wheel_loads_configs_by_name_from_any_folder(installed_wheel, tmp_path):
  python, site_packages = installed_wheel
  facts = _probe(python, tmp_path)
  assert facts["ddpo_jax"].startswith(str(site_packages)), facts["ddpo_jax"]
  assert facts["configs_package"] == str(site_packages / "ddpo_jax" / "configs" / "__init__.py")
  for spec, loaded in facts["configs"].items():
    assert loaded["file"].startswith(str(site_packages / "ddpo_jax" / "configs")), spec
    assert loaded["model"] == "toy-world", spec
  for argv, config_at in ((facts["argv"], 1), (facts["argv_spaced"], 2)):
    path, _, preset = argv[config_at].removeprefix("--config=").partition(":")
    assert preset == "tiny" and os.path.isfile(path) and path.startswith(str(site_packages)), argv
  assert facts["argv"][2] == "--config.seed=1"
  assert facts["toy_model_problem"] is None
  assert facts["animals"] > 0
  assert facts["importable"] == {name: False for name in NOT_INSTALLED}


def test_main_runs_an_installed_config_from_any_folder(installed_wheel, tmp_path):
  """`python -m ddpo_jax.main --config=configs/compress.py:tiny` parses its flags (the config loaded) outside the
  repository; an extra argument stops it right after, before any training."""
  python, _ = installed_wheel
  command = [str(python), "-I", "-m", "ddpo_jax.main", "--config=configs/compress.py:tiny", "--workdir=w", "extra"]
  result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and "Unexpected arguments: ['extra']" in result.stderr, result.stderr
  missing = subprocess.run([*command[:4], "--config=configs/nope.py"], cwd=tmp_path, capture_output=True, text=True)
  assert missing.returncode == 1 and "'configs/nope.py' not found" in missing.stderr, missing.stderr
  assert not (tmp_path / "w").exists()


def test_editable_install_maps_the_checkouts_configs(tmp_path):
  """`pip install -e .`: ddpo_jax.configs is the checkout's configs/ folder, found from any folder."""
  python, site_packages = _make_venv(tmp_path / "venv")
  build_config = tmp_path / "build.cfg"
  build_config.write_text(f"[build]\nbuild_base = {tmp_path / 'build'}\n[egg_info]\negg_base = {tmp_path}\n")
  # The venv's python runs pip (seen through deps.pth) so that the editable finder goes into the venv.
  # --ignore-installed: never touch the ddpo_jax install seen through deps.pth.
  command = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed"]
  command += ["-e", str(ROOT)]
  _run(command, ROOT, DIST_EXTRA_CONFIG=str(build_config), PYTHONPATH="")
  facts = _probe(python, tmp_path)
  assert facts["ddpo_jax"] == str(ROOT / "ddpo_jax" / "__init__.py")
  assert facts["configs_package"] == str(ROOT / "configs" / "__init__.py")
  assert facts["configs"]["configs/compress.py:tiny"]["file"] == str(ROOT / "configs" / "compress.py")
  assert facts["importable"] == {name: False for name in NOT_INSTALLED}


def test_find_config_file_names_where_it_looked(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError) as error:
    config_utils.find_config_file("configs/nope.py")
  message = str(error.value)
  assert "'configs/nope.py'" in message and str(tmp_path) in message
  assert "installed configs" in message and "compress.py" in message and "toy_alignment.py" in message
  assert "__init__.py" not in message
  # An existing path is taken as given; a missing configs/NAME or bare NAME of an installed config is the
  # installed file; another folder is not silently replaced by it.
  (tmp_path / "mine.py").write_text("")
  assert config_utils.find_config_file("mine.py") == "mine.py"
  for spec in ("configs/compress.py", "compress.py"):
    found = config_utils.find_config_file(spec)
    assert os.path.basename(found) == "compress.py" and os.path.isfile(found)
  with pytest.raises(ValueError, match="'elsewhere/compress.py' not found"):
    config_utils.find_config_file("elsewhere/compress.py")


def test_resolve_config_argument_keeps_the_preset_and_other_flags(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  compress = config_utils.find_config_file("configs/compress.py")
  argv = ["main", "--config=configs/compress.py:tiny", "--config.train.learning_rate=3e-4", "--workdir=runs/x"]
  assert main.resolve_config_argument(argv) == ["main", f"--config={compress}:tiny", *argv[2:]]
  assert main.resolve_config_argument(["main", "--config", "configs/compress.py"]) == ["main", "--config", compress]
  assert main.resolve_config_argument(["main", "--workdir=w"]) == ["main", "--workdir=w"]
  with pytest.raises(ValueError, match="'configs/nope.py' not found"):
    main.resolve_config_argument(["main", "--config=configs/nope.py:tiny"])


def test_subcommand_tables_name_existing_modules():
  """The installed `python -m ddpo_jax.bench` has the memory planner only; `python -m benchmarks` the speed ones."""
  import importlib.util

  import benchmarks
  from ddpo_jax import bench

  assert set(bench.SUBCOMMANDS) == {"memory"}
  assert set(benchmarks.SUBCOMMANDS) == {"rollout", "train", "epoch"}
  for package, table in ((bench, bench.SUBCOMMANDS), (benchmarks, benchmarks.SUBCOMMANDS)):
    for module, _ in table.values():
      assert importlib.util.find_spec(f"{package.__name__}.{module}") is not None, module
