"""Bad input, fuzzed (bounded and seeded): every case ends in one line naming the file (and
the line), as a :class:`DeltaError` or :class:`DataError`; never another exception, never a
hang (each test has a timeout).

* delta files: random bytes, truncations, oversized and corrupted headers, metadata of the
  wrong shape, tensors of the wrong dtype;
* JSONL / JSON: invalid UTF-8, huge lines, deep nesting, NaN / Infinity, duplicate keys,
  truncation, random bytes;
* CSV: ragged rows, duplicate columns, invalid UTF-8, NUL bytes, oversized fields, random bytes.
"""

from __future__ import annotations

import json
import random
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from roma_vllm.deltas import DeltaError, read_deltas
from roma_vllm.testing.helpers import write_handmade_deltas
from tuner.data.sources import DataError, load_examples

SEED = 20260613
ROWS = [
    {"question": f"which word is a fruit, number {i}", "choices": ["pear", "cat"], "answer": 0}
    for i in range(6)
]


def _one_line(err: Exception, path: Path, line: int | None = None) -> str:
    """``err`` is one line that starts with ``path`` (and ``:line`` when given)."""
    msg = str(err)
    assert "\n" not in msg, msg
    if line is None:
        assert re.match(re.escape(str(path)) + r"(:\d+)?: \S", msg), msg
    else:
        assert msg.startswith(f"{path}:{line}: "), msg
    return msg


# ---------------------------------------------------------------- delta files


