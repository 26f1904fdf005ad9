"""MkDocs hook: render the dated measurements (`bench_results/**/README.md`) into the docs site.

The docs pages link them as files of the repository (`../bench_results/<date>-<where>/README.md`
from `docs/`), which is right on GitHub. Here each such README becomes a page of the site at
`bench_results/...`, each link to one is rewritten to that page, and a link to a file that does
not exist is reported as a warning, which `mkdocs build --strict` turns into a failure.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.bench_results")
_LINK = re.compile(r"\]\(((?:\.\./)+bench_results/[^)#\s]+)(#[^)\s]*)?\)")


def _repo_root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_files(files, config):
    root = _repo_root(config)
    for readme in sorted((root / "bench_results").glob("**/README.md")):
        src_uri = readme.relative_to(root).as_posix()
        files.append(File.generated(config, src_uri, abs_src_path=str(readme)))
    return files


def on_page_markdown(markdown, page, config, files):
    root = _repo_root(config)
    docs_dir = Path(config.docs_dir).resolve().relative_to(root).as_posix()
    page_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(match):
        link, anchor = match.group(1), match.group(2) or ""
        target = posixpath.normpath(posixpath.join(docs_dir, page_dir, link))  # relative to the repository
        if not (root / target).is_file():
            log.warning("%s links %s, which is not a file of the repository", page.file.src_uri, link)
            return match.group(0)
        if not target.endswith("README.md"):
            log.warning("%s links %s: only bench_results READMEs are part of the site", page.file.src_uri, link)
            return match.group(0)
        return f"]({posixpath.relpath(target, page_dir or '.')}{anchor})"

    return _LINK.sub(rewrite, markdown)
