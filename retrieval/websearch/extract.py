"""The main text of an HTML page: no scripts, styles, menus, headers,
footers, forms or link lists; one line per block (paragraph, heading, list
item, cell), whitespace collapsed."""

from __future__ import annotations

import codecs
import re

import lxml.etree
import lxml.html

DROP_TAGS = ("script", "style", "noscript", "template", "svg", "nav", "header", "footer", "aside", "form",
             "iframe", "button", "select", "menu", "dialog", "canvas", "object", "embed", "head")
DROP_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search", "menu", "menubar", "dialog"}
BLOCK_TAGS = ("p", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "td", "th", "dd", "dt",
              "figcaption", "div", "section", "article", "main", "br", "tr", "table", "ul", "ol", "dl", "title")
_BOILERPLATE = re.compile(
    r"(^|[\s_-])(nav|navbar|menu|footer|sidebar|cookies?|banner|breadcrumbs?|share|social|advert|ads|popup|"
    r"subscribe|newsletter|skip-link)([\s_-]|$)")
#: A block whose text is mostly link text is a menu or a link list.
LINK_DENSITY = 0.6
#: Marks block boundaries while the text is gathered (a private-use character, not whitespace).
_BREAK = "\ue000"


def text_codec(label: str | None) -> str | None:
    """Python's name of the text encoding ``label`` names, or None when it names
    none: an unknown label, or a codec that is not a text encoding (rot13,
    base64, hex, zlib... which ``bytes.decode`` refuses with LookupError)."""
    if not label:
        return None
    try:
        info = codecs.lookup(label)
    except (LookupError, ValueError):  # ValueError: a label with a NUL in it
        return None
    return info.name if getattr(info, "_is_text_encoding", True) else None


def decode(body: bytes, charset: str | None) -> str:
    """``body`` as text in ``charset``, or as UTF-8 when that is no usable text
    encoding. Bad bytes become U+FFFD; never raises."""
    codec = text_codec(charset) or "utf-8"
    try:
        return body.decode(codec, errors="replace")
    except UnicodeError:  # text codecs that refuse errors="replace" or fail anyway: idna, punycode, undefined
        return body.decode("utf-8", errors="replace")


def extract(body: bytes, content_type: str = "text/html", charset: str | None = None) -> tuple[str, str]:
    """(title, main text) of a page; ``charset`` is the one its Content-Type names."""
    if content_type == "text/plain":
        return "", _lines(decode(body, charset))
    if charset:
        # The header's charset wins over the page's own <meta>. Decoded here, not by libxml2: it
        # knows other names than Python (a LookupError for utf-8-sig or rot13 when the parser is
        # made), and it stops at the first byte its codec rejects (utf-7).
        body, charset = decode(body, charset).encode("utf-8"), "utf-8"
    parser = lxml.html.HTMLParser(encoding=charset, remove_comments=True, remove_pis=True)
    try:
        root = lxml.html.document_fromstring(body, parser=parser)
    except (lxml.etree.ParserError, ValueError, LookupError):
        return "", ""
    title = " ".join((root.findtext(".//title") or "").split())
    for el in list(root.iter(*DROP_TAGS)):
        _drop(el)
    for el in list(root.iter(lxml.etree.Element)):
        if el.getparent() is None:
            continue
        marks = f"{el.get('class', '')} {el.get('id', '')}".lower()
        if (el.get("role", "").lower() in DROP_ROLES or el.get("hidden") is not None
                or el.get("aria-hidden", "").lower() == "true" or _BOILERPLATE.search(marks)):
            _drop(el)
    main = (root.xpath("//main") or root.xpath("//article") or root.xpath("//*[@role='main']")
            or root.xpath("//body") or [root])[0]
    for el in list(main.iter("ul", "ol", "div", "p", "table", "section", "dl")):
        if el.getparent() is None:
            continue
        text = " ".join(el.text_content().split())
        links = sum(len(" ".join(a.text_content().split())) for a in el.iter("a"))
        if text and links / len(text) >= LINK_DENSITY:
            _drop(el)
    for el in main.iter(*BLOCK_TAGS):
        el.tail = _BREAK + (el.tail or "")
        el.text = _BREAK + (el.text or "")
    if not title:
        h1 = main.find(".//h1")
        title = " ".join(h1.text_content().split()) if h1 is not None else ""
    return title, _lines(main.text_content(), _BREAK)


def _drop(el) -> None:
    if el.getparent() is not None:
        el.drop_tree()  # keeps the tail text, which belongs to the parent


def _lines(text: str, sep: str | None = None) -> str:
    """One line per block (split at ``sep``, or at newlines), whitespace collapsed, blank ones dropped."""
    blocks = text.split(sep) if sep else text.splitlines()
    return "\n".join(line for line in (" ".join(raw.split()) for raw in blocks) if line)
