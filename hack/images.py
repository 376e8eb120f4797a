"""Kiri's container images without a Docker daemon: `hack/images.py build|load [pause] [runtime] [operator]
[cache-csi|compressor-quantize]`.

- `pause`: the pod sandbox image of the real nodes (containerd's `pinned_images.sandbox`). Its one file is
  the Kubernetes pause binary, compiled statically with gcc from `build/pause/linux/pause.c` of the pinned
  k8s.io/kubernetes module (hack/tools/kubernetes), so nodes never pull `registry.k8s.io/pause`.
- `runtime`: `kiri serve`, the `runtime` target of hack/docker/Dockerfile, which stays the description of
  the image: a venv in /opt/kiri with `kiri[runtime]`, user 65532, HOME=/tmp, entrypoint `kiri`, CMD
  `serve --help`, port 8080, and nothing that needs a writable root filesystem. The differences, and why:
  the base is Debian bookworm's own python3 (3.11) installed by mmdebstrap from the machine's apt mirror
  instead of the python:3.11-slim-bookworm image (no registry access here); the wheels are fetched by the
  host's pip (its TLS settings reach PyPI) and installed offline into the image's venv.

- `cache-csi`: the node cache CSI driver (csi/kiri-cache-csi, Go): one static binary, built with the Go
  toolchain from the module's go.sum, the chart's `edgeCache.image`.

- `operator`: `kiri operator`, the Dockerfile's `operator` target: the runtime image's recipe with plain
  `kiri` in the venv (no onnxruntime, no numpy), its CMD and ports (8080 liveness, 9102 metrics).
- `compressor-quantize`: the Dockerfile's `compressor-quantize` target, `kiri[quantize]` (the runtime's
  packages and onnx, no torch): compression Jobs of ONNX sources with quantize variants. The full
  `compressor` (torch, for distillation, torch sources and language models) is not built here: torch's
  CPU-only wheels are not on PyPI, only on download.pytorch.org, which these machines cannot reach.

The runtime and operator images have two layers: the Debian base from mmdebstrap (cached on its own, so a change to
Kiri's sources rebuilds only /opt/kiri and nodes import only that layer) and the venv; the pause image
one. They are assembled with umoci (`raw add-layer`, `config`) and written by skopeo as an oci-archive
under $KIRI_CACHE/images/<name>-<key>.tar. The key is a hash of everything the image is made from (this
script's recipe for it, the Dockerfile, the package list, pyproject.toml and the Python sources, or
pause.c), so a warm run rebuilds nothing; the Debian packages themselves are what the mirror serves at
the first build (the apt sources name a dated snapshot). `load` also imports the archives into the
containerd of every real node of the cluster in $KIRI_STATE_DIR (`ctr images import`), unless the node
already has that image.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
HACK_DIR = REPO_ROOT / "hack"
KIRI_CACHE = Path(os.environ.get("KIRI_CACHE") or Path.home() / ".cache" / "kiri")
IMAGES_DIR = KIRI_CACHE / "images"
STATE_DIR = Path(os.environ.get("KIRI_STATE_DIR") or REPO_ROOT / ".kiri").resolve()

PAUSE_REF = "kiri.dev/pause:3.10-k8s"
CACHE_CSI_REF = "ghcr.io/kiri-dev/kiri-cache-csi:0.1.0"  # the chart's edgeCache.image:appVersion
CACHE_CSI_DIR = REPO_ROOT / "csi" / "kiri-cache-csi"
RUNTIME_REF = "ghcr.io/kiri-dev/kiri-runtime:0.1.0"
OPERATOR_REF = "ghcr.io/kiri-dev/kiri-operator:0.1.0"  # the chart's image.repository:appVersion
# The Dockerfile's `compressor-quantize` target: a ModelDeployment names it in spec.runtime.compressorImage.
COMPRESSOR_QUANTIZE_REF = "ghcr.io/kiri-dev/kiri-compressor:0.1.0-quantize"
# bookworm's python3 is 3.11, the Dockerfile's Python; python3-venv brings ensurepip (pip in the venv).
# libstdc++6 and libgomp1: the onnxruntime and numpy wheels link them (python3 does not pull them in).
# ca-certificates: https:// and s3:// model URIs.
RUNTIME_PACKAGES = ("python3", "python3-venv", "ca-certificates", "libstdc++6", "libgomp1")
# What a slim image drops: docs, man pages, locales, apt's lists (dpkg options of mmdebstrap).
RUNTIME_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
KIRI_UID = 65532


class ImageError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def run(*cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ImageError(f"{' '.join(map(str, cmd[:3]))} ... failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ImageError(f"missing {', '.join(missing)}: run `hack/install-debs.sh --real-nodes`")


def digest(h: hashlib._Hash, path: Path, rel: str) -> None:
    h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")


def source_files() -> list[Path]:
    """What the Dockerfile's COPY lines (and its .dockerignore) put in the build context."""
    files = [REPO_ROOT / "pyproject.toml", REPO_ROOT / "README.md"]
    for top in ("operator", "runtime"):
        for p in sorted((REPO_ROOT / top).rglob("*")):
            if (
                p.is_file()
                and "__pycache__" not in p.parts
                and p.suffix != ".pyc"
                and ".egg-info" not in str(p)
            ):
                files.append(p)
    return files


