"""Prepare what the GPU check needs on a GPU machine without network: `make gpu-prep` (on the CPU machine).

    python benchmarks/gpu_prep.py [--dir .gpu]

Into ``--dir`` (ignored by git):
  wheels/   pyautoattack and robustbench for CPython 3.12 on x86-64 Linux, at the versions this venv has,
            plus the robustbench dependencies the GPU image lacks (gdown, geotorch). pyautoattack's
            wheel is rewritten without its examples/ folder (a 44 MB demo checkpoint nothing imports).
            wandb is not carried: its wheel is 20 MB plus a dozen fast-moving dependencies, and the check
            runs with logging.wandb=disabled (W&B logging is tested on the CPU).
  data/     Fashion-MNIST's four .gz files in the layout advgkl reads (FashionMNIST/raw/).
  commit    the git commit the check reports.
Prints the size of everything that travels to the GPU machine (this folder plus the working tree) and
exits 1 when it is over the 64 MiB the device tool carries.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MIB = 64
# (distribution, version when this venv lacks it): what the GPU image does not have
WHEELS = (("pyautoattack", "0.2.0"), ("robustbench", "1.1.1"), ("gdown", "5.1.0"), ("geotorch", "0.4.0"))
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64") for a in ("--platform", p)]


def version_of(name: str, fallback: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return fallback


def download_wheels(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    wheels = []
    for name, fallback in WHEELS:
        version = version_of(name, fallback)
        have = sorted(folder.glob(f"{name}-{version}-*.whl"))
        if not have:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder),
                            *PLATFORM, f"{name}=={version}"], check=True)
            have = sorted(folder.glob(f"{name}-{version}-*.whl"))
        if not have:
            sys.exit(f"gpu-prep: pip downloaded no wheel for {name}=={version}")
        wheels += have
    return wheels


def slim_wheel(path: Path, drop_prefix: str) -> None:
    """Rewrite the wheel without the files under ``drop_prefix``, and without their RECORD lines."""
    with zipfile.ZipFile(path) as src:
        names = src.namelist()
        if not any(n.startswith(drop_prefix) for n in names):
            return
        tmp = path.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for n in names:
                if n.startswith(drop_prefix):
                    continue
                data = src.read(n)
                if n.endswith(".dist-info/RECORD"):
                    lines = [line for line in data.decode().splitlines() if not line.startswith(drop_prefix)]
                    data = ("\n".join(lines) + "\n").encode()
                dst.writestr(src.getinfo(n), data)
    tmp.replace(path)


def copy_fmnist(folder: Path) -> None:
    from advgkl.data import _IDX, FMNIST_SYSTEM_DIR  # the files advgkl reads, where Debian puts them

    files = [f"{stem}.gz" for pair in _IDX.values() for stem in pair]
    raw = folder / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    missing = [f for f in files if not (FMNIST_SYSTEM_DIR / f).is_file()]
    if missing:
        sys.exit(f"gpu-prep: Fashion-MNIST is missing in {FMNIST_SYSTEM_DIR} ({', '.join(missing)}); "
                 "run `make fmnist` (Debian package dataset-fashion-mnist)")
    for f in files:
        if not (raw / f).is_file() or (raw / f).stat().st_size != (FMNIST_SYSTEM_DIR / f).stat().st_size:
            shutil.copyfile(FMNIST_SYSTEM_DIR / f, raw / f)


def size_of(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def working_tree_bytes() -> int:
    """What the device tool sends besides carried folders: tracked and untracked, not ignored, files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return size_of(ROOT / name for name in out.decode().split("\0") if name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=str(ROOT / ".gpu"), help="output folder (default .gpu)")
    args = parser.parse_args(argv)
    folder = Path(args.dir)
    wheels = download_wheels(folder / "wheels")
    for w in wheels:
        if w.name.startswith("pyautoattack-"):
            slim_wheel(w, "pyautoattack/examples/")
    copy_fmnist(folder / "data")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    (folder / "commit").write_text((commit.stdout.strip() or "unknown") + ("+local-changes" if dirty else "") + "\n")
    carried = size_of(folder.rglob("*"))
    tree = working_tree_bytes()
    total = (carried + tree) / 2**20
    for w in wheels:
        print(f"gpu-prep: {w.relative_to(folder)} {w.stat().st_size / 2**20:.2f} MiB")
    print(f"gpu-prep: to copy to the GPU machine: {folder.name}/ {carried / 2**20:.1f} MiB + working tree "
          f"{tree / 2**20:.1f} MiB = {total:.1f} MiB (limit {LIMIT_MIB} MiB)")
    if total > LIMIT_MIB:
        print(f"gpu-prep: over the {LIMIT_MIB} MiB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
