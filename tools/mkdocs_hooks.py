"""MkDocs hooks for graphopt's documentation site (mkdocs.yml: `hooks: [tools/mkdocs_hooks.py]`).

The pages in docs/ are written to read on GitHub too, so they link to files outside docs/ by
their repository paths (`../benchmarks/RESULTS-llm.md`). MkDocs only knows files under
docs_dir, and `mkdocs build --strict` fails on such links. Rather than loosening link
validation or changing the sources (which would break the links when read on GitHub), this
hook:

1. `on_files`: publishes every `benchmarks/RESULTS*.md` as a page of the site at
   `results/<name>.md` (a generated file backed by the real one, so `mkdocs serve` reloads it);
   mkdocs.yml's nav lists them under "Benchmarks". The charts the benchmarks draw
   (`benchmarks/*.svg`) are published beside them, as images.
2. `on_page_markdown`: rewrites each inline link or image whose target, resolved against the
   page's real location in the repository, leaves docs_dir:
   - to a published file (a RESULTS page): into a relative link to its page on the site, which
     MkDocs then validates like any other link (the file, and the #anchor if any);
   - to any other file that exists in the repository (an example, a source file, README.md):
     into its repository path as code text, since the site has no page for it;
   - to a path that does not exist: left as it is, so MkDocs reports it and --strict fails.

Links inside docs_dir, absolute URLs and links in code (fenced blocks, code spans) are not
touched.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

PUBLISHED_GLOBS = ("benchmarks/RESULTS*.md", "benchmarks/*.svg")
RESULTS_DIR = "results"

# Real absolute path of a published file -> its src_uri in the site (results/RESULTS-x.md).
_published: dict[Path, str] = {}

# A code span (left as is; it may wrap lines, not cross a blank one) or an inline link or image:
# [text](target "title").
_LINK = re.compile(
    r"(?P<code>(?P<ticks>`+)(?:(?!\n[ \t]*\n).)*?(?P=ticks))"
    r"|(?P<bang>!?)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)",
    re.DOTALL,
)
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _repo_root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_files(files, config):
    root = _repo_root(config)
    _published.clear()
    for path in sorted(p for pattern in PUBLISHED_GLOBS for p in root.glob(pattern)):
        src_uri = f"{RESULTS_DIR}/{path.name}"
        files.append(File.generated(config, src_uri, abs_src_path=str(path)))
        _published[path.resolve()] = src_uri
    return files


def _rewrite_link(match: re.Match, page, config) -> str:
    if match.group("code") is not None:
        return match.group(0)
    target = match.group("target")
    if _SCHEME.match(target) or target.startswith(("#", "/")):
        return match.group(0)
    path_part, sep, fragment = target.partition("#")
    source_dir = Path(page.file.abs_src_path).resolve().parent
    resolved = (source_dir / path_part).resolve()
    docs_dir = Path(config.docs_dir).resolve()
    if resolved.is_relative_to(docs_dir):
        return match.group(0)
    if resolved in _published:
        page_dir = posixpath.dirname(page.file.src_uri)
        new = posixpath.relpath(_published[resolved], page_dir or ".") + sep + fragment
        return f"{match.group('bang')}[{match.group('text')}]({new}{match.group('title') or ''})"
    root = _repo_root(config)
    if match.group("bang"):
        return match.group(0)  # an image the site does not publish: MkDocs reports it
    if resolved.exists() and resolved.is_relative_to(root):
        repo_path = resolved.relative_to(root).as_posix()
        text = match.group("text").strip("`")
        if text in (repo_path, posixpath.basename(repo_path)):
            return f"`{repo_path}`"
        return f"{match.group('text')} (`{repo_path}`)"
    return match.group(0)  # broken: MkDocs' link validation reports it


def on_page_markdown(markdown, page, config, files):
    out, chunk, fence = [], [], None
    for line in markdown.splitlines(keepends=True):
        opened = _FENCE.match(line)
        if fence is None and opened:
            out.append(_LINK.sub(lambda m: _rewrite_link(m, page, config), "".join(chunk)))
            chunk, fence = [], opened.group(1)
            out.append(line)
        elif fence is not None:
            if line.lstrip().startswith(fence):
                fence = None
            out.append(line)
        else:
            chunk.append(line)
    out.append(_LINK.sub(lambda m: _rewrite_link(m, page, config), "".join(chunk)))
    return "".join(out)
