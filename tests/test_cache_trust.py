"""Trust never fails open, and no file the CLI reads can block it (issue 20, items 1 and 4).

- a trust setting that is present but names no key (``SD3PLUGIN_TRUSTED_KEY`` blank or only separators,
  ``--trust ""``) is a usage error (exit 2, one line), never an unsigned install;
- ``--trust`` adds to the keys of ``SD3PLUGIN_TRUSTED_KEY``, never replaces them, and ``--help`` says so;
- every file the CLI reads (archive, signature, public and private keys, a config file, a JSON file a config
  names) is opened without blocking and refused, in one line, unless it is a regular file.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from sd3plugin.cache import signing
from sd3plugin.cli.exit_codes import EXIT
from sd3plugin.errors import ConfigError

from .test_cache_archive import cli, make_cache


@pytest.fixture
def keys(tmp_path):
    return {name: signing.keygen(tmp_path / "keys" / name)[:2] for name in ("ci", "other")}


@pytest.fixture
def archives(tmp_path, keys, capsys, monkeypatch):
    """An unsigned archive, one signed by ``ci`` and one signed by ``other``."""
    monkeypatch.delenv(signing.ENV_TRUSTED, raising=False)
    src = make_cache(tmp_path / "src")
    out = {}
    for name, key in (("unsigned", None), ("ci", keys["ci"][0]), ("other", keys["other"][0])):
        path = tmp_path / f"{name}.tar.zst"
        sign = ("--sign", str(key)) if key else ()
        assert cli("pack", "--cache-dir", str(src), "-o", str(path), *sign, capsys=capsys)[0] == 0
        out[name] = path
    return out


def _install(tmp_path, archive, capsys, *extra):
    target = tmp_path / "target"
    code, data, text = cli("install", str(archive), "--cache-dir", str(target), "--json", *extra, capsys=capsys)
    err = text.strip().splitlines()[-1] if text.strip() else ""
    return code, data, err, target


@pytest.mark.parametrize("value", ["", " ", ":", "::", " : ", "\t"])
def test_a_trusted_key_setting_that_names_no_key_is_an_error(tmp_path, archives, capsys, monkeypatch, value):
    monkeypatch.setenv(signing.ENV_TRUSTED, value)
    code, data, err, target = _install(tmp_path, archives["unsigned"], capsys)
    assert code == EXIT["usage"], err
    assert signing.ENV_TRUSTED in data["error"] and "names no key file" in data["error"]
    assert not target.exists()
    code, data, _ = cli("info", str(archives["unsigned"]), "--json", capsys=capsys)  # info fails closed too
    assert code == EXIT["usage"] and "names no key file" in data["error"]


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_trust_flag_is_an_error(tmp_path, archives, capsys, value):
    code, data, err, target = _install(tmp_path, archives["unsigned"], capsys, "--trust", value)
    assert code == EXIT["usage"] and "--trust" in data["error"] and "names no key file" in data["error"], err
    assert not target.exists()


def test_a_blank_name_among_key_files_is_an_error(tmp_path, archives, keys, capsys, monkeypatch):
    monkeypatch.setenv(signing.ENV_TRUSTED, f"{keys['ci'][1]}{os.pathsep} ")
    code, data, err, target = _install(tmp_path, archives["ci"], capsys)
    assert code == EXIT["usage"] and "blank" in data["error"], err
    assert not target.exists()


def test_trust_adds_to_the_environment_keys(tmp_path, archives, keys, capsys, monkeypatch):
    monkeypatch.setenv(signing.ENV_TRUSTED, str(keys["ci"][1]))
    ids = {name: signing.key_id(signing.load_public_key(keys[name][1])) for name in keys}
    for name in ("ci", "other"):  # the environment's key still counts beside --trust's
        code, data, err, target = _install(tmp_path / name, archives[name], capsys, "--trust", str(keys["other"][1]))
        assert code == 0 and data["signed_by"] == ids[name], err
    code, data, err, target = _install(tmp_path / "u", archives["unsigned"], capsys, "--trust", str(keys["other"][1]))
    assert code == EXIT["untrusted"] and "not signed" in data["error"] and not target.exists()
    monkeypatch.delenv(signing.ENV_TRUSTED)
    code, data, err, _ = _install(tmp_path / "o", archives["ci"], capsys, "--trust", str(keys["other"][1]))
    assert code == EXIT["untrusted"] and "does not verify" in data["error"]


def test_help_says_trust_adds_to_the_environment(capsys):
    for command in ("install", "info"):
        with pytest.raises(SystemExit):
            cli(command, "--help")
        text = " ".join(capsys.readouterr().out.split())
        assert "adds to $SD3PLUGIN_TRUSTED_KEY" in text, text


# -- files that are not regular files --------------------------------------------------------------------------
@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)  # opening it for reading would wait for a writer: never here
    return path


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_a_fifo_as_signature_is_refused_in_one_line(tmp_path, archives, keys, fifo, capsys):
    sig = Path(str(archives["ci"]) + signing.SUFFIX)
    sig.unlink()
    os.mkfifo(sig)
    target = tmp_path / "t"
    for extra in ((), ("--signature", str(fifo))):
        code, _, text = cli("install", str(archives["ci"]), "--cache-dir", str(target), "--trust",
                            str(keys["ci"][1]), *extra, capsys=capsys)
        assert code == EXIT["untrusted"] and "is a FIFO, not a regular file" in _one_line(text)
        assert not target.exists()


@pytest.mark.parametrize("special", ["fifo", "folder", "/dev/null"])
def test_a_key_that_is_not_a_regular_file_is_refused_in_one_line(tmp_path, archives, fifo, capsys, special):
    key = {"fifo": str(fifo), "folder": str(tmp_path), "/dev/null": "/dev/null"}[special]
    what = {"fifo": "a FIFO", "folder": "a folder", "/dev/null": "a device"}[special]
    src = make_cache(tmp_path / "src2")
    for argv in (("install", str(archives["unsigned"]), "--cache-dir", str(tmp_path / "t"), "--trust", key),
                 ("info", str(archives["unsigned"]), "--trust", key),
                 ("pack", "--cache-dir", str(src), "-o", str(tmp_path / "b.tar.zst"), "--sign", key)):
        code, _, text = cli(*argv, capsys=capsys)
        assert code == EXIT["usage"] and f"is {what}, not a regular file" in _one_line(text), argv
    assert not (tmp_path / "t").exists() and not (tmp_path / "b.tar.zst").exists()


def test_the_environment_key_that_is_a_fifo_is_refused(tmp_path, archives, fifo, capsys, monkeypatch):
    monkeypatch.setenv(signing.ENV_TRUSTED, str(fifo))
    code, _, text = cli("install", str(archives["unsigned"]), "--cache-dir", str(tmp_path / "t"), capsys=capsys)
    assert code == EXIT["usage"] and "is a FIFO, not a regular file" in _one_line(text)


def test_archive_that_is_a_device_or_fifo_is_refused(tmp_path, fifo, capsys):
    for path, what in ((fifo, "a FIFO"), (Path("/dev/null"), "a device"), (tmp_path, "a folder")):
        code, _, text = cli("install", str(path), "--cache-dir", str(tmp_path / "c"), capsys=capsys)
        assert code == EXIT["not_found"] and f"is {what}" in _one_line(text), text


def test_config_files_that_are_not_regular_files_are_refused(fifo):
    from sd3plugin.config import compose
    from sd3plugin.config.quant_presets import read_submodules_json

    for path in (fifo, "/dev/zero"):
        with pytest.raises(ConfigError, match="not a regular file"):
            compose(str(path))
        with pytest.raises(ConfigError, match="not a regular file"):
            read_submodules_json(path)
