"""A plain line-by-line FASTA reader and tricky FASTA texts: what the read task's chunked, vectorised parser
(runner.input.sources._fasta_columns) must match record for record (tests/test_sources.py, test_read_blocks.py)."""

from __future__ import annotations


def reference_fasta(data: bytes) -> list[tuple[str, str]]:
    """(id, sequence) of each record: a line starting with '>' is a header (id: up to the first whitespace),
    other lines are sequence with CR removed; text before the first header may only be blank (BOM allowed)."""
    text = data.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n\v\f")
    records: list[tuple[bytes, list[bytes]]] = []
    for line in text.split(b"\n"):
        if line.startswith(b">"):
            fields = line[1:].split(None, 1)
            records.append((fields[0] if fields else b"", []))
        else:
            assert records or not line, "text before the first header"
            if records:
                records[-1][1].append(line.replace(b"\r", b""))
    return [(rid.decode("utf-8", errors="replace"), b"".join(seq).decode("utf-8", errors="replace"))
            for rid, seq in records]


TRICKY_FASTA = [
    b">a desc\r\nMK\r\nTL\r\n\r\n>b\r\nAAA",  # CRLF, blank line, no final newline
    b"\n\n  \n>x\n\n\nMK\n\n>y\nA\n\n",  # blank lines everywhere
    b">\nMK\n>\n>\nAC\n>  \t lead  spaces\nGG\n>only\n",  # '>' only headers, blank headers, no sequence
    b">p\r\n>q\r\nMK\r\r\nA\rB\n",  # CR inside lines, header right after header
    b">x a>b\nMK>T\n>y\n>z\n>x\nMK\n",  # ">" inside a header and inside a sequence line; "x" again
    b">\xc3\xa9t\xc3\xa9 \xff\nM\xc3\xa9K\xffL\n>ok\nAC\n",  # UTF-8 ids, bytes that are not UTF-8
    b">long\n" + b"ACDEFGHIKL" * 5000 + b"\n>w\n" + b"MK" * 3000 + b"\n" + b"QQ\n" * 700,  # long lines, many lines
    b">v\x0bx\x0cy\nA C\tD\x0bE\n",  # other whitespace: ends the id, stays in the sequence (for clean)
    b">last\nMKT",  # no final newline
    b">",  # a lone '>'
    b">" + b"L" * 300 + b" long id\nMK\n>" + b"L" * 300 + b"\nMK\n",  # ids past the tabulated hash's 128 bytes
]