def k8s_module_dir() -> Path:
    out = run("go", "mod", "download", "-json", "k8s.io/kubernetes", cwd=HACK_DIR / "tools" / "kubernetes")
    return Path(json.loads(out)["Dir"])


def recipe(name: str) -> str:
    """The parts of this script that make the image (not how it is loaded): edits elsewhere rebuild nothing."""
    if name == "pause":
        parts: list[Any] = [build_pause, oci_assemble, PAUSE_REF]
    elif name == "cache-csi":
        parts = [build_cache_csi, oci_assemble, CACHE_CSI_REF]
    else:
        # The base layer has a key of its own (its file name); the image is rebuilt when it changes.
        ref = {"runtime": RUNTIME_REF, "operator": OPERATOR_REF}.get(name, COMPRESSOR_QUANTIZE_REF)
        parts = [BUILDERS[name], build_python_image, wheelhouse, oci_assemble, ref, base_layer_path().name]
    return "\n".join(inspect.getsource(p) if callable(p) else repr(p) for p in parts)


def image_key(name: str) -> str:
    h = hashlib.sha256()
    h.update(recipe(name).encode())
    if name == "pause":
        digest(h, k8s_module_dir() / "build" / "pause" / "linux" / "pause.c", "pause.c")
        h.update(run("gcc", "--version").splitlines()[0].encode())
    elif name == "cache-csi":
        for f in sorted(CACHE_CSI_DIR.iterdir()):
            digest(h, f, str(f.relative_to(REPO_ROOT)))
        h.update(run("go", "version").encode())
    else:
        digest(h, HACK_DIR / "docker" / "Dockerfile", "Dockerfile")
        digest(h, REPO_ROOT / "constraints.txt", "constraints.txt")  # the wheelhouse's versions
        for f in source_files():
            digest(h, f, str(f.relative_to(REPO_ROOT)))
    return h.hexdigest()[:16]


def archive_path(name: str, key: str) -> Path:
    return IMAGES_DIR / f"{name}-{key}.tar"


def oci_assemble(layers: list[Path], ref: str, out: Path, config: list[str], work: Path) -> None:
    """Layer tars -> an OCI image with `config` (umoci flags) -> an oci-archive named `ref`."""
    layout = work / "oci"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:img")
    for layer in layers:
        run("umoci", "raw", "add-layer", "--image", f"{layout}:img", layer)
    run("umoci", "config", "--image", f"{layout}:img", "--os", "linux", "--architecture", "amd64", *config)
    tmp = out.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    run("skopeo", "copy", "--quiet", f"oci:{layout}:img", f"oci-archive:{tmp}:{ref}")
    tmp.replace(out)


