"""model= that names nothing loadable: one line on stderr, exit code 2, the problem and the fix named."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sd3plugin.errors import ConfigError, ModelError
from sd3plugin.model_source import check_model_source, is_load_error, load_error


def run_app(args, cwd, env=None, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "sd3plugin", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("model, words", [
    ("/no/such/folder", ["model='/no/such/folder' is neither a folder with model_index.json nor a Hub id",
                         "no such folder", "sd3-medium"]),
    pytest.param("someorg/somemodel", ["model='someorg/somemodel' is neither a folder with model_index.json nor a "
                                       "reachable Hub id", "hf download someorg/somemodel", "tiny"],
                 marks=pytest.mark.slow),
])
def test_a_missing_folder_or_an_unreachable_hub_id_is_one_line_and_exit_2(model, words, tmp_path):
    # HF_HUB_OFFLINE: the Hub cannot be reached, as on a machine without network (and no cached copy)
    res = run_app([f"model={model}", f"output_dir={tmp_path / 'out'}"], cwd=tmp_path,
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr
    lines = error_lines(res.stderr)
    assert len(lines) == 1, res.stderr[-3000:]
    for w in words:
        assert w in lines[0]
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_folder_without_model_index_is_refused_before_loading(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelError, match="folder without model_index.json"):
        check_model_source(str(tmp_path / "weights"))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="is a file"):
        check_model_source(str(tmp_path / "model.safetensors"))
    assert issubclass(ModelError, ConfigError)  # the apps' exit code 2


def test_sources_are_told_apart(tiny_path):
    assert check_model_source("tiny") == "preset"
    assert check_model_source(str(tiny_path)) == "folder"
    assert check_model_source("stabilityai/stable-diffusion-3-medium-diffusers") == "hub"
    for path_like in ("./models/sd3", "~/sd3", "a/b/c"):
        with pytest.raises(ModelError, match="no such folder"):
            check_model_source(path_like)


def _chained(*excs):
    """The last exception raised with each earlier one as its cause, as diffusers chains them."""
    for cause, exc in zip(excs, excs[1:]):
        exc.__cause__ = cause
    return excs[-1]


class ConnectError(OSError):  # the class names huggingface_hub / httpx use
    pass


class RepositoryNotFoundError(OSError):
    pass


class GatedRepoError(RepositoryNotFoundError):
    pass


@pytest.mark.parametrize("chain, words", [
    ((ConnectError("[Errno -2] Name or service not known"), OSError("Cannot load model x/y: not cached")),
     ["reachable Hub id (no network: ConnectError: [Errno -2] Name or service not known)", "hf download x/y"]),
    ((RepositoryNotFoundError("404"), OSError("x/y is not a local folder")), ["not a repository on the Hub"]),
    ((GatedRepoError("401"), OSError("x/y cannot be loaded")), ["gated", "hf auth login"]),
])
def test_hub_errors_name_the_problem(chain, words):
    err = load_error("x/y", _chained(*chain))
    assert isinstance(err, ModelError) and "\n" not in str(err)
    for w in words:
        assert w in str(err)


def test_only_errors_of_finding_the_model_are_rewritten():
    assert is_load_error("x/y", OSError("Cannot load model x/y: not cached"))
    hub = type("HfHubHTTPError", (OSError,), {"__module__": "huggingface_hub.errors"})
    assert is_load_error("x/y", _chained(hub("404"), OSError("wrapped")))
    connect = type("ConnectError", (OSError,), {"__module__": "httpx2"})  # the client of huggingface_hub here
    assert is_load_error("x/y", _chained(connect("dns"), OSError("wrapped")))
    assert not is_load_error("x/y", ValueError("quantization of to_q failed"))  # the hook optimizing, not loading


def test_a_broken_folder_names_the_folder(tiny_path):
    err = load_error(str(tiny_path), OSError("Error no file named diffusion_pytorch_model.safetensors found"))
    assert "could not be loaded as an SD3 pipeline" in str(err) and "diffusion_pytorch_model" in str(err)
