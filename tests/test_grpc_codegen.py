"""The gRPC code is built from proxy/tokenpool.proto, not committed, and safe to build from
several processes at once."""

from __future__ import annotations

import subprocess
import sys

from tokenpool.proxy import grpc_codegen

HANG_S = 300


def test_generated_code_is_gitignored():
    generated = grpc_codegen.generated_dir() / "tokenpool_pb2.py"
    assert generated.is_file()
    assert subprocess.run(["git", "check-ignore", "-q", str(generated)],
                          cwd=grpc_codegen.PROTO.parent).returncode == 0


def test_processes_generating_at_once_agree(tmp_path):
    code = ("import sys; from pathlib import Path; from tokenpool.proxy import grpc_codegen"
            " as g; print(g.generated_dir([Path(sys.argv[1])]))")
    racers = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                               stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = {p.communicate(timeout=HANG_S)[0].strip() for p in racers}
    key = grpc_codegen.generation_key()
    assert [p.returncode for p in racers] == [0] * 4
    assert outputs == {str(tmp_path / key)}
    assert [p.name for p in tmp_path.iterdir()] == [key], "a staging directory was left"
    assert {p.name for p in (tmp_path / key).iterdir()} == {"tokenpool_pb2.py",
                                                           "tokenpool_pb2_grpc.py"}


def test_key_follows_the_proto(tmp_path, monkeypatch):
    edited = tmp_path / "tokenpool.proto"
    edited.write_text(grpc_codegen.PROTO.read_text() + "\n// an edit\n")
    before = grpc_codegen.generation_key()
    monkeypatch.setattr(grpc_codegen, "PROTO", edited)
    assert grpc_codegen.generation_key() != before