@pytest.fixture(scope="module")
def good_deltas(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("deltas") / "good.safetensors"
    return write_handmade_deltas(tiny_model("OlmoeForCausalLM"), path).read_bytes()


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _read_delta_file(path: Path, data: bytes) -> Exception | None:
    """None if ``data`` reads as deltas, else the DeltaError (any other exception escapes)."""
    path.write_bytes(data)
    try:
        read_deltas(path)
    except DeltaError as e:
        _one_line(e, path)
        return e
    return None


@pytest.mark.timeout(120)
def test_delta_files_random_truncated_and_oversized(good_deltas: bytes, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    header_len = struct.unpack("<Q", good_deltas[:8])[0]
    cases: dict[str, bytes] = {}
    for i in range(40):
        cases[f"random{i}"] = rng.randbytes(rng.randrange(0, 600))
    for i in range(20):  # a plausible header length, then noise
        n = rng.randrange(8, 400)
        cases[f"noise{i}"] = struct.pack("<Q", n) + rng.randbytes(rng.randrange(0, n + 64))
    cuts = {*range(0, 20), header_len + 7, header_len + 8, header_len + 9, len(good_deltas) - 1}
    cuts |= {rng.randrange(0, len(good_deltas)) for _ in range(40)}
    for cut in sorted(cuts):
        cases[f"truncated{cut}"] = good_deltas[:cut]
    for size in (2**64 - 1, 2**63, 10**12, 100 * 2**20 + 8, len(good_deltas), header_len + 1):
        cases[f"header{size}"] = struct.pack("<Q", size) + good_deltas[8:]
    for name, data in cases.items():
        err = _read_delta_file(tmp_path / f"{name}.safetensors", data)
        assert err is not None, f"{name}: read as deltas"


@pytest.mark.timeout(120)
def test_delta_files_with_corrupted_headers(good_deltas: bytes, tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    header_len = struct.unpack("<Q", good_deltas[:8])[0]
    errors = 0
    for i in range(150):
        data = bytearray(good_deltas)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(8, 8 + header_len)] = rng.randrange(256)
        errors += _read_delta_file(tmp_path / f"flip{i}.safetensors", bytes(data)) is not None
    assert errors > 100  # most corruptions are refused; the rest still read as deltas


@pytest.mark.timeout(120)
def test_delta_metadata_and_dtypes_of_the_wrong_shape(good_deltas: bytes, tmp_path: Path) -> None:
    header, body = _split(good_deltas)
    meta = json.loads(header["__metadata__"]["roma"])
    names = [n for n in header if n != "__metadata__"]
    bad_meta = {
        "not_json": ("{'format_version': 1", "is not valid JSON"),
        "deep": ("[" * 100_000, "is not valid JSON"),
        "list": ("[1, 2]", "is not a JSON object"),
        "string": ('"deltas"', "is not a JSON object"),
        "null": ("null", "is not a JSON object"),
        "nan": ("NaN", "is not a JSON object"),
        "version": (json.dumps({**meta, "format_version": "1"}), "unknown format_version '1'"),
        "arch": (json.dumps({**meta, "architecture": 5}), "'architecture' is not a string"),
        "base": (json.dumps({**meta, "base_model": None}), "'base_model' is not a string"),
        "fps_list": (json.dumps({**meta, "base_fingerprints": [1]}), "'base_fingerprints'"),
        "fps_str": (json.dumps({**meta, "base_fingerprints": "ab"}), "'base_fingerprints'"),
        "fps_int": (
            json.dumps({**meta, "base_fingerprints": dict.fromkeys(names, 5)}),
            "'base_fingerprints'",
        ),
        "training": (json.dumps({**meta, "training": [1]}), "'training' is not an object"),
        "missing": (json.dumps({"format_version": 1}), "metadata field 'architecture' is missing"),
    }
    for name, (value, expected) in bad_meta.items():
        h = json.loads(json.dumps(header))
        h["__metadata__"]["roma"] = value
        path = tmp_path / f"meta_{name}.safetensors"
        err = _read_delta_file(path, _join(h, body))
        assert err is not None and expected in str(err), (name, err)
    # a huge but well-formed header (5 MB of metadata) is read, not refused
    h = json.loads(json.dumps(header))
    h["__metadata__"]["padding"] = "x" * (5 * 2**20)
    assert _read_delta_file(tmp_path / "huge_header.safetensors", _join(h, body)) is None

    sizes = {"F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "BOOL": 1, "U8": 1, "F8_E4M3": 1}
    rng = random.Random(SEED + 2)
    for dtype, size in sizes.items():
        h = json.loads(json.dumps(header))
        offset = 0
        for n in names:
            count = 1
            for d in h[n]["shape"]:
                count *= d
            h[n]["dtype"] = dtype
            h[n]["data_offsets"] = [offset, offset + count * size]
            offset += count * size
        payload = bytes(offset) if dtype.startswith(("F", "BF")) else rng.randbytes(offset)
        err = _read_delta_file(tmp_path / f"dtype_{dtype}.safetensors", _join(h, payload))
        if dtype in ("F16", "BF16", "F64"):  # zero floats of another width: usable deltas
            assert err is None, (dtype, err)
        else:
            assert err is not None and "expected float32" in str(err), (dtype, err)


# ---------------------------------------------------------------- JSONL / JSON


def _load(path: Path, **kwargs: Any) -> DataError | None:
    """None when the file loads, else the DataError (any other exception escapes)."""
    try:
        load_examples(str(path), **kwargs)
    except DataError as e:
        return e
    return None


def _jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _row(**changes: Any) -> bytes:
    return json.dumps({**ROWS[0], **changes}).encode()


@pytest.mark.timeout(60)
def test_jsonl_invalid_utf8_names_the_line_and_can_be_skipped(tmp_path: Path) -> None:
    lines = [json.dumps(r).encode() for r in ROWS]
    lines[3] = lines[3].replace(b"fruit", b"fr\xff\xfeit")
    path = _jsonl(tmp_path / "utf8.jsonl", lines)
    err = _load(path)
    byte = lines[3].index(b"\xff") + 1  # 1-based, as editors count
    assert _one_line(err, path, 4) == f"{path}:4: not valid UTF-8 (byte {byte} of the line)"
    data = load_examples(str(path), skip_bad_rows=True)
    assert (len(data), data.skipped) == (5, 1)
    # a UTF-8 byte-order mark at the start is not an error
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines[:3]))
    assert len(load_examples(str(tmp_path / "bom.jsonl"))) == 3


@pytest.mark.timeout(60)
def test_jsonl_nan_and_duplicate_keys_are_refused(tmp_path: Path) -> None:
    cases = {
        "nan_answer": (
            b'{"question": "q", "choices": ["a", "b"], "answer": NaN}',
            "field 'answer': NaN is not a JSON number; write a number",
        ),
        "inf_choice": (
            b'{"question": "q", "choices": ["a", -Infinity], "answer": 0}',
            "field 'choices': -Infinity is not a JSON number; write a number",
        ),
        "nan_extra": (_row(score=1.0).replace(b"1.0", b"NaN"), "field 'score': NaN"),
        "nan_row": (b"NaN", "NaN is not a JSON number"),
        "dup_question": (
            b'{"question": "a", "question": "b", "choices": ["x", "y"], "answer": 0}',
            "field 'question': appears twice in one object (which one is meant?)",
        ),
        "dup_answer": (_row()[:-1] + b', "answer": 1}', "field 'answer': appears twice"),
        "dup_nested": (
            b'{"question": "q", "choices": {"text": ["a", "b"], "text": ["c", "d"]}, "answer": 0}',
            "field 'text': appears twice",
        ),
    }
    for name, (line, expected) in cases.items():
        path = _jsonl(tmp_path / f"{name}.jsonl", [_row(), line])
        err = _load(path)
        assert err is not None, name
        assert _one_line(err, path, 2).startswith(f"{path}:2: {expected}"), err


@pytest.mark.timeout(120)
def test_jsonl_huge_and_deep_lines(tmp_path: Path) -> None:
    big_question = "word " * 2_000_000  # a 10 MB line that is a valid row
    path = _jsonl(tmp_path / "big.jsonl", [_row(question=big_question), _row()])
    assert len(load_examples(str(path))) == 2
    cases = {
        "garbage": (b"{" + b"x" * 10_000_000, "not valid JSON ("),
        "deep": (b"[" * 200_000 + b"]" * 200_000, "not valid JSON (nested too deeply)"),
        "deep_objects": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "not valid JSON ("),
        "huge_int": (_row(answer=0).replace(b'"answer": 0', b'"answer": ' + b"9" * 5000), "JSON"),
    }
    for name, (line, expected) in cases.items():
        path = _jsonl(tmp_path / f"{name}.jsonl", [_row(), line])
        err = _load(path)
        assert err is not None and expected in _one_line(err, path, 2), (name, err)


