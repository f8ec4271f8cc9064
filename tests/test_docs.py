"""The documentation's links lead somewhere: every relative link and #anchor in the repository's
Markdown files names a file that exists and a heading (or HTML anchor) that GitHub generates.
README.md stays a short front door that still shows the test command CI runs."""
import os
import re
import subprocess
from urllib.parse import unquote

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 260

FENCE = re.compile(r'^ {0,3}(`{3,}|~{3,})')
HEADING = re.compile(r'^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$')
INLINE_CODE = re.compile(r'(`+)(.+?)\1')
# [text](target) and ![alt](target), an optional "title" after the target; <target> allowed.
INLINE_LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+"[^"]*")?\s*\)')
REFERENCE_DEFINITION = re.compile(r'^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)')
HTML_LINK = re.compile(r'<(?:a|img)\s[^>]*?(?:href|src)="([^"]+)"', re.IGNORECASE)
HTML_ANCHOR = re.compile(r'<a\s[^>]*?(?:name|id)="([^"]+)"', re.IGNORECASE)
EXTERNAL = re.compile(r'^(?:[a-z][a-z0-9+.-]*:|//)', re.IGNORECASE)  # http:, mailto:, //host


def prose_lines(text):
    """(line number, line) of the lines GitHub renders as prose: fenced and indented code blocks
    are left out, since a link or heading shown as code is not one."""
    fence, previous_blank, in_indented = None, True, False
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = None
            continue
        if match:
            fence = match.group(1)
            continue
        blank = not line.strip()
        indented = line.startswith(('    ', '\t')) and not blank
        in_indented = indented and (previous_blank or in_indented)
        if not in_indented and not blank:
            yield number, line
        previous_blank = blank


def heading_text(raw):
    """The text GitHub renders for a heading's Markdown: code spans keep their content, links
    their text, emphasis markers go."""
    text = INLINE_CODE.sub(lambda m: m.group(2), raw)
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', text)
    return re.sub(r'<[^>]+>', '', text)


def anchors(text):
    """The #fragments a Markdown file offers, as GitHub computes them: the heading text in lower
    case, punctuation other than '-' and '_' dropped, spaces turned into '-', and a repeated
    heading suffixed -1, -2, ...; plus explicit <a name="..."> / id="..." anchors."""
    found, seen = set(), {}
    for _, line in prose_lines(text):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if not match:
            continue
        slug = re.sub(r'[^\w\- ]', '', heading_text(match.group(2)).strip().lower()).replace(' ', '-')
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f'{slug}-{count}')
    return found


def links(text):
    """(line number, target) of every link in a Markdown text's prose."""
    for number, line in prose_lines(text):
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            yield number, definition.group(1).strip('<>')
        line = INLINE_CODE.sub('', line)
        for target in INLINE_LINK.findall(line) + HTML_LINK.findall(line):
            yield number, target.strip('<>')


def broken_links(path, root=ROOT):
    """One message per link of the Markdown file `path` that leads nowhere: a relative file or
    folder that does not exist (relative to the linking file; '/x' from the repository root),
    or an #anchor that the Markdown file it points into does not define. External links are
    not fetched."""
    with open(path, encoding='utf-8') as f:
        text = f.read()
    problems = []
    for number, target in links(text):
        if EXTERNAL.match(target):
            continue
        file_part, _, fragment = target.partition('#')
        file_part = unquote(file_part)
        if not file_part:
            linked = path
        elif file_part.startswith('/'):
            linked = os.path.join(root, file_part.lstrip('/'))
        else:
            linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
        where = f'{os.path.relpath(path, root)}:{number}: {target}'
        if not os.path.exists(linked):
            problems.append(f'{where}: no such file {os.path.relpath(linked, root)}')
            continue
        if fragment and linked.endswith('.md') and os.path.isfile(linked):
            with open(linked, encoding='utf-8') as f:
                if unquote(fragment) not in anchors(f.read()):
                    problems.append(f'{where}: no heading #{fragment} in {os.path.relpath(linked, root)}')
    return problems


