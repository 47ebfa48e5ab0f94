"""streamd.keys: key pairs written with the secret 0600 whatever the umask, and every bad key file refused by name."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import zmq
from zmq.auth import load_certificate, load_certificates

from streamd.keys import KeyFileError, generate, read_authorized_keys, read_key_pair, read_public_key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_000():
    """The most open umask: a file created 0644 or 0666 stays so; only an explicit creation mode keeps it private."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_generate_writes_a_private_secret_and_a_public_key_whatever_the_umask(tmp_path: Path, umask_000):
    public_file, secret_file = generate("room-1", tmp_path / "keys")
    assert (public_file, secret_file) == (tmp_path / "keys" / "room-1.key", tmp_path / "keys" / "room-1.key_secret")
    assert mode(secret_file) == 0o600
    assert mode(public_file) == 0o644
    assert mode(tmp_path / "keys") == 0o700  # a folder it creates is private too
    pair = read_key_pair(secret_file)
    assert read_public_key(public_file) == pair.public and zmq.curve_public(pair.secret) == pair.public
    # pyzmq's own readers take the same files (czmq's certificate format)
    assert load_certificate(secret_file) == (pair.public, pair.secret)
    assert load_certificates(tmp_path / "keys") == {pair.public: True}


def test_every_pair_is_new(tmp_path: Path):
    generate("a", tmp_path)
    generate("b", tmp_path)
    assert read_public_key(tmp_path / "a.key") != read_public_key(tmp_path / "b.key")


@pytest.mark.parametrize("existing", ["room-1.key", "room-1.key_secret"])
def test_generate_never_overwrites(tmp_path: Path, existing: str):
    (tmp_path / existing).write_text("keep me")
    with pytest.raises(KeyFileError, match="exists: remove it first"):
        generate("room-1", tmp_path)
    assert (tmp_path / existing).read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]  # nothing half-written


@pytest.mark.parametrize("name", ["", "../up", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_generate_refuses_names_that_are_not_one_plain_file_name(tmp_path: Path, name: str):
    with pytest.raises(KeyFileError, match="key name"):
        generate(name, tmp_path / "keys")
    assert not (tmp_path / "keys").exists()


def test_generate_into_a_read_only_folder_is_a_clear_error(read_only: Path):
    with pytest.raises(KeyFileError, match=f"cannot write {re.escape(str(read_only))}"):
        generate("room-1", read_only)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return generate("server", tmp_path / "keys")


def _rewrite(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


@pytest.mark.parametrize("file_mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660])
def test_a_secret_key_open_to_other_users_is_refused(pair, file_mode: int):
    _, secret_file = pair
    secret_file.chmod(file_mode)
    with pytest.raises(KeyFileError, match=re.escape(f"open to other users (mode {file_mode:04o}): run chmod 600 {secret_file}")):
        read_key_pair(secret_file)


def test_a_read_only_secret_key_is_accepted(pair):
    pair[1].chmod(0o400)
    assert read_key_pair(pair[1]).public == read_public_key(pair[0])


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("missing", "cannot read the key file .*: No such file or directory"),
        ("folder", "is not a key file \\(not a regular file\\)"),
        ("empty", "is not a key file: no 'public-key"),
        ("huge", "is not a key file \\(70000 bytes"),
        ("public", "has no secret key: this is a public key file"),
        ("short-secret", "the secret key is not a 40-character Z85 CURVE key"),
        ("bad-z85", "the public key is not a 40-character Z85 CURVE key"),
        ("other-public", "the public key is not the one of its secret key"),
    ],
)
def test_bad_secret_key_files_are_refused_by_name(pair, tmp_path: Path, damage: str, expected: str):
    public_file, secret_file = pair
    match damage:
        case "missing":
            secret_file.unlink()
        case "folder":
            secret_file.unlink()
            secret_file.mkdir(mode=0o700)
        case "empty":
            secret_file.write_text("")
        case "huge":
            secret_file.write_bytes(b"#" * 70_000)
        case "public":
            secret_file.write_text(public_file.read_text())
        case "short-secret":
            _rewrite(secret_file, 'secret-key = "', 'secret-key = "x')
        case "bad-z85":
            public = read_public_key(public_file).decode()
            _rewrite(secret_file, public, "~" * 40)
        case "other-public":
            public = read_public_key(public_file).decode()
            _rewrite(secret_file, public, zmq.curve_keypair()[0].decode())
    with pytest.raises(KeyFileError, match=expected) as caught:
        read_key_pair(secret_file)
    assert str(secret_file) in str(caught.value)


def test_a_secret_key_given_as_a_public_key_is_refused(pair):
    with pytest.raises(KeyFileError, match="holds a secret key: give the other side the public file server.key"):
        read_public_key(pair[1])


@pytest.fixture
def allow_list(tmp_path: Path) -> Path:
    folder = tmp_path / "clients"
    generate("viewer-1", tmp_path / "made")
    generate("viewer-2", tmp_path / "made")
    folder.mkdir(mode=0o755)
    for name in ("viewer-1.key", "viewer-2.key"):
        (folder / name).write_bytes((tmp_path / "made" / name).read_bytes())
    (folder / "README").write_text("the subscribers let in\n")
    return folder


def test_the_allow_list_is_every_public_key_in_the_folder(allow_list: Path, tmp_path: Path):
    expected = {read_public_key(tmp_path / "made" / f"viewer-{i}.key") for i in (1, 2)}
    assert read_authorized_keys(allow_list) == expected  # README ignored


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("missing", "cannot read the folder .*: No such file or directory"),
        ("a-file", "is not a folder"),
        ("empty", "holds no client key \\(NAME.key\\): no subscriber could connect"),
        ("world-writable", "may be written by other users \\(mode 0757\\)"),
        ("group-writable", "may be written by other users \\(mode 0775\\)"),
        ("a-secret-key", "holds a secret key \\(viewer-3.key_secret\\): only the subscribers' public"),
        ("garbage-key", "bad.key is not a key file"),
    ],
)
def test_a_bad_allow_list_is_refused_by_name(allow_list: Path, tmp_path: Path, damage: str, expected: str):
    match damage:
        case "missing":
            allow_list = tmp_path / "nowhere"
        case "a-file":
            allow_list = allow_list / "README"
        case "empty":
            for key in allow_list.glob("*.key"):
                key.unlink()
        case "world-writable":
            allow_list.chmod(0o757)
        case "group-writable":
            allow_list.chmod(0o775)
        case "a-secret-key":
            generate("viewer-3", allow_list)
        case "garbage-key":
            (allow_list / "bad.key").write_text("not a key\n")
    with pytest.raises(KeyFileError, match=expected) as caught:
        read_authorized_keys(allow_list)
    assert str(allow_list) in str(caught.value)