@pytest.mark.timeout(120)
def test_jsonl_json_and_csv_random_bytes_and_truncations(tmp_path: Path) -> None:
    rng = random.Random(SEED + 3)
    alphabet = b'{}[]",:0123456789 \n\tabcNaNtrue\\\xff\xc3'
    jsonl = b"".join(json.dumps(r).encode() + b"\n" for r in ROWS)
    as_json = json.dumps(ROWS, indent=1).encode()
    csv_text = b"question,A,B,answer\n" + b"".join(
        f'"{r["question"]}",pear,cat,0\n'.encode() for r in ROWS
    )
    cases: list[tuple[str, bytes]] = []
    for i in range(30):
        n = rng.randrange(0, 400)
        noise = rng.randbytes(n) if i % 2 else bytes(rng.choice(alphabet) for _ in range(n))
        cases += [(f"r{i}.jsonl", noise), (f"r{i}.json", noise), (f"r{i}.csv", noise)]
    for i in range(25):
        cases.append((f"t{i}.jsonl", jsonl[: rng.randrange(0, len(jsonl))]))
        cases.append((f"t{i}.json", as_json[: rng.randrange(0, len(as_json))]))
        cases.append((f"t{i}.csv", csv_text[: rng.randrange(0, len(csv_text))]))
    for i in range(25):  # one random byte changed
        for suffix, text in (("jsonl", jsonl), ("json", as_json), ("csv", csv_text)):
            data = bytearray(text)
            data[rng.randrange(len(data))] = rng.randrange(256)
            cases.append((f"f{i}.{suffix}", bytes(data)))
    refused = 0
    for name, data in cases:
        path = tmp_path / name
        path.write_bytes(data)
        err = _load(path)
        if err is not None:
            msg = _one_line(err, path)
            refused += 1
            if name.endswith(".jsonl") and "no usable rows" not in msg:
                assert re.match(re.escape(str(path)) + r":\d+: ", msg), msg
    assert refused > len(cases) // 2


