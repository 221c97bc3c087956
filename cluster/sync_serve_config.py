"""Embed the repo's GPU Serve profile in the RayService manifest, verbatim, so they cannot drift.

    python cluster/sync_serve_config.py           # rewrite cluster/kuberay/rayservice.yaml
    python cluster/sync_serve_config.py --check   # exit 1 if the manifest is out of date

Only the `serveConfigV2: |` block is replaced; every other line (and comment) of the manifest
stays as written. tests/test_cluster_manifests.py runs the check.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "serve_app" / "profiles" / "gpu.yaml"
MANIFEST = REPO / "cluster" / "kuberay" / "rayservice.yaml"
MARK = "serveConfigV2: |"

log = logging.getLogger("sync_serve_config")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def embed(manifest: str, profile: str) -> str:
    """`manifest` with its `serveConfigV2: |` literal block replaced by `profile`."""
    lines = manifest.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == MARK]
    if len(starts) != 1:
        raise ValueError(f"expected exactly one {MARK!r} line in the manifest, found {len(starts)}")
    start = starts[0]
    indent = _indent(lines[start]) + 2
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) >= indent):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines after the block stay
        end -= 1
    body = profile.rstrip("\n") + "\n"
    block = [(" " * indent + line) if line.strip() else "\n" for line in body.splitlines(keepends=True)]
    return "".join(lines[: start + 1] + block + lines[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report drift (exit 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    current = MANIFEST.read_text()
    wanted = embed(current, PROFILE.read_text())
    if current == wanted:
        log.info("%s embeds %s: up to date", MANIFEST.name, PROFILE.name)
        return 0
    if args.check:
        log.error("%s is out of date: run python cluster/sync_serve_config.py", MANIFEST)
        return 1
    MANIFEST.write_text(wanted)
    log.info("rewrote the serveConfigV2 block of %s", MANIFEST)
    return 0


if __name__ == "__main__":
    sys.exit(main())
