"""The real samples in examples/data: each listed in its README with size and sha256 (unchanged from its source),
each folder with its licence or terms, and the whole kept small."""

import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
TERMS = ("LICENSE", "NOTICE")
MAX_TOTAL_BYTES = 5_000_000  # a clone carries these: new samples must be small


def listed() -> dict[str, tuple[int, str]]:
    rows = re.findall(r"^\| `([^`]+)` \| ([\d,]+) \| `([0-9a-f]{64})` \|$", (DATA / "README.md").read_text(), re.M)
    return {name: (int(size.replace(",", "")), digest) for name, size, digest in rows}


def test_every_sample_is_listed_with_its_size_and_checksum():
    table = listed()
    files = {str(p.relative_to(DATA)) for p in DATA.rglob("*") if p.is_file() and p.name not in TERMS + ("README.md",)}
    assert files and set(table) == files, f"listed, absent: {set(table) - files}; unlisted: {files - set(table)}"
    for name, (size, digest) in table.items():
        data = (DATA / name).read_bytes()
        assert len(data) == size, f"{name}: {len(data)} bytes, README says {size}"
        assert hashlib.sha256(data).hexdigest() == digest, f"{name} differs from the file its README lists"


def test_every_folder_carries_its_terms_and_the_total_stays_small():
    folders = {p.parent for p in DATA.rglob("*") if p.is_file() and p.parent != DATA}
    assert folders
    for folder in folders:
        assert any((folder / name).is_file() for name in TERMS), f"{folder} has no LICENSE or NOTICE"
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < MAX_TOTAL_BYTES, f"examples/data holds {total} bytes"
