"""The pure parts of the retrieval fixes: the address policy, names, charsets,
the filter's SQL and the store's file modes (no processes)."""

from __future__ import annotations

import codecs
import encodings
import encodings.aliases
import os
import pkgutil
import stat

import pytest

from retrieval.collections.store import DB_FILE, CollectionStore, check_name
from retrieval.errors import FetchRefused
from retrieval.websearch.extract import decode, extract, text_codec
from retrieval.websearch.fetch import AddressPolicy
from shm_protocol.errors import InvalidInput
from tests.helpers import FixedVectorClient


@pytest.mark.parametrize("address, why", [
    ("2002:a00:1::1", "a 6to4 address"),  # 6to4 of 10.0.0.1
    ("2002:808:808::1", "a 6to4 address"),  # even of a public one: the relay is the sender's choice
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "a Teredo address"),
    ("64:ff9b::a00:1", "a private address"),  # NAT64 of 10.0.0.1
    ("64:ff9b::7f00:1", "a loopback address"),
    ("64:ff9b:1::a00:1", "a local-use NAT64 address"),
    ("::a00:1", "an IPv4-compatible address"),
    ("::8.8.8.8", "an IPv4-compatible address"),
    ("::ffff:10.1.2.3", "a private address"),
    ("fec0::1", "a site-local address"),
    ("::1", "a loopback address"),
    ("::", "an unspecified address"),
    ("169.254.169.254", "a link-local address"),
    ("64:ff9b::808:808", None),  # NAT64 of a public address
    ("2606:4700:4700::1111", None),
    ("8.8.8.8", None),
])
def test_the_address_policy_judges_an_address_by_where_it_leads(address, why):
    assert AddressPolicy().refusal(address) == why


def test_the_allow_list_still_allows():
    assert AddressPolicy("2002::/16").refusal("2002:a00:1::1") is None
    assert AddressPolicy("10.0.0.0/8").refusal("::ffff:10.1.2.3") is None


def test_a_refused_name_does_not_quote_what_it_resolves_to():
    with pytest.raises(FetchRefused) as exc:
        AddressPolicy().resolve("localhost", 80)
    assert "127.0.0.1" not in str(exc.value) and "::1" not in str(exc.value)
    assert "localhost resolves to no public address" in str(exc.value)
    with pytest.raises(FetchRefused, match="127.0.0.1 is a loopback address"):  # the client's own literal
        AddressPolicy().resolve("127.0.0.1", 80)


@pytest.mark.parametrize("name", ["kb\n", "kb\r", " kb", "kb ", ".kb", "k/b", "", "k" * 129, "kb\x00", 3])
def test_a_collection_name_must_match_in_full(name):
    with pytest.raises(InvalidInput):
        check_name(name)


@pytest.mark.parametrize("name", ["kb", "KB-2.v_1", "0", "k" * 128])
def test_good_collection_names(name):
    check_name(name)


@pytest.mark.parametrize("label", ["rot13", "idna", "base64", "hex", "zlib", "bz2", "uu", "punycode",
                                   "undefined", "x-no-such-charset", "utf-8\x00"])
def test_an_unusable_charset_decodes_as_utf8(label):
    body = "Grüße, café".encode()
    assert decode(body, label) == "Grüße, café"
    assert extract(body, "text/plain", label) == ("", "Grüße, café")
    assert extract(b"<html><body><p>" + body + b"</p></body></html>", "text/html", label)[1] == "Grüße, café"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # unicode-escape meets a backslash
def test_no_codec_name_makes_extraction_raise():
    labels = (set(encodings.aliases.aliases) | set(encodings.aliases.aliases.values())
              | {m.name for m in pkgutil.iter_modules(encodings.__path__)})
    bodies = [bytes(range(256)), b"<html><body><p>caf\xc3\xa9 \xe9</p></body></html>", b"", b"\xff\xfe<\x00p\x00"]
    for label in labels:
        for body in bodies:
            for ctype in ("text/html", "text/plain"):
                extract(body, ctype, label)  # never raises
    assert text_codec("latin-1") == codecs.lookup("latin-1").name and text_codec("rot13") is None


def test_filters_at_the_cap_work_and_over_it_are_refused(tmp_path):
    store = CollectionStore(tmp_path, FixedVectorClient(), filter_max_values=1000)
    store.create("kb")
    store.upsert("kb", [{"id": str(i), "text": f"doc {i}", "metadata": {"n": i, "b": i % 2 == 0, "s": str(i)}}
                        for i in range(12)])

    # At the cap it works (on both stores: tests/integration/test_collections.py); over it, a refusal.
    assert len(store.search("kb", "q", 50, {"n": list(range(3, 1003))})) == 9
    with pytest.raises(InvalidInput, match="1001 values; at most 1000.*SHM_EMBED_FILTER_MAX_VALUES"):
        store.search("kb", "q", 5, {"n": list(range(1001))})
    for bad in ({"n\n": 1}, {"n": float("nan")}, {"n": []}, {"n": {"$gt": 1}}, {'n"': 1}):
        with pytest.raises(InvalidInput):
            store.search("kb", "q", 5, bad)
    store.close()


def test_store_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        store = CollectionStore(tmp_path / "a" / "data", FixedVectorClient())
        store.create("kb")
        files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a" / "data").iterdir()}
        assert set(files) == {DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm"}
        assert set(files.values()) == {0o600} and stat.S_IMODE((tmp_path / "a" / "data").stat().st_mode) == 0o700
        store.close()
        # files an older version made readable by everyone are narrowed when the store opens them
        loose = tmp_path / "a" / "data" / DB_FILE
        loose.chmod(0o644)
        store = CollectionStore(tmp_path / "a" / "data", FixedVectorClient())
        assert stat.S_IMODE(loose.stat().st_mode) == 0o600
        store.close()
    finally:
        os.umask(old)