def markdown_files(root=ROOT):
    """The repository's Markdown files: tracked ones and new ones git does not ignore (every
    Markdown file below root, hidden folders aside, where git is not at hand)."""
    try:
        out = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z', '--', '*.md'],
                             cwd=root, capture_output=True, text=True, check=True).stdout
        names = sorted({n for n in out.split('\0') if n})
    except (OSError, subprocess.CalledProcessError):
        names = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
            names += [os.path.relpath(os.path.join(folder, n), root) for n in sorted(files) if n.endswith('.md')]
    return [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n))]


# ----------------------------------------------------------------------------------------------
# The checker itself

def test_anchors_follow_githubs_rules():
    text = '\n'.join([
        '# Cohorts: a Table 1 row in one process', '## `--precision` and bf16', '## Set-up',
        '## Set-up', '## Set-up', '## snake_case_name', '## [Linked](other.md) heading',
        '<a name="custom"></a>',
        '', '    # not a heading (indented code)', '', '```', '## not a heading either', '```'])
    assert anchors(text) == {'cohorts-a-table-1-row-in-one-process', '--precision-and-bf16', 'set-up',
                             'set-up-1', 'set-up-2', 'snake_case_name', 'linked-heading', 'custom'}


def test_broken_files_and_anchors_are_reported_and_good_ones_pass(tmp_path):
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'docs' / 'page.md').write_text('# A page\n\n## Second part\n')
    (tmp_path / 'figure.png').write_bytes(b'')
    (tmp_path / 'README.md').write_text('\n'.join([
        '# Front', '',
        'Good: [page](docs/page.md), [part](docs/page.md#second-part), [here](#front),',
        '![fig](figure.png "a title"), [root](/docs/page.md), [web](https://example.com/x#y),',
        '[folder](docs/), `[code](missing.md)`.', '',
        '    [indented code](missing.md)', '',
        'Bad: [gone](docs/gone.md) and [no part](docs/page.md#third-part) and [self](#nowhere).',
        '[ref]: docs/also_gone.md']))
    problems = broken_links(str(tmp_path / 'README.md'), root=str(tmp_path))
    assert len(problems) == 4, problems
    assert 'README.md:9: docs/gone.md: no such file docs/gone.md' in problems
    assert 'README.md:9: docs/page.md#third-part: no heading #third-part in docs/page.md' in problems
    assert 'README.md:9: #nowhere: no heading #nowhere in README.md' in problems
    assert 'README.md:10: docs/also_gone.md: no such file docs/also_gone.md' in problems
    # links are resolved from the linking file's folder
    (tmp_path / 'docs' / 'back.md').write_text('[up](../README.md#front) [wrong](README.md)\n')
    assert broken_links(str(tmp_path / 'docs' / 'back.md'), root=str(tmp_path)) == [
        'docs/back.md:1: README.md: no such file docs/README.md']


# ----------------------------------------------------------------------------------------------
# The repository's documentation

def test_the_repository_has_its_documentation():
    names = {os.path.relpath(p, ROOT) for p in markdown_files()}
    assert {'README.md', 'benchmarks/README.md', 'docs/methods.md', 'docs/runs.md'} <= names, names


@pytest.mark.parametrize('path', markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_and_anchor_exists(path):
    assert broken_links(path) == []


def test_readme_is_short_and_shows_the_test_command_ci_runs():
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    assert len(readme.splitlines()) <= README_MAX_LINES
    with open(os.path.join(ROOT, '.ci', 'run'), encoding='utf-8') as f:
        # the command as it starts a line of the script, without what handles its exit status
        ci = [m.group(1).strip() for m in map(re.compile(r'\s*(python3 -m pytest\b[^|;&#]*)').match, f) if m]
    assert ci == ['python3 -m pytest -q tests']
    # the set-up command a reader copies is the one CI runs
    assert 'pip install -r requirements.txt && ' + ci[0] in [line.strip() for line in readme.splitlines()]
