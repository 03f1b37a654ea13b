"""data_download.sh against a loopback HTTP server (no other network, ever)."""
import hashlib
import http.server
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "data_download.sh"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    ranges = []

    def do_GET(self):
        data = self.payload
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        start = 0
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture()
def msd_archive(phantom_root):
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w") as tar:
        tar.add(phantom_root / "Task01_BrainTumour", arcname="Task01_BrainTumour",
                filter=lambda ti: None if ti.name.endswith(".phantom.json") else ti)
    return bio.getvalue()


@pytest.fixture()
def server(msd_archive):
    RangeHandler.payload, RangeHandler.ranges = msd_archive, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/Task01_BrainTumour.tar", msd_archive
    httpd.shutdown()


def run(args, dest, **env):
    e = {**os.environ, "TRM_DATA_DIR": str(dest), "PYTHON": sys.executable, "TRM_DOWNLOAD_RETRIES": "2",
         "TRM_MSD_URL": "http://127.0.0.1:9/none", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=e, timeout=300)


def test_help_lists_commands(tmp_path):
    r = run(["--help"], tmp_path)
    assert r.returncode == 0
    for word in ("phantom", "msd", "iseg2019 --from", "fets2021 --from", "TRM_DATA_DIR"):
        assert word in r.stdout


def test_msd_download_verify_extract_and_idempotent(tmp_path, server):
    url, payload = server
    md5 = hashlib.md5(payload).hexdigest()
    r = run(["msd"], tmp_path, TRM_MSD_URL=url, TRM_MSD_MD5=md5)
    assert r.returncode == 0, r.stderr
    assert "ok: msd:" in r.stdout
    assert (tmp_path / "Task01_BrainTumour" / "dataset.json").exists()
    assert not list(tmp_path.glob(".msd-extract*")) and not list(tmp_path.glob("*.part"))
    n_requests = len(RangeHandler.ranges)
    again = run(["msd"], tmp_path, TRM_MSD_URL=url, TRM_MSD_MD5=md5)
    assert again.returncode == 0 and "kept" in again.stdout
    assert len(RangeHandler.ranges) == n_requests  # nothing re-downloaded


def test_wrong_checksum_leaves_nothing(tmp_path, server):
    url, _ = server
    r = run(["msd"], tmp_path, TRM_MSD_URL=url, TRM_MSD_MD5="0" * 32)
    assert r.returncode != 0
    assert "checksum mismatch" in r.stderr and "0" * 32 in r.stderr
    assert not (tmp_path / "Task01_BrainTumour").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_interrupted_download_resumes(tmp_path, server):
    url, payload = server
    part = tmp_path / "Task01_BrainTumour.tar.part"
    part.write_bytes(payload[: len(payload) // 3])  # what an interrupted run leaves
    r = run(["msd"], tmp_path, TRM_MSD_URL=url, TRM_MSD_MD5=hashlib.md5(payload).hexdigest())
    assert r.returncode == 0, r.stderr
    assert RangeHandler.ranges == [f"bytes={len(payload) // 3}-"]
    assert (tmp_path / "Task01_BrainTumour" / "imagesTr").is_dir()


def test_unreachable_server_fails_clearly(tmp_path):
    r = run(["msd"], tmp_path)
    assert r.returncode != 0 and "failed after 2 attempts" in r.stderr
    assert not (tmp_path / "Task01_BrainTumour").exists()


def test_existing_unverifiable_dataset_is_untouched(tmp_path):
    d = tmp_path / "Task01_BrainTumour"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    r = run(["msd"], tmp_path)
    assert r.returncode != 0 and "left untouched" in r.stderr
    assert (d / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kind,folder", [("iseg2019", "iSeg-2019-Training"), ("fets2021", "MICCAI_FeTS2021_TrainingData")])
def test_import_from_archive_and_folder(tmp_path, phantom_root, kind, folder):
    src = tmp_path / "download"
    shutil.copytree(phantom_root / folder, src / "nested" / folder)
    archive = shutil.make_archive(str(tmp_path / "archive"), "gztar", src)
    dest = tmp_path / "data"
    r = run([kind, "--from", archive], dest)
    assert r.returncode == 0, r.stderr
    assert (dest / folder).is_dir() and "ok:" in r.stdout
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]
    again = run([kind, "--from", archive], dest)
    assert "kept" in again.stdout
    dest2 = tmp_path / "data2"
    r = run([kind, "--from", str(src / "nested" / folder)], dest2)
    assert r.returncode == 0, r.stderr
    assert (src / "nested" / folder).is_dir()  # the user's folder is copied, never moved


def test_import_without_from_says_how_to_register(tmp_path):
    r = run(["iseg2019"], tmp_path)
    assert r.returncode == 2 and "register" in r.stderr


def test_import_of_wrong_archive_leaves_nothing(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.txt").write_text("x")
    dest = tmp_path / "data"
    r = run(["fets2021", "--from", str(junk)], dest)
    assert r.returncode != 0 and "no expected files" in r.stderr
    assert not [p for p in dest.iterdir()]


def test_phantom_command(tmp_path):
    r = run(["phantom"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "phantom" / "iSeg-2019-Training" / "subject-1-T1.hdr").exists()
    assert (tmp_path / "phantom" / "MICCAI_FeTS2021_TrainingData" / "partitioning_1.csv").exists()
