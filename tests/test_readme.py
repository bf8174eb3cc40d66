"""The READMEs name only flags, files and sections that exist, and quote benchmark results verbatim.

Whatever sections the READMEs have: the checks read the files as they are.
"""
import re

import pytest

from conftest import PLUGIN, ROOT

READMES = [ROOT / "README.md", *sorted((ROOT / "examples").glob("*/README.md"))]
DOCS = READMES + sorted((ROOT / "docs").glob("*.md"))
#: Paths that the Makefile or a script makes, not files of the repository.
GENERATED = (".venv/", "demo-work/", "bench/work/", "examples/iwslt14/mosesdecoder")
PLUGIN_FLAG = re.compile(r"(?<![\w-])--(?:gradinit|wskip|tfixup)(?:-[a-z0-9]+)*")


def plugin_flags():
    """Every option fairseq-train accepts with the plugin, its task and its archs (w_skip, T-Fixup)."""
    from fairseq import options

    known = set()
    for arch in ("transformer_wskip_iwslt_de_en", "transformer_tfixup_iwslt_de_en"):
        parser = options.get_training_parser()
        options.parse_args_and_arch(parser, ["data", "--user-dir", PLUGIN, "--task", "translation", "--arch", arch])
        known |= {s for action in parser._actions for s in action.option_strings}
    return known


def rel(path):
    return path.relative_to(ROOT)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(text: str):
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # "# comments" in code blocks
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def code_spans(text: str):
    return re.findall(r"`([^`\n]+)`", text)


def path_like(token: str) -> bool:
    """A token that names a repository path: has a '/' and starts at a top-level entry."""
    token = token.strip("'\",;:()")
    if "/" not in token or token.startswith(("/", "http", "<", "$")) or any(c in token for c in "*{}<>=~"):
        return False
    first = token.split("/", 1)[0]
    return first in {p.name for p in ROOT.iterdir()} or first in {g.split("/")[0] for g in GENERATED}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(rel(p)))
def test_every_plugin_flag_a_document_names_exists(doc):
    known = plugin_flags()
    named = set(PLUGIN_FLAG.findall(doc.read_text()))
    if doc == ROOT / "README.md":
        assert "--gradinit-iters" in named, "the pattern no longer finds the README's flags"
    unknown = sorted(flag for flag in named if flag not in known)
    assert not unknown, f"{rel(doc)} names flags that fairseq-train with the plugin does not accept: {unknown}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(rel(p)))
def test_every_repository_path_a_document_names_exists(doc):
    text = doc.read_text()
    tokens = [t for span in code_spans(text) for t in span.split()]
    links = [link for link in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text) if not link.startswith("http")]
    missing = []
    for token in tokens:
        path = token.strip("'\",;:()").rstrip(".")
        if path_like(path) and not path.startswith(GENERATED) and not (ROOT / path).exists():
            missing.append(path)
    for link in links:
        if not (doc.parent / link).exists():
            missing.append(link)
    # Bare file names ("run_demo.py") must be some file of the repository.
    names = {p.name for p in ROOT.rglob("*") if ".git" not in p.parts and ".venv" not in p.parts}
    for token in tokens:
        if re.fullmatch(r"[\w.-]+\.py", token) and token not in names:
            missing.append(token)
    assert not missing, f"{rel(doc)} names paths that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(rel(p)))
def test_every_section_link_points_at_a_heading(doc):
    text = doc.read_text()
    broken = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        other = (doc.parent / target) if target else doc
        if not other.exists() or anchor not in headings(other.read_text()):
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{rel(doc)} links to sections that do not exist: {broken}"


def test_sections_that_code_and_makefile_refer_to_exist():
    readme = headings((ROOT / "README.md").read_text())
    sources = [ROOT / "Makefile", *ROOT.glob("fairseq_gradinit/**/*.py"), *ROOT.glob("bench/*.py"),
               *ROOT.glob("examples/**/*.py"), *ROOT.glob("examples/**/*.sh")]  # fmt: skip
    broken = [
        f"{rel(src)}: README \"{name}\""
        for src in sources
        for name in re.findall(r"README[ ,]+\"([^\"]+)\"", src.read_text())
        if slug(name) not in readme
    ]
    assert not broken, f"references to README sections that do not exist: {broken}"


def test_quoted_benchmark_results_are_the_files_verbatim():
    quotes = []
    for doc in DOCS:
        for path, body in re.findall(r"<!-- quote: (\S+) -->\n(.*?)<!-- end quote -->", doc.read_text(), re.S):
            quotes.append(path)
            source = ROOT / path
            assert source.exists(), f"{rel(doc)} quotes {path}, which does not exist"
            assert body.strip() == source.read_text().strip(), f"{rel(doc)}: the quote of {path} is not the file"
    assert any(q.startswith("bench/results/") for q in quotes), "README quotes no benchmark result"


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The helpers above flag a wrong flag, a missing path and a dead anchor."""
    known = plugin_flags()
    assert "--gradinit-iters" in known and "--wskip-init" in known and "--tfixup-init" in known
    assert "--gradinit-itres" not in known
    assert path_like("bench/nothing.py") and not (ROOT / "bench/nothing.py").exists()
    assert not path_like("<save-dir>/gradinit_scales.json") and not path_like("s/x/y")
    assert slug("Does it let me drop warmup?") == "does-it-let-me-drop-warmup"
    assert slug("Diagnostics: what GradInit changed") == "diagnostics-what-gradinit-changed"
    assert "install" in headings("# x\n## Install\n```\n# not a heading\n```\n")
    assert "not-a-heading" not in headings("```\n# not a heading\n```\n")
