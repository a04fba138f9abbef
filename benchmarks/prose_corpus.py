"""English prose corpus for the quality harness: Debian's ``manpages`` rendered to plain text.

    python benchmarks/prose_corpus.py --out runs/quality/corpora/manpages

Installs ``manpages`` (and ``man-db``, ``groff-base`` to render them) with ``apt-get`` when they
are missing — a benchmark step, never run by the tests — then renders every page the package
ships with ``man --nh --nj -l PAGE`` (no hyphenation or justification, so words stay whole),
strips the terminal overstrike formatting with ``col -bx`` and writes one ``.txt`` file per page
(``SECTION/NAME.txt``). ``MANIFEST.json`` records the package version, page count, bytes and a
SHA-1 of the text; an existing manifest means the corpus is built and nothing is redone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

PACKAGES = ("manpages", "man-db", "groff-base")


def _installed(package: str) -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return proc.returncode == 0 and "install ok installed" in proc.stdout


def ensure_packages() -> None:
    """``apt-get install`` whatever of :data:`PACKAGES` is missing (root on this project's machines)."""
    missing = [p for p in PACKAGES if not _installed(p)]
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], check=True, env=env)


def page_files() -> list[Path]:
    """The manual pages shipped by the ``manpages`` package (sections 1–8), sorted."""
    listing = subprocess.run(["dpkg", "-L", "manpages"], check=True, capture_output=True, text=True).stdout
    pages = [Path(p) for p in listing.splitlines() if "/man/man" in p and p.endswith(".gz")]
    present = [p for p in pages if p.is_file()]
    if not present:
        raise RuntimeError(
            "the manpages package is installed but ships no page files here (a dpkg path-exclude for "
            "/usr/share/man?); reinstall it without the exclude"
        )
    return sorted(present)


def render(page: Path) -> str:
    """Plain UTF-8 text of one page, 80 columns, no hyphenation, no overstrikes."""
    env = dict(os.environ, MANWIDTH="80", MANPAGER="cat", PAGER="cat", LANG="C.UTF-8")
    text = subprocess.run(["man", "--nh", "--nj", "-l", str(page)], capture_output=True, env=env, check=True).stdout
    return subprocess.run(["col", "-bx"], input=text, capture_output=True, check=True).stdout.decode("utf-8", "replace")


def build_manpages_corpus(out_dir: str | os.PathLike) -> Path:
    """Build the corpus into ``out_dir`` (once) and return it."""
    out = Path(out_dir)
    if (out / "MANIFEST.json").is_file():
        return out
    ensure_packages()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    digest, total, count = hashlib.sha1(), 0, 0
    for page in page_files():
        text = render(page)
        if not text.strip():
            continue
        target = tmp / page.parent.name / (page.name.removesuffix(".gz") + ".txt")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        digest.update(text.encode("utf-8"))
        total += len(text.encode("utf-8"))
        count += 1
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "manpages"], capture_output=True, text=True).stdout
    manifest = {"package": "manpages", "version": version, "pages": count, "bytes": total, "sha1": digest.hexdigest()}
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ns = ap.parse_args(argv)
    out = build_manpages_corpus(ns.out)
    print(json.loads((out / "MANIFEST.json").read_text()))
    print(out)


if __name__ == "__main__":
    main()
