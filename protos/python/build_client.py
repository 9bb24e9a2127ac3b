"""Build the earn-client wheel (`make client`; the suite's tests/deploy/test_client_package.py).

1. Stage the package in a build folder (default build/client): this folder's
   pyproject.toml and earn_client/, nothing else.
2. Generate earn/v1/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py and *_pb2_grpc.pyi (typed stubs and
   servicers, mypy-protobuf) into it from protos/earn/v1/*.proto
   with grpc_tools.protoc, as `make proto` does for the services (so the client's stubs and
   the servers' come from the same protoc), and mark earn/v1 typed (py.typed).
3. `pip wheel --no-deps --no-build-isolation`: the interpreter's own setuptools builds it,
   offline; the wheel lands in the dist folder (default build/dist).

Run it with the project's interpreter (.venv/bin/python: grpcio-tools, setuptools, pip).
Prints the wheel's path.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = HERE.parent
REPO_ROOT = PROTOS.parent
NAME = "earn_client"


def _run(*args: str | Path, cwd: Path | None = None) -> None:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}{done.stderr}")


def stage(stage_dir: Path) -> Path:
    """The package's sources and freshly generated stubs in ``stage_dir`` (emptied first)."""
    if stage_dir in (REPO_ROOT, PROTOS, HERE) or stage_dir in HERE.parents:
        raise SystemExit(f"{stage_dir} holds sources: give the build a folder of its own")
    shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir(parents=True)
    shutil.copy2(HERE / "pyproject.toml", stage_dir / "pyproject.toml")
    shutil.copytree(HERE / NAME, stage_dir / NAME, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    protos = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "earn").rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTOS / 'earn'}")
    out = str(stage_dir)
    plugin = Path(sys.executable).with_name("protoc-gen-mypy_grpc")  # mypy-protobuf, next to this Python
    _run(sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={out}", f"--pyi_out={out}",
         f"--grpc_python_out={out}", f"--plugin=protoc-gen-mypy_grpc={plugin}", f"--mypy_grpc_out=quiet:{out}",
         *protos, cwd=PROTOS)
    (stage_dir / "earn" / "v1" / "py.typed").touch()
    return stage_dir


def build(dist_dir: Path, stage_dir: Path) -> Path:
    """Stage, generate, build; the wheel's path."""
    stage(stage_dir)
    dist_dir.mkdir(parents=True, exist_ok=True)
    for old in dist_dir.glob(f"{NAME}-*.whl"):
        old.unlink()
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--no-index", "--wheel-dir", dist_dir, stage_dir)
    wheels = sorted(dist_dir.glob(f"{NAME}-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one {NAME} wheel in {dist_dir}, found {[w.name for w in wheels]}")
    return wheels[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, default=REPO_ROOT / "build" / "dist", help="where the wheel goes")
    parser.add_argument("--stage", type=Path, default=REPO_ROOT / "build" / "client", help="the build folder (emptied)")
    args = parser.parse_args()
    print(build(args.dist.resolve(), args.stage.resolve()))


if __name__ == "__main__":
    main()
