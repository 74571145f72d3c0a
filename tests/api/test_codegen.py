"""The committed stubs in server/api/pb match what the .proto files generate."""

from __future__ import annotations

import subprocess
import sys

from server.api import codegen


def test_committed_stubs_are_fresh(tmp_path):
    fresh = codegen.generate(tmp_path)
    names = {path.relative_to(tmp_path) for path in fresh}
    committed = {
        path.relative_to(codegen.PB_DIR)
        for path in codegen.PB_DIR.rglob("*")
        if path.is_file() and path.suffix in (".py", ".pyi")
    }
    assert committed == names, "stub files differ; run: python -m server.api.codegen"
    stale = [
        str(name)
        for name in sorted(names)
        if (tmp_path / name).read_text() != (codegen.PB_DIR / name).read_text()
    ]
    assert not stale, f"stale stubs {stale}; run: python -m server.api.codegen"


def test_stubs_import_as_package_modules():
    code = (
        "import sys; from server.api.pb.loraloom.v1 import service_pb2, service_pb2_grpc; "
        "assert 'loraloom' not in sys.modules; "
        "print(service_pb2.DESCRIPTOR.services_by_name['Loraloom'].full_name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=codegen.REPO_ROOT
    )
    assert out.stdout.strip() == "loraloom.v1.Loraloom"


def test_every_proto_field_is_documented():
    """Each message field and rpc in the public contract carries a comment above it (or a oneof member)."""
    undocumented = []
    for path in codegen.proto_files():
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            is_field = (
                stripped.endswith(";") and "=" in stripped and not stripped.startswith(("option", "//"))
            )
            is_rpc = stripped.startswith("rpc ")
            if not (is_field or is_rpc) or "_UNSPECIFIED" in stripped:
                continue
            previous = lines[number - 1].strip()
            if previous.startswith("//") or (is_field and _documented_group(lines, number)):
                continue
            undocumented.append(f"{path.name}:{number + 1}: {stripped}")
    assert not undocumented, "\n".join(undocumented)


def _documented_group(lines: list[str], number: int) -> bool:
    """A field in a run of fields directly under a comment (e.g. ``width`` then ``height``)."""
    index = number - 1
    while index >= 0 and lines[index].strip().endswith(";"):
        index -= 1
    return index >= 0 and lines[index].strip().startswith("//")