def build_pause(work: Path, out: Path) -> None:
    need("gcc", "umoci", "skopeo")
    src = k8s_module_dir() / "build" / "pause" / "linux" / "pause.c"
    root = work / "rootfs"
    root.mkdir()
    # Static: the image holds this one file and no libc.
    run("gcc", "-Os", "-static", "-Wall", "-DVERSION=3.10-kiri", "-o", root / "pause", src)
    run("strip", root / "pause")
    layer = work / "layer.tar"
    run("tar", "--numeric-owner", "--owner=0", "--group=0", "--mtime=@0", "-C", root, "-cf", layer, "pause")
    oci_assemble(
        [layer],
        PAUSE_REF,
        out,
        ["--config.entrypoint", "/pause", "--config.user", "65535:65535"],
        work,
    )


def build_cache_csi(work: Path, out: Path) -> None:
    need("go", "umoci", "skopeo")
    root = work / "rootfs"
    root.mkdir()
    # Static (no cgo): the image holds this one file. It runs as root: mounts and chown need it.
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly -buildvcs=false"}
    run(
        "go",
        "build",
        "-trimpath",
        "-ldflags",
        "-s -w",
        "-o",
        root / "kiri-cache-csi",
        ".",
        cwd=CACHE_CSI_DIR,
        env=env,
    )
    layer = work / "layer.tar"
    run(
        "tar", "--numeric-owner", "--owner=0", "--group=0", "--mtime=@0", "-C", root, "-cf", layer,
        "kiri-cache-csi",
    )  # fmt: skip
    oci_assemble([layer], CACHE_CSI_REF, out, ["--config.entrypoint", "/kiri-cache-csi"], work)


