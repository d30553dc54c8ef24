"""mkdocs hooks: publish the benchmark report, tables and charts with the site, and
point the guides' repository-relative links at them.

The guides link to `../benchmarks/results/*.md` so that they also work when read on
GitHub; the site has no parent of `docs/`, so those files are added under the same
names at the site's root and the links lose one `../`.
"""

import pathlib
import re

from mkdocs.structure.files import File, Files


ROOT = pathlib.Path(__file__).parent.parent
PUBLISHED = (
    "benchmarks/results*.md",
    "benchmarks/results/*.md",
    "benchmarks/results/charts/*.png",
)


def on_files(files: Files, config) -> Files:
    for pattern in PUBLISHED:
        for path in sorted(ROOT.glob(pattern)):
            relative = path.relative_to(ROOT).as_posix()
            files.append(
                File(
                    relative,
                    src_dir=str(ROOT),
                    dest_dir=config["site_dir"],
                    use_directory_urls=config["use_directory_urls"],
                )
            )
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    depth = page.file.src_uri.count("/")
    above = "../" * (depth + 1)
    inside = "../" * depth
    return re.sub(
        r"\]\(" + re.escape(above) + r"(benchmarks)/",
        lambda m: "](" + inside + m.group(1) + "/",
        markdown,
    )