@pytest.mark.timeout(60)
def test_json_file_errors_name_the_line_or_row(tmp_path: Path) -> None:
    text = json.dumps(ROWS, indent=1).encode()
    cases = {
        "utf8": (text.replace(b"number 2", b"number \xff"), r":\d+: not valid UTF-8 \(byte \d+"),
        "truncated": (text[: len(text) // 2], r":\d+: not valid JSON \("),
        "dup_row3": (
            json.dumps(ROWS[:2]).encode()[:-1]
            + b', {"question": "q", "choices": ["a", "b"], "answer": 0, "answer": 1}]',
            r":3: field 'answer': appears twice",
        ),
        "nan_row2": (
            json.dumps(ROWS[:1]).encode()[:-1]
            + b', {"question": "q", "choices": ["a", "b"], "answer": NaN}]',
            r":2: field 'answer': NaN is not a JSON number",
        ),
        "dup_wrapper": (
            b'{"data": ' + json.dumps(ROWS).encode() + b', "data": []}',
            r": field 'data': appears twice",
        ),
        "deep": (b"[" * 100_000, r": not valid JSON \(nested too deeply\)"),
    }
    for name, (data, pattern) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(data)
        err = _load(path)
        assert err is not None, name
        assert re.match(re.escape(str(path)) + pattern, _one_line(err, path)), (name, err)
    utf8 = tmp_path / "utf8.json"
    want = utf8.read_bytes()[: utf8.read_bytes().index(b"\xff")].count(b"\n") + 1
    assert str(_load(utf8)).startswith(f"{utf8}:{want}: not valid UTF-8")


# ---------------------------------------------------------------- CSV


@pytest.mark.timeout(60)
def test_csv_ragged_rows_and_duplicate_columns(tmp_path: Path) -> None:
    lines = ["question,A,B,C,answer"] + [f'"q {i}",pear,cat,dog,0' for i in range(5)]
    lines[2] = '"q short",pear,cat,0'  # 4 cells
    lines[4] = '"q long",pear,cat,dog,0,extra'  # 6 cells
    path = tmp_path / "ragged.csv"
    path.write_text("\n".join(lines) + "\n")
    err = _load(path)
    assert _one_line(err, path, 3) == f"{path}:3: 4 cells, but the header has 5 columns"
    data = load_examples(str(path), skip_bad_rows=True)
    assert (len(data), data.skipped) == (3, 2)
    long_only = tmp_path / "long.csv"
    long_only.write_text("\n".join([lines[0], lines[1], lines[4]]) + "\n")
    assert str(_load(long_only)) == f"{long_only}:3: 6 cells, but the header has 5 columns"
    # a quoted field spanning lines: the row is named by the line it starts on
    multi = tmp_path / "multi.csv"
    multi.write_text(lines[0] + '\n"line one\nline two",a,b,c,0\n"q",a,b\n')
    assert str(_load(multi)) == f"{multi}:4: 3 cells, but the header has 5 columns"

    dup = tmp_path / "dup.csv"
    dup.write_text("question,A,B,A,answer\nq,a,b,c,0\n")
    assert _one_line(_load(dup), dup, 1) == f"{dup}:1: column 'A' appears twice in the header"


@pytest.mark.timeout(60)
def test_csv_bad_bytes_and_oversized_fields(tmp_path: Path) -> None:
    header = b"question,A,B,answer\n"
    good = b'"q one",pear,cat,0\n'
    cases = {
        "utf8": (header + good + b'"q \xff two",pear,cat,0\n', 3, "not valid UTF-8"),
        "huge_field": (header + good + b'"' + b"w" * 200_000 + b'",a,b,0\n', 3, "not valid CSV"),
    }
    for name, (data, line, expected) in cases.items():
        path = tmp_path / f"{name}.csv"
        path.write_bytes(data)
        err = _load(path)
        assert err is not None and expected in _one_line(err, path, line), (name, err)
    # a NUL byte is refused on every Python (csv itself refuses it only before 3.11), named
    # by its own line, also inside a quoted field that spans lines
    nul = tmp_path / "nul.csv"
    nul.write_bytes(header + good + b'"q\ntwo \x00",pear,cat,0\n')
    err = _load(nul)
    assert err is not None
    assert _one_line(err, nul, 4) == f"{nul}:4: not valid CSV (a NUL byte)"