def wheelhouse(work: Path) -> Path:
    """kiri[runtime,quantize] and its dependencies as wheels, fetched by the host's pip at the versions of
    constraints.txt (cached by pyproject.toml and constraints.txt)."""
    constraints = REPO_ROOT / "constraints.txt"
    deps_key = hashlib.sha256(
        (REPO_ROOT / "pyproject.toml").read_bytes() + constraints.read_bytes()
    ).hexdigest()[:16]
    deps = IMAGES_DIR / f"wheels-py311-{deps_key}"
    src = work / "src"
    src.mkdir()
    shutil.copy2(REPO_ROOT / "pyproject.toml", src)
    shutil.copy2(REPO_ROOT / "README.md", src)
    for top in ("operator", "runtime"):
        shutil.copytree(
            REPO_ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    if not deps.is_dir():
        log("fetching the runtime's wheels from PyPI (cold: a minute or two) ...")
        tmp = deps.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        # Binary wheels for the image's Python (3.11, glibc x86_64), whatever runs this script.
        run(*pip, "download", "--quiet", "--dest", tmp, "--only-binary=:all:", "--python-version", "3.11",
            "--implementation", "cp", "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux_2_17_x86_64", "-c", constraints, f"{src}[runtime,quantize]")  # fmt: skip
        for w in tmp.glob("kiri-*"):
            w.unlink()  # Kiri itself is built below, from the sources of this checkout
        tmp.replace(deps)
        for old in IMAGES_DIR.glob("wheels-py311-*"):
            if old != deps:
                shutil.rmtree(old, ignore_errors=True)  # one wheelhouse: the last pyproject.toml's
    kiri = work / "kiri-wheel"
    run(*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", kiri, src)
    house = work / "wheels"
    shutil.copytree(deps, house)
    for w in kiri.glob("*.whl"):
        shutil.copy2(w, house)
    return house


def base_layer_path() -> Path:
    h = hashlib.sha256()
    for part in (inspect.getsource(base_layer), RUNTIME_PACKAGES, RUNTIME_EXCLUDES, KIRI_UID, mirror()):
        h.update(repr(part).encode())
    return IMAGES_DIR / f"base-bookworm-{h.hexdigest()[:16]}.tar"


def base_layer() -> Path:
    """Layer 1: a minimal bookworm with python3 and the `kiri` user (cached apart: sources change more often)."""
    out = base_layer_path()
    if out.is_file():
        log(f"base layer: cached ({out.name})")
        return out
    hooks = [
        'rm -rf "$1/var/lib/apt/lists"/* "$1/var/cache/apt"/* "$1/var/log"/*',
        # The Dockerfile's `groupadd/useradd kiri` (a named user: some libraries ask for a home directory).
        f'echo "kiri:x:{KIRI_UID}:" >> "$1/etc/group"',
        f'echo "kiri:x:{KIRI_UID}:{KIRI_UID}::/tmp:/usr/sbin/nologin" >> "$1/etc/passwd"',
    ]
    tmp = out.with_suffix(".tmp")
    cmd = [
        "mmdebstrap", "--quiet", "--mode=root", "--variant=essential", "--format=tar",
        f"--include={','.join(RUNTIME_PACKAGES)}",
        # Merged /usr as debootstrap makes it (directory links), instead of the usrmerge package, which
        # pulls perl and its modules (25 MB) into the image.
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        *[f"--dpkgopt=path-exclude={p}" for p in RUNTIME_EXCLUDES],
        *[f"--customize-hook={h}" for h in hooks],
        "bookworm", str(tmp), mirror(),
    ]  # fmt: skip
    log("mmdebstrap: a minimal bookworm with python3 (cold: a minute or two) ...")
    t0 = time.monotonic()
    # SOURCE_DATE_EPOCH: file times are fixed, so the same packages give the same layer digest.
    run(*cmd, env={**os.environ, "SOURCE_DATE_EPOCH": "0"})
    tmp.replace(out)
    for old in IMAGES_DIR.glob("base-bookworm-*.tar"):
        if old != out:
            old.unlink()
    log(f"base layer: built in {time.monotonic() - t0:.0f}s ({out.name})")
    return out


def build_runtime(work: Path, out: Path) -> None:
    """Two layers: the Debian base (cached) and /opt/kiri, the Dockerfile's venv with kiri[runtime]."""
    build_python_image(work, out, "kiri[runtime]", RUNTIME_REF, ["8080/tcp"], ["serve", "--help"])


def build_operator(work: Path, out: Path) -> None:
    """The Dockerfile's `operator` target: the same base layer, a venv with plain `kiri` (kopf, httpx,
    pydantic: no onnxruntime, no numpy), its CMD and ports (kopf's liveness 8080, metrics 9102)."""
    cmd = ["operator", "--standalone", "--liveness=http://0.0.0.0:8080/healthz", "--metrics-port=9102"]
    build_python_image(work, out, "kiri", OPERATOR_REF, ["8080/tcp", "9102/tcp"], cmd)


def build_compressor_quantize(work: Path, out: Path) -> None:
    """The Dockerfile's `compressor-quantize` target: the same base layer, a venv with kiri[quantize]."""
    build_python_image(work, out, "kiri[quantize]", COMPRESSOR_QUANTIZE_REF, [], ["compress", "--help"])


def build_python_image(
    work: Path, out: Path, requirement: str, ref: str, ports: list[str], cmd: list[str]
) -> None:
    """The Debian base layer (cached) + /opt/kiri, a venv with `requirement` installed offline."""
    need("mmdebstrap", "umoci", "skopeo")
    if os.geteuid() != 0:
        raise ImageError(f"building {ref} needs root (mmdebstrap --mode=root, chroot)")
    base = base_layer()
    house = wheelhouse(work)
    root = work / "rootfs"
    root.mkdir()
    run("tar", "-C", root, "-xf", base)  # as root: owners and /dev nodes as mmdebstrap made them
    shutil.copytree(house, root / "wheels")
    # The Dockerfile's `python -m venv /opt/kiri && pip install '.[runtime]'`, offline from the wheels.
    run("chroot", root, "python3", "-m", "venv", "/opt/kiri")
    run("chroot", root, "/opt/kiri/bin/pip", "install", "--quiet", "--no-cache-dir", "--no-index",
        "--find-links", "/wheels", requirement)  # fmt: skip
    app = work / "kiri.tar"
    run("tar", "--numeric-owner", "--owner=0", "--group=0", "--mtime=@0", "--sort=name", "-C", root,
        "-cf", app, "opt/kiri")  # fmt: skip
    env = ["PATH=/opt/kiri/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/tmp",
           "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"]  # fmt: skip
    oci_assemble(
        [base, app],
        ref,
        out,
        [
            "--config.user", f"{KIRI_UID}:{KIRI_UID}", "--config.workingdir", "/tmp",
            "--config.entrypoint", "kiri", *[a for c in cmd for a in ("--config.cmd", c)],
            *[a for p in ports for a in ("--config.exposedports", p)],
            *[a for e in env for a in ("--config.env", e)],
        ],
        work,
    )  # fmt: skip


def mirror() -> str:
    """The Debian mirror this machine's apt uses (mmdebstrap fetches from it)."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] or (words[:1] == ["deb"] and len(words) > 2):
                uri = words[1] if words[0] == "URIs:" else next(w for w in words[1:] if "://" in w)
                if uri.rstrip("/").endswith("/debian"):
                    return uri
    return "http://deb.debian.org/debian"


BUILDERS = {
    "pause": build_pause,
    "runtime": build_runtime,
    "operator": build_operator,
    "cache-csi": build_cache_csi,
    "compressor-quantize": build_compressor_quantize,
}


def build(name: str, force: bool = False) -> Path:
    key = image_key(name)
    out = archive_path(name, key)
    if out.is_file() and not force:
        log(f"{name}: cached ({out}, {out.stat().st_size / 2**20:.0f} MiB)")
        return out
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"kiri-image-{name}-", dir=IMAGES_DIR) as tmp:
        BUILDERS[name](Path(tmp), out)
    for old in IMAGES_DIR.glob(f"{name}-*.tar"):
        if old != out:
            old.unlink()  # one archive per image: a rebuild replaces the last one
    log(f"{name}: built in {time.monotonic() - t0:.0f}s ({out}, {out.stat().st_size / 2**20:.0f} MiB)")
    return out


def real_node_sockets() -> list[tuple[str, str, str]]:
    """(node, ctr binary, containerd socket) of every real node of the cluster in $KIRI_STATE_DIR."""
    try:
        state = json.loads((STATE_DIR / "state.json").read_text())
    except (OSError, ValueError):
        raise ImageError(f"no cluster in {STATE_DIR} (hack/cluster up --real-nodes N)") from None
    nodes = state.get("real_nodes", {}).get("nodes", {})
    if not nodes:
        raise ImageError(f"the cluster in {STATE_DIR} has no real nodes (hack/cluster up --real-nodes N)")
    return [(n, v["ctr"], v["containerd_socket"]) for n, v in sorted(nodes.items())]


def archive_digest(archive: Path) -> tuple[str, str]:
    """(image name, manifest digest) recorded in an oci-archive's index.json."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        manifest = json.load(member)["manifests"][0]
    return manifest["annotations"]["org.opencontainers.image.ref.name"], manifest["digest"]


def import_archive(ctr: str, socket: str, archive: Path) -> bool:
    """Import unless the node already has this image at this digest (a warm `load` imports nothing)."""
    base = [ctr, "--address", socket, "--namespace", "k8s.io", "images"]
    ref, want = archive_digest(archive)
    listed = run(*base, "ls", f"name=={ref}")
    if any(want in line.split() for line in listed.splitlines()[1:]):
        return False
    run(*base, "import", archive)
    return True


def load(names: list[str], force: bool = False) -> None:
    archives = [build(n, force) for n in names]
    for node, ctr, socket in real_node_sockets():
        for archive in archives:
            t0 = time.monotonic()
            if import_archive(ctr, socket, archive):
                log(f"{archive.name}: imported into {node} in {time.monotonic() - t0:.1f}s")
            else:
                log(f"{archive.name}: already in {node}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/images.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("command", choices=["build", "load", "path"])
    parser.add_argument(
        "images",
        nargs="*",
        help="pause, runtime, operator, cache-csi and/or compressor-quantize (default: all)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = parser.parse_args(argv)
    names = args.images or list(BUILDERS)
    unknown = sorted(set(names) - set(BUILDERS))
    if unknown:
        parser.error(f"unknown image(s) {', '.join(unknown)}; choose from {', '.join(BUILDERS)}")
    try:
        if args.command == "build":
            for n in names:
                print(build(n, args.force))
        elif args.command == "path":
            for n in names:
                print(archive_path(n, image_key(n)))
        else:
            load(names, args.force)
    except ImageError as exc:
        print(f"hack/images.py {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
